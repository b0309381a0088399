"""Logging set-up shared by every entry point: Python logging and TensorFlow's native lines.

Two calls, both at the edges:

- `quiet_startup(argv)` at the top of an entry point, before anything imports
  TensorFlow.  Unless argv holds `--verbose`, it hides the lines TensorFlow's
  C++ runtime prints while it loads (the oneDNN notice, CUDA probing, the
  cpu_feature_guard notice).  `TF_CPP_MIN_LOG_LEVEL` hides the runtime's own
  INFO and WARNING lines, but some start-up lines go through Abseil logging
  before it is initialised, which no variable silences; so `import_tensorflow`
  imports TensorFlow (and lists its devices) with file descriptor 2 caught, and
  writes back every caught line that is not one of those start-up lines.
  Modules that import TensorFlow lazily go through `import_tensorflow` too.
- `setup_logging(verbose)` in `main`: INFO from this project, WARNING from
  libraries; DEBUG and library INFO with `--verbose`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

VERBOSE_FLAG = '--verbose'
VERBOSE_HELP = "show DEBUG logs and TensorFlow's native start-up lines (hidden by default)"
# 0 shows the C++ runtime's INFO lines; 2 keeps its errors only.
_TF_LOG_LEVEL = 'TF_CPP_MIN_LOG_LEVEL'
_QUIET_TF_LOG_LEVEL = '2'
_VERBOSE_TF_LOG_LEVEL = '0'

# Seconds between two progress lines of a long step.
PROGRESS_SECONDS = 15.0
_progress_logger = logging.getLogger('trainer.progress')
# When this process last logged a progress line (monotonic s): a heartbeat stays
# quiet while a ProgressLog speaks.
_last_line = [-math.inf]

# This project's loggers: the package and the script run as __main__.
_PROJECT = ('trainer', '__main__')
# Libraries that narrate every step at INFO; their warnings still show.
_CHATTY = ('apache_beam', 'tensorflow', 'absl', 'urllib3', 'google', 'h5py')

# What TensorFlow 2.21 prints while it loads on a machine without a GPU: an
# Abseil notice, INFO/WARNING lines in glog format (port.cc's oneDNN notice,
# cudart_stub.cc, cpu_feature_guard.cc and its second line), and the failed
# cuInit of CUDA probing.  Any other line, an error included, is kept.
_STARTUP_LINE = re.compile(
    r'WARNING: All log messages before absl::InitializeLog\(\) is called'
    r'|[IW]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] '
    r'|E\d{4} [\d:.]+ +\d+ cuda_\w+\.cc:\d+\] failed call to cuInit'
    r'|To enable the following instructions: .*rebuild TensorFlow')


# What a Python that runs this project must be able to import: the pinned stack
# (requirements.txt), which run-local.sh and run-tests.sh install into .venv.
STACK_MODULES = ('numpy', 'tensorflow', 'apache_beam', 'tensorflow_transform', 'matplotlib')
VENV_PYTHON = '.venv/bin/python'


def check_packages(modules: Sequence[str] = STACK_MODULES) -> None:
    """Exits with one line naming the fix when a pinned package is missing.

    The usual cause is a Python outside .venv: `python recommend.py` in a new
    shell.  Call it at the top of an entry point, before anything imports the
    stack; it looks the modules up without importing them.
    """
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        print(f'error: {missing[0]} is not installed for {sys.executable}; '
              f'run this with {VENV_PYTHON} (./run-local.sh or ./run-tests.sh sets up '
              '.venv), or activate it first: source .venv/bin/activate', file=sys.stderr)
        sys.exit(2)


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """Adds --verbose, which every entry point takes (see quiet_startup)."""
    parser.add_argument(VERBOSE_FLAG, action='store_true', help=VERBOSE_HELP)


def wants_verbose(argv: Sequence[str] | None = None) -> bool:
    """Whether the command line asks for --verbose (read before argparse runs)."""
    args = sys.argv[1:] if argv is None else argv
    return VERBOSE_FLAG in args


def is_startup_line(line: str) -> bool:
    """Whether line is one of TensorFlow's native start-up lines hidden by default."""
    return _STARTUP_LINE.match(line) is not None


def quiet_startup(argv: Sequence[str] | None = None, load_tensorflow: bool = True) -> None:
    """Hides TensorFlow's native start-up lines unless argv holds --verbose.

    Call before anything imports TensorFlow.  Exits in one line where the
    pinned packages are missing (`check_packages`).  Sets TF_CPP_MIN_LOG_LEVEL (which
    child processes inherit; an explicit value is kept unless --verbose is
    given) and, with load_tensorflow, imports TensorFlow through
    import_tensorflow.

    Args:
      argv: the command line without the program name; default sys.argv[1:].
      load_tensorflow: import TensorFlow now; pass False where only some paths
        need it (they import it through import_tensorflow).
    """
    check_packages()
    if wants_verbose(argv):
        os.environ[_TF_LOG_LEVEL] = _VERBOSE_TF_LOG_LEVEL
        return
    os.environ.setdefault(_TF_LOG_LEVEL, _QUIET_TF_LOG_LEVEL)
    if load_tensorflow:
        import_tensorflow()


def import_tensorflow() -> Any:
    """Imports TensorFlow, hiding its native start-up lines unless asked for them.

    On first import, when TF_CPP_MIN_LOG_LEVEL is above 0, TensorFlow is
    imported (and its devices listed) with file descriptor 2 caught; every caught
    line that is not a start-up line is then written to stderr.

    Returns:
      The tensorflow module.
    """
    if 'tensorflow' in sys.modules or os.environ.get(_TF_LOG_LEVEL, '0') == '0':
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        return tf
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow as tf  # pylint: disable=import-outside-toplevel
            tf.config.list_physical_devices()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors='replace').splitlines(True)
                    if not is_startup_line(line)]
            if kept:
                sys.stderr.write(''.join(kept))
                sys.stderr.flush()
    return tf


class ProgressLog:
    """Logs a running count at most every `every_seconds`: progress of a long step.

    Cheap enough to call once per batch: one clock read.  Beam pickles it with
    its DoFn; each worker counts what it processed.  With a total the line
    also gives the share done and an estimate of the time left, at the rate
    so far: `what: 30 of 120 (25%), 10 s so far, about 30 s left`.
    """

    def __init__(self, what: str, every_seconds: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 total: int | None = None) -> None:
        self._what = what
        self._every = PROGRESS_SECONDS if every_seconds is None else every_seconds
        self._clock = clock
        self._count = 0
        self._next: float | None = None
        self._total = total
        # Counted from here when the total is known: the first item's time counts too.
        self._started = clock() if total is not None else None

    def add(self, count: int) -> None:
        """Counts count more items; logs the total when the interval has passed."""
        self._count += count
        now = self._clock()
        if self._next is None:
            self._next = (now if self._started is None else self._started) + self._every
        if now >= self._next:
            _progress_logger.info('%s', self.line(now))
            self._next = now + self._every
            _last_line[0] = time.monotonic()

    def line(self, now: float) -> str:
        """The progress line at time now."""
        if self._total is None or self._started is None:
            return f'{self._what}: {self._count:,} so far'
        elapsed = now - self._started
        text = (f'{self._what}: {self._count:,} of {self._total:,} '
                f'({100 * self._count / max(self._total, 1):.0f}%), {elapsed:.0f} s so far')
        left = time_left(self._count, self._total, elapsed)
        return text + ('' if left is None else f', about {left:.0f} s left')


@contextlib.contextmanager
def heartbeat(what: str, waiting_on: str,
              every_seconds: float = PROGRESS_SECONDS) -> Iterator[None]:
    """Logs 'what: N s so far; waiting on ...' every every_seconds of silence.

    For a phase that reports no progress of its own (TFT's analysers): no
    estimate of the time left, but a sign of life and what it waits on.  A
    daemon thread; it stays quiet while ProgressLog lines are being logged.
    """
    started = time.monotonic()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_seconds):
            if time.monotonic() - _last_line[0] >= every_seconds:
                _progress_logger.info('%s: %.0f s so far; waiting on %s', what,
                                      time.monotonic() - started, waiting_on)
                _last_line[0] = time.monotonic()

    thread = threading.Thread(target=beat, name='heartbeat', daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def time_left(done: float, total: float, elapsed: float) -> float | None:
    """Seconds left at the rate so far (elapsed for done of total); None before any."""
    if done <= 0 or elapsed <= 0:
        return None
    return max(0.0, elapsed * (total - done) / done)


def setup_logging(verbose: bool = False) -> None:
    """Logs INFO and up from this project, WARNING and up from libraries.

    With verbose, DEBUG and up from this project (the trainer package and the
    script run) and INFO and up from libraries.
    """
    logging.basicConfig(level=logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s', force=True)
    for name in _PROJECT:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.NOTSET)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
        absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    except ImportError:
        pass
