"""What a step's own process used: CPU and resident memory, about every second.

Each step (data-extractor.py, preprocess.py, `python -m trainer.task`, the
batch job) runs its work inside `sampling(path)`: a daemon thread reads
/proc/self/stat (user + system CPU time of this process's threads; not its
children's, which /proc adds only when a child is reaped, all at once: the
one-time g++ build of the C++ ops would show as tens of cores for a second) and /proc/self/statm (resident pages) every
`every_seconds` (the first row covers the process's start-up: its imports),
and rewrites the CSV (features.USAGE_COLUMNS) every
`write_seconds` and at the end, through fileio, so a gs:// path works and a
reader never sees half a file.  A re-run of a step replaces its file.

It is cheap: one sample reads two small /proc files (tens of microseconds a
second, `bench/scale.py` prints the measured cost).  Where /proc is missing
(not Linux) nothing is sampled and the step runs as before.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import os
import posixpath
import threading
import time
from collections.abc import Iterator

from trainer import features
from trainer import fileio

logger = logging.getLogger(__name__)

SAMPLE_SECONDS = 1.0
WRITE_SECONDS = 30.0
_STAT = '/proc/self/stat'
_STATM = '/proc/self/statm'
_TICKS = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100
_PAGE = os.sysconf('SC_PAGE_SIZE') if hasattr(os, 'sysconf') else 4096


@dataclasses.dataclass(frozen=True)
class Sample:
    """One reading: the wall clock, CPU seconds used so far, resident bytes."""
    unix_time: float
    cpu_seconds: float
    rss_bytes: int


def read_sample() -> Sample:
    """This process's CPU seconds (all its threads, no children) and RSS now.

    Raises:
      OSError: /proc is not there (not Linux).
    """
    with open(_STAT, 'rb') as stat:
        # Fields after the command name, which may hold spaces: state is the first.
        fields = stat.read().rsplit(b')', 1)[1].split()
    # utime and stime are fields 14-15 of proc(5); fields[0] is field 3.
    ticks = sum(int(value) for value in fields[11:13])
    with open(_STATM, 'rb') as statm:
        resident_pages = int(statm.read().split()[1])
    return Sample(time.time(), ticks / _TICKS, resident_pages * _PAGE)


def process_start() -> Sample:
    """A sample at the moment this process started: no CPU used, no memory yet.

    From /proc/self/stat's start time (clock ticks after boot) and /proc/uptime,
    so a step's first row covers its imports too (TensorFlow's take seconds).

    Raises:
      OSError: /proc is not there (not Linux).
    """
    with open(_STAT, 'rb') as stat:
        started_after_boot = int(stat.read().rsplit(b')', 1)[1].split()[19]) / _TICKS
    with open('/proc/uptime', 'rb') as uptime:
        since_boot = float(uptime.read().split()[0])
    return Sample(time.time() - (since_boot - started_after_boot), 0.0, 0)


def rows(samples: list[Sample]) -> list[tuple[float, float, float, int]]:
    """CSV rows from consecutive samples: seconds since the first, CPU cores busy since
    the previous sample (1.0 is one core all the time), resident bytes at the sample."""
    out = []
    for previous, sample in zip(samples, samples[1:]):
        interval = sample.unix_time - previous.unix_time
        cores = (sample.cpu_seconds - previous.cpu_seconds) / interval if interval > 0 else 0.0
        out.append((round(sample.unix_time, 3), round(sample.unix_time - samples[0].unix_time, 3),
                    round(max(cores, 0.0), 3), sample.rss_bytes))
    return out


def to_csv(samples: list[Sample]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator='\n')
    writer.writerow(features.USAGE_COLUMNS)
    writer.writerows(rows(samples))
    return text.getvalue()


class Sampler:
    """The daemon thread of `sampling`."""

    def __init__(self, path: str, every_seconds: float, write_seconds: float) -> None:
        self.path = path
        self.samples: list[Sample] = []
        self._every = every_seconds
        self._write_every = write_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name='usage-sampler', daemon=True)

    def start(self) -> None:
        self.samples.extend([process_start(), read_sample()])
        parent = posixpath.dirname(self.path)
        if parent:
            fileio.makedirs(parent)
        self._thread.start()

    def _run(self) -> None:
        written = time.monotonic()
        while not self._stop.wait(self._every):
            self.samples.append(read_sample())
            if time.monotonic() - written >= self._write_every:
                self.write()
                written = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(read_sample())
        self.write()

    def write(self) -> None:
        try:
            fileio.write_text(self.path, to_csv(list(self.samples)))
        except OSError as error:  # a full disk or a lost bucket must not stop the step
            logger.warning('Could not write %s: %s', self.path, error)


@contextlib.contextmanager
def sampling(path: str | None, every_seconds: float = SAMPLE_SECONDS,
             write_seconds: float = WRITE_SECONDS) -> Iterator[Sampler | None]:
    """Samples this process's CPU and memory into path while the block runs.

    Args:
      path: the CSV to (re)write, local or gs://; None samples nothing (a
        worker that is not the chief).
      every_seconds: seconds between two samples.
      write_seconds: seconds between two writes of the file before the end.

    Yields:
      The sampler (its samples so far), or None when nothing is sampled.
    """
    sampler = None
    if path is not None:
        try:
            sampler = Sampler(path, every_seconds, write_seconds)
            sampler.start()
        except OSError as error:
            logger.debug('No CPU and memory samples for %s: %s', path, error)
            sampler = None
    try:
        yield sampler
    finally:
        if sampler is not None:
            sampler.stop()


@dataclasses.dataclass(frozen=True)
class Usage:
    """One step's recorded samples, as read back."""
    seconds: list[float]
    cpu_cores: list[float]
    rss_bytes: list[int]

    def peak_rss_bytes(self) -> int:
        return max(self.rss_bytes, default=0)

    def mean_rss_bytes(self) -> float:
        return sum(self.rss_bytes) / len(self.rss_bytes) if self.rss_bytes else 0.0

    def peak_cpu_cores(self) -> float:
        return max(self.cpu_cores, default=0.0)

    def mean_cpu_cores(self) -> float:
        """CPU seconds over wall seconds: the samples weighted by their interval."""
        if not self.seconds:
            return 0.0
        starts = [0.0] + self.seconds[:-1]
        busy = sum(cores * (end - start)
                   for cores, start, end in zip(self.cpu_cores, starts, self.seconds))
        return busy / self.seconds[-1] if self.seconds[-1] > 0 else 0.0


def read_usage(path: str) -> Usage:
    """Reads a step's usage CSV.

    Raises:
      ValueError: the file is not a usage CSV (names the file).
    """
    with fileio.open_file(path) as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != features.USAGE_COLUMNS:
            raise ValueError(f'{path} is not a usage file: its header is '
                             f'{reader.fieldnames}, not {",".join(features.USAGE_COLUMNS)}')
        table = list(reader)
    return Usage([float(row['seconds']) for row in table],
                 [float(row['cpu_cores']) for row in table],
                 [int(row['rss_bytes']) for row in table])


def recorded_steps(work_dir: str) -> dict[str, str]:
    """{step: path} of the usage files in work_dir, in the order the steps run."""
    found = {}
    for step in features.USAGE_STEPS:
        path = features.usage_path(work_dir, step)
        if fileio.exists(path):
            found[step] = path
    return found
