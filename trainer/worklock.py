"""One run at a time on a directory: the lock every step takes on what it writes.

A lock is one small JSON file, DIR/run.lock (`features.LOCK_FILE`), holding
the holder's host, pid, start time and command.  It is created atomically:
on local disk with O_CREAT | O_EXCL, on gs:// as an object uploaded with
ifGenerationMatch=0 (google-cloud-storage), so of two runs that start
together exactly one gets it.  The other refuses in one line that names the
holder and how to break a stale lock (`LockHeld`).

A lock whose holder is gone is taken over, with a log line, when that can be
known: the holder ran on this host in this boot and its pid is no longer
that process (pid gone, or reused by a process started at another time), or
it was an earlier attempt of this Vertex AI job (`CLOUD_ML_JOB_ID`), which
Vertex restarts after a preemption.  A lock from another host is never
guessed stale: its holder may be running; the message says how to remove it.

A chain of steps (run-local.sh) takes the lock once and passes its token to
the steps in `ENV_TOKEN`; a step whose directory is locked with that token
runs under it instead of refusing.  `python -m trainer.worklock acquire|release`
is the chain's interface.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Sequence

from trainer import features
from trainer import fileio
from trainer import shutdown

logger = logging.getLogger(__name__)

# The token of a lock that the caller (a chain of steps) holds for this process.
ENV_TOKEN = 'WORK_DIR_LOCK_TOKEN'
# Set by Vertex AI in a custom job; a restarted attempt carries the same id.
ENV_JOB_ID = 'CLOUD_ML_JOB_ID'
_BOOT_ID_FILE = '/proc/sys/kernel/random/boot_id'


class LockHeld(Exception):
    """Another run holds the lock; the message is the one line to print."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """What a lock file says about the run that holds it."""
    host: str
    pid: int
    started: str  # ISO 8601, UTC
    command: str
    token: str
    boot_id: str = ''
    process_start: str = ''  # the kernel's start time of pid, to tell a reused pid
    job_id: str = ''


@dataclasses.dataclass(frozen=True)
class Lock:
    """A lock this process holds."""
    path: str
    holder: Holder
    generation: int | None = None  # the gs:// object's generation


def lock_path(directory: str) -> str:
    return features.join(directory, features.LOCK_FILE)


def _read_first_line(path: str) -> str:
    try:
        with open(path, encoding='ascii') as f:
            return f.readline().strip()
    except OSError:
        return ''


def _process_start(pid: int) -> str:
    """The start time of pid in clock ticks since boot (field 22 of /proc/PID/stat), or ''."""
    stat = _read_first_line(f'/proc/{pid}/stat')
    # The command name (field 2) may hold spaces; the fields after it do not.
    fields = stat.rpartition(')')[2].split()
    return fields[19] if len(fields) > 19 else ''


def make_holder(command: str, pid: int | None = None) -> Holder:
    """This process (or pid, a parent shell) as a lock holder, with a fresh token."""
    pid = os.getpid() if pid is None else pid
    return Holder(host=socket.gethostname(), pid=pid,
                  started=datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec='seconds'),
                  command=command, token=uuid.uuid4().hex,
                  boot_id=_read_first_line(_BOOT_ID_FILE),
                  process_start=_process_start(pid),
                  job_id=os.environ.get(ENV_JOB_ID, ''))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def why_stale(holder: Holder) -> str | None:
    """Why the holder is certainly gone, or None if it may still run."""
    job_id = os.environ.get(ENV_JOB_ID, '')
    if job_id and holder.job_id == job_id:
        return f'an earlier attempt of this job ({job_id})'
    if holder.host != socket.gethostname():
        return None
    boot_id = _read_first_line(_BOOT_ID_FILE)
    if not boot_id or holder.boot_id != boot_id:
        return None  # another boot, or another machine of the same name
    if not _pid_alive(holder.pid):
        return f'pid {holder.pid} has exited'
    if holder.process_start and _process_start(holder.pid) not in ('', holder.process_start):
        return f'pid {holder.pid} is another process now'
    return None


def _break_hint(path: str) -> str:
    if fileio.is_local(path):
        return f'rm {path}'
    return f'gcloud storage rm {path}'


def _held_message(path: str, holder: Holder) -> str:
    directory = path.rsplit('/', 1)[0]
    return (f'{directory} is in use by another run: pid {holder.pid} on {holder.host}, '
            f'started {holder.started} ({holder.command}); wait for it, or if it is no '
            f'longer running, break the lock: {_break_hint(path)}')


# --- Local disk. ---------------------------------------------------------------
def _create_local(path: str, text: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return True


def _read_local(path: str) -> tuple[Holder | None, str | None]:
    """(holder, the file's text), or (None, None) if there is no lock."""
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except FileNotFoundError:
        return None, None
    return _parse(text), text


def _take_over_local(path: str, stale_text: str) -> bool:
    """Moves the stale lock aside (one atomic rename); False if it changed meanwhile."""
    aside = f'{path}.stale-{uuid.uuid4().hex}'
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # someone else removed it: try to create it again
    with open(aside, encoding='utf-8') as f:
        moved = f.read()
    if moved != stale_text:  # another run replaced the stale lock first: put its lock back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        os.remove(aside)
        return False
    os.remove(aside)
    return True


# --- gs://. ----------------------------------------------------------------------
def _blob(path: str):
    from google.cloud import storage  # pylint: disable=import-outside-toplevel
    bucket, _, name = path[len('gs://'):].partition('/')
    return storage.Client().bucket(bucket).blob(name)


def _create_gcs(path: str, text: str) -> int | None:
    """Creates the object unless it exists; returns its generation, or None."""
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    blob = _blob(path)
    try:
        blob.upload_from_string(text, content_type='application/json', if_generation_match=0)
    except exceptions.PreconditionFailed:
        return None
    return int(blob.generation)


def _read_gcs(path: str) -> tuple[Holder | None, int | None]:
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    blob = _blob(path)
    try:
        text = blob.download_as_bytes().decode('utf-8')
    except exceptions.NotFound:
        return None, None
    return _parse(text), int(blob.generation)


def _delete_gcs(path: str, generation: int) -> bool:
    """Deletes that generation of the object only; False if it is another now."""
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    try:
        _blob(path).delete(if_generation_match=generation)
    except (exceptions.PreconditionFailed, exceptions.NotFound):
        return False
    return True


def _read(path: str) -> tuple[Holder | None, str | int | None]:
    """(holder, version): the local file's text or the object's generation."""
    return _read_local(path) if fileio.is_local(path) else _read_gcs(path)


def _parse(text: str) -> Holder:
    try:
        fields = json.loads(text)
        known = {field.name for field in dataclasses.fields(Holder)}
        return Holder(**{key: value for key, value in fields.items() if key in known})
    except (ValueError, TypeError):
        # Unreadable: a lock all the same, from nobody we can name.
        return Holder(host='unknown host', pid=0, started='at an unknown time',
                      command='unreadable lock file', token='')


def acquire(directory: str, holder: Holder, attempts: int = 3) -> Lock:
    """Takes DIRECTORY's lock for holder (creating the directory).

    Raises:
      LockHeld: another run holds it and is not known to be gone.
    """
    if fileio.is_local(directory):  # gs:// has no directories to make
        fileio.makedirs(directory)
    path = lock_path(directory)
    text = json.dumps(dataclasses.asdict(holder), indent=1) + '\n'
    local = fileio.is_local(path)
    for attempt in range(attempts):
        if local and _create_local(path, text):
            return Lock(path, holder)
        if not local and (generation := _create_gcs(path, text)) is not None:
            return Lock(path, holder, generation)
        current, version = _read(path)
        if current is None:
            continue  # released meanwhile
        if not current.token and attempt < attempts - 1:
            time.sleep(0.1)  # created a moment ago and not written yet: read it again
            continue
        reason = why_stale(current)
        if reason is None:
            raise LockHeld(_held_message(path, current))
        logger.warning('Taking over the stale lock %s of pid %d on %s, started %s: %s',
                       path, current.pid, current.host, current.started, reason)
        if local:
            _take_over_local(path, version)
        else:
            _delete_gcs(path, version)
    current, _ = _read(path)
    raise LockHeld(_held_message(path, current) if current else
                   f'{path} keeps changing: another run is starting; try again')


def release(lock: Lock) -> None:
    """Removes the lock if it is still this holder's (a broken and retaken lock is left)."""
    if fileio.is_local(lock.path):
        current, _ = _read_local(lock.path)
        if current is not None and current.token == lock.holder.token:
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock.path)
            return
    elif _delete_gcs(lock.path, lock.generation):
        return
    logger.warning('The lock %s is no longer this run\'s (broken by hand?); left as it is',
                   lock.path)


def held_by_caller(directory: str) -> bool:
    """True when DIRECTORY's lock carries the token in ENV_TOKEN (a chain's lock)."""
    token = os.environ.get(ENV_TOKEN)
    if not token:
        return False
    path = lock_path(directory)
    current, _ = _read(path)
    return current is not None and current.token == token


@contextlib.contextmanager
def hold(directory: str, command: str) -> Iterator[None]:
    """Holds DIRECTORY's lock for the block, unless the calling chain holds it.

    Raises:
      LockHeld: another run holds it.
    """
    if held_by_caller(directory):
        logger.debug('%s is locked by the calling chain', directory)
        yield
        return
    lock = acquire(directory, make_holder(command))
    try:
        with shutdown.before_forced_exit(lambda: release(lock)):
            yield
    finally:
        release(lock)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command a holder ran, for the refusal line (cut to 200 characters)."""
    spec = getattr(sys.modules.get('__main__'), '__spec__', None)
    program = (f'python -m {spec.name}' if spec is not None and spec.name != '__main__'
               else os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'python')
    words = [program, *(sys.argv[1:] if argv is None else argv)]
    text = ' '.join(words)
    return text if len(text) <= 200 else text[:197] + '...'


def main(argv: Sequence[str] | None = None) -> int:
    """acquire: prints the token (exit 2 with the holder's line if held); release."""
    parser = argparse.ArgumentParser(prog='python -m trainer.worklock',
                                     description='Takes or releases a directory lock.')
    parser.add_argument('action', choices=('acquire', 'release'))
    parser.add_argument('--dir', required=True, help='the locked directory')
    parser.add_argument('--pid', type=int, help='the holder (default: this process)')
    parser.add_argument('--command', default='', help='what the holder runs')
    parser.add_argument('--token', help='release: the token acquire printed')
    parser.add_argument('--name', default='worklock', help='the program named in errors')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    if args.action == 'acquire':
        try:
            lock = acquire(args.dir, make_holder(args.command, args.pid))
        except LockHeld as error:
            print(f'{args.name}: error: {error}', file=sys.stderr)
            return 2
        print(lock.holder.token)
        return 0
    if not args.token:
        parser.error('release needs --token, the token acquire printed')
    path = lock_path(args.dir)
    current, version = _read(path)
    if current is not None and current.token == args.token:
        release(Lock(path, current, None if fileio.is_local(path) else version))
    return 0


if __name__ == '__main__':
    sys.exit(main())
