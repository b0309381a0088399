"""Small files on local disk or on any `tf.io.gfile` filesystem (gs://).

Local paths go through the standard library and everything else through
`tf.io.gfile`, imported on first use: `plot.py` and the end-of-run summary
read a CSV and a few JSON files, and importing TensorFlow for them took
3.7 s of each (a third of the 100k chain's overhead).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
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


# What TensorFlow's GCS filesystem can read from an Application Default
# Credentials file (tsl/platform/cloud/google_auth_provider.cc): a user's refresh
# token or a service-account key.  Impersonated service accounts and workload
# identity federation (external_account...) pass `gcloud auth
# application-default print-access-token`, but tf.io.gfile cannot use them.
GCS_CREDENTIAL_TYPES = ('authorized_user', 'service_account')


def adc_file(environ: Mapping[str, str]) -> str | None:
    """The ADC file TensorFlow reads, or None (then it asks the metadata server)."""
    if environ.get('GOOGLE_APPLICATION_CREDENTIALS'):
        return environ['GOOGLE_APPLICATION_CREDENTIALS']
    config = environ.get('CLOUDSDK_CONFIG') or os.path.join(
        environ.get('HOME', ''), '.config', 'gcloud')
    path = os.path.join(config, 'application_default_credentials.json')
    return path if os.path.exists(path) else None


def gcs_credentials_problem(environ: Mapping[str, str]) -> str | None:
    """One line saying why tf.io.gfile cannot reach gs:// with these credentials, or None."""
    path = adc_file(environ)
    if path is None:
        return None
    try:
        with open(path, encoding='utf-8') as f:
            kind = json.load(f).get('type')
    except (OSError, ValueError, AttributeError) as error:
        return f'cannot read the Application Default Credentials {path}: {error}'
    if kind in GCS_CREDENTIAL_TYPES:
        return None
    return (f'the Application Default Credentials in {path} are of type {kind!r}, which '
            "TensorFlow's Cloud Storage client (the gs:// steps run here) cannot use; run "
            'gcloud auth application-default login (without --impersonate-service-account), '
            'or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file')
