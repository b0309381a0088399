"""SIGTERM: how a step stops when Vertex AI preempts its VM or a user stops it.

Compute Engine gives a Spot VM 30 seconds between SIGTERM and the hard stop
(`GRACE_SECONDS`).  Two behaviours, one per kind of step:

- The trainer stops at its next checkpoint (`stop_at_checkpoints`): the
  signal only sets a flag; the fit loops, the posterior chain and the top-N
  iterations call `check(where)` right after they write a checkpoint, which
  raises `Stopped`, and `trainer.task` logs one line and exits 0.  The next
  run resumes from that checkpoint.  An epoch, a sweep or an iteration takes
  seconds (an epoch at 25M ratings about 3 s), so the next checkpoint comes
  well inside the grace period; should none come within `WATCHDOG_SECONDS`,
  the process exits 0 at the last checkpoint written, never in the middle of
  writing one (`writing`).
- The data steps unwind (`raise_on_sigterm`): the signal raises `Terminated`
  in the main thread, their clean-up removes what they had half written, and
  the process exits with 143 (128 + SIGTERM), as if killed, but clean.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

GRACE_SECONDS = 30.0
# The trainer exits at its last checkpoint if it reaches no new one this soon
# after SIGTERM, leaving time for the process to end inside the grace period.
WATCHDOG_SECONDS = 24.0
EXIT_TERMINATED = 128 + signal.SIGTERM


class Stopped(Exception):
    """SIGTERM came and the checkpoint of `where` is written: stop now."""

    def __init__(self, where: str, seconds: float) -> None:
        super().__init__(f'stopped after the checkpoint of {where}, {seconds:.1f} s after '
                         'SIGTERM')
        self.where = where
        self.seconds = seconds


class Terminated(SystemExit):
    """Raised in the main thread of a data step by SIGTERM; exits 143 unless caught."""

    def __init__(self) -> None:
        super().__init__(EXIT_TERMINATED)


class _StopRequest:
    """When SIGTERM came (None before), and the lock the watchdog waits on."""

    def __init__(self) -> None:
        self.signalled_at: float | None = None
        self.write_lock = threading.RLock()
        self.last_checkpoint = 'none yet'
        # Run before the watchdog's exit, which skips every `finally`: releasing locks.
        self.before_forced_exit: list[Callable[[], None]] = []


_REQUEST = _StopRequest()


def requested() -> bool:
    return _REQUEST.signalled_at is not None


def check(where: str | Callable[[], str]) -> None:
    """Call right after a checkpoint is written; raises Stopped after SIGTERM.

    Args:
      where: what the checkpoint holds ('epoch 3', 'posterior sweep 40'),
        or a function returning it.
    """
    label = where() if callable(where) else where
    _REQUEST.last_checkpoint = label
    if _REQUEST.signalled_at is not None:
        raise Stopped(label, time.monotonic() - _REQUEST.signalled_at)


@contextlib.contextmanager
def before_forced_exit(callback: Callable[[], None]) -> Iterator[None]:
    """Within the block, the watchdog's exit calls callback first (a lock's release)."""
    _REQUEST.before_forced_exit.append(callback)
    try:
        yield
    finally:
        _REQUEST.before_forced_exit.remove(callback)


@contextlib.contextmanager
def writing() -> Iterator[None]:
    """Holds off the watchdog's exit while a checkpoint is written."""
    with _REQUEST.write_lock:
        yield


def _watchdog(seconds: float) -> None:
    time.sleep(seconds)
    with _REQUEST.write_lock:  # never in the middle of writing a checkpoint
        logger.warning('SIGTERM %.0f s ago and no new checkpoint: exiting 0 at the last one '
                       '(%s); run the same command to resume', seconds,
                       _REQUEST.last_checkpoint)
        for callback in reversed(_REQUEST.before_forced_exit):
            try:
                callback()
            except Exception:  # pylint: disable=broad-except
                logger.exception('Clean-up before exiting failed; exiting all the same')
        logging.shutdown()
        sys.stderr.flush()
        os._exit(0)  # pylint: disable=protected-access


def _on_sigterm_stop(signum: int, frame) -> None:  # pylint: disable=unused-argument
    if _REQUEST.signalled_at is not None:
        return
    _REQUEST.signalled_at = time.monotonic()
    logger.warning('SIGTERM: stopping at the next checkpoint (within %.0f s)',
                   WATCHDOG_SECONDS)
    threading.Thread(target=_watchdog, args=(WATCHDOG_SECONDS,), daemon=True,
                     name='sigterm-watchdog').start()


@contextlib.contextmanager
def _handling(handler: Callable) -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_at_checkpoints() -> contextlib.AbstractContextManager[None]:
    """The trainer's SIGTERM handler for the block (main thread only): stop at
    the next checkpoint."""
    _REQUEST.signalled_at = None
    _REQUEST.last_checkpoint = 'none yet'
    return _handling(_on_sigterm_stop)


def terminated() -> bool:
    """True once SIGTERM raised Terminated: whatever a library re-raised it as
    (Beam wraps it in a RuntimeError), the step is being stopped."""
    return _REQUEST.signalled_at is not None


def raise_if_terminated() -> None:
    """Raises Terminated if SIGTERM came: called before a data step publishes
    anything, in case a library swallowed the exception the handler raised."""
    if terminated():
        raise Terminated()


def _on_sigterm_raise(signum: int, frame) -> None:  # pylint: disable=unused-argument
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # clean up once, undisturbed
    _REQUEST.signalled_at = time.monotonic()
    logger.warning('SIGTERM: removing what this run half wrote, then exiting')
    raise Terminated()


def raise_on_sigterm() -> contextlib.AbstractContextManager[None]:
    """A data step's SIGTERM handler for the block (main thread only): raise Terminated."""
    _REQUEST.signalled_at = None
    return _handling(_on_sigterm_raise)
