"""Small files on local disk or on any `tf.io.gfile` filesystem (gs://).

Local paths go through the standard library and everything else through
`tf.io.gfile`, imported on first use: `plot.py` and the end-of-run summary
read a CSV and a few JSON files, and importing TensorFlow for them took
3.7 s of each (a third of the 100k chain's overhead).
"""

from __future__ import annotations

import os
import shutil
from typing import IO

from trainer import logs


def is_local(path: str) -> bool:
    """True for a plain filesystem path (no scheme such as gs://)."""
    return '://' not in path


def _gfile():
    return logs.import_tensorflow().io.gfile


def open_file(path: str, mode: str = 'r') -> IO:
    """Opens path for reading or writing, text as UTF-8."""
    if not is_local(path):
        return _gfile().GFile(path, mode)
    if 'b' in mode:
        return open(path, mode)  # pylint: disable=unspecified-encoding
    return open(path, mode, encoding='utf-8', newline='')


def exists(path: str) -> bool:
    return os.path.exists(path) if is_local(path) else _gfile().exists(path)


def replace(source: str, target: str) -> None:
    """Renames source to target, replacing it (atomically on local disk)."""
    if is_local(source) and is_local(target):
        os.replace(source, target)
    else:
        _gfile().rename(source, target, overwrite=True)


def write_text(path: str, text: str) -> None:
    """Writes text to path via path + '.tmp', so readers never see half a file."""
    tmp = path + '.tmp'
    with open_file(tmp, 'w') as f:
        f.write(text)
    replace(tmp, path)


def isdir(path: str) -> bool:
    return os.path.isdir(path) if is_local(path) else _gfile().isdir(path)


def listdir(path: str) -> list[str]:
    """Entry names of a directory (GCS may end directory names with '/')."""
    return os.listdir(path) if is_local(path) else _gfile().listdir(path)


def makedirs(path: str) -> None:
    if is_local(path):
        os.makedirs(path, exist_ok=True)
    else:
        _gfile().makedirs(path)


def remove(path: str) -> None:
    if is_local(path):
        os.remove(path)
    else:
        _gfile().remove(path)


def rmtree(path: str) -> None:
    if is_local(path):
        shutil.rmtree(path)
    else:
        _gfile().rmtree(path)


def size(path: str) -> int:
    """The file's length in bytes."""
    return os.path.getsize(path) if is_local(path) else _gfile().stat(path).length
