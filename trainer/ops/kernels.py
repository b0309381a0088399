"""The trainer's C++ ops, built once per machine and loaded.

`fused_epoch.cc` trains an epoch of the rating model (`trainer.rating.fused`);
`read_ratings.cc` reads a shard of the preprocessing output into rating
columns (`trainer.data.load_ratings`); `sample_rows.cc` draws one side of a
posterior-averaging sweep (`trainer.rating.posterior`); `ials_solve.cc`
re-solves one side of the top-N model (`trainer.topn.train`, in place of
`ials.half_step`).

The ops are compiled from the sources shipped in this package with the C++
compiler (`$CXX`, else `g++`; one process per source, side by side, then
linked) and the flags TensorFlow reports (`tf.sysconfig`), into a cache
directory keyed by the source, the flags and
the TensorFlow version: `$MOVIELENS_KERNEL_CACHE`, else
`$XDG_CACHE_HOME/movielens-trainer`, else `~/.cache/movielens-trainer`.  The
first build takes about 12 s on two cores; later runs load the cached library.  Where no
compiler is found (or the build fails) `load` says why, and the trainer falls
back to TensorFlow ops (`--training-kernel auto`; `data.load_ratings` reads
with `tf.data`) or stops with that reason (`--training-kernel fused`).

`python -m trainer.ops` builds the library and prints where it is (the
training image runs it at build time).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

import tensorflow as tf

logger = logging.getLogger(__name__)

# The C++ sources, built into one library, and the header two of them share.
SOURCES = tuple(pathlib.Path(__file__).with_name(name) for name in
                ('fused_epoch.cc', 'read_ratings.cc', 'sample_rows.cc', 'ials_solve.cc',
                 'score_ratings.cc', 'shuffle_order.cc'))
HEADERS = (pathlib.Path(__file__).with_name('grouped_rows.h'),)
ENV_CACHE = 'MOVIELENS_KERNEL_CACHE'
# No -march=native: the library may be built in an image and run elsewhere.
# -ffp-contract=off: no fused multiply-adds, so each operation rounds as the
# TensorFlow kernels' do; -fno-math-errno lets the square roots vectorise.
OPTIMIZE_FLAGS = ('-O3', '-fno-math-errno', '-ffp-contract=off', '-pthread')
BUILD_TIMEOUT_SECONDS = 600


class KernelUnavailable(RuntimeError):
    """The ops could not be built or loaded, or do not apply; the message says why."""


def cache_dir() -> pathlib.Path:
    """Where built libraries are kept (see the module docstring)."""
    if os.environ.get(ENV_CACHE):
        return pathlib.Path(os.environ[ENV_CACHE])
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
        os.path.expanduser('~'), '.cache')
    return pathlib.Path(base) / 'movielens-trainer'


def _compiler() -> str | None:
    name = os.environ.get('CXX') or 'g++'
    return shutil.which(name)


def _compile_command(compiler: str, source: pathlib.Path, output: pathlib.Path) -> list[str]:
    return [compiler, '-std=c++17', '-fPIC', *OPTIMIZE_FLAGS, '-Wno-deprecated-declarations',
            *tf.sysconfig.get_compile_flags(), '-c', str(source), '-o', str(output)]


def _link_command(compiler: str, objects: list[pathlib.Path],
                  output: pathlib.Path) -> list[str]:
    return [compiler, '-shared', '-pthread', *map(str, objects), '-o', str(output),
            *tf.sysconfig.get_link_flags()]


def library_path(compiler: str) -> pathlib.Path:
    """The cached library for this source, compiler, flags and TF version.

    Raises:
      KernelUnavailable: if a source is missing (an install without them).
    """
    key = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        try:
            key.update(source.read_bytes())
        except OSError as error:
            raise KernelUnavailable(
                f'cannot read the op source {source} ({error.strerror}); reinstall the '
                'trainer package with its .cc files (setup.py ships them)') from error
    out = pathlib.Path('out')
    key.update(repr(([_compile_command(compiler, source, out) for source in SOURCES],
                     _link_command(compiler, [out], out), tf.__version__,
                     sys.version_info[:2])).encode())
    return cache_dir() / key.hexdigest()[:16] / 'trainer_ops.so'


def _first_error(stderr: str) -> str:
    """The compiler's first error line, or the linker's first line (its
    "collect2: error" summary comes after the cause)."""
    lines = stderr.splitlines()
    errors = [line for line in lines if 'error' in line and not line.startswith('collect2')]
    return (errors or lines or ['no output'])[0].strip()


def _compile_and_link(compiler: str, output: pathlib.Path) -> None:
    """Compiles the sources side by side (one process each), then links them.

    Raises:
      KernelUnavailable: a compiler or linker error (its first error line).
      subprocess.TimeoutExpired: past BUILD_TIMEOUT_SECONDS.
    """
    with tempfile.TemporaryDirectory(dir=output.parent) as scratch:
        objects = [pathlib.Path(scratch) / f'{source.stem}.o' for source in SOURCES]
        compiles = [subprocess.Popen(_compile_command(compiler, source, target),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
                    for source, target in zip(SOURCES, objects)]
        try:
            outcomes = [(source, process.communicate(timeout=BUILD_TIMEOUT_SECONDS))
                        for source, process in zip(SOURCES, compiles)]
        finally:
            for process in compiles:
                if process.poll() is None:
                    process.kill()
        for (source, (_, stderr)), process in zip(outcomes, compiles):
            if process.returncode != 0:
                raise KernelUnavailable(f'building {source.name} failed: {_first_error(stderr)}')
        linked = subprocess.run(_link_command(compiler, objects, output),
                                capture_output=True, text=True,
                                timeout=BUILD_TIMEOUT_SECONDS, check=False)
        if linked.returncode != 0:
            raise KernelUnavailable(f'linking {", ".join(source.name for source in SOURCES)} '
                                    f'failed: {_first_error(linked.stderr)}')


def build() -> pathlib.Path:
    """Builds the library unless it is cached; returns its path.

    Raises:
      KernelUnavailable: no compiler, an unwritable cache, or a failed build.
    """
    compiler = _compiler()
    if compiler is None:
        raise KernelUnavailable(
            f'no C++ compiler ({os.environ.get("CXX") or "g++"}) on PATH; '
            'install g++ (Debian/Ubuntu: apt-get install g++) or set CXX')
    path = library_path(compiler)
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KernelUnavailable(
            f'cannot write the kernel cache {path.parent} ({error.strerror}); '
            f'set {ENV_CACHE} to a writable directory') from error
    logger.info("Building the trainer's C++ ops (once per machine) into %s", path)
    # Build beside the target and rename: processes building at once each
    # rename a whole library over the other's.
    handle, partial = tempfile.mkstemp(suffix='.so', dir=path.parent)
    os.close(handle)
    try:
        _compile_and_link(compiler, pathlib.Path(partial))
        os.replace(partial, path)
    except subprocess.TimeoutExpired as error:
        raise KernelUnavailable(f'building the ops took over '
                                f'{BUILD_TIMEOUT_SECONDS} s') from error
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


_LOAD_LOCK = threading.Lock()


def load():
    """The loaded op module, built first if need be: once per process.

    Threads share one build (the train and eval splits load in two), and a
    failure is remembered, so the later callers (each split's load, each
    training phase) do not compile again to fail the same way.

    Raises:
      KernelUnavailable: as `build`, or if TensorFlow cannot load the library.
    """
    with _LOAD_LOCK:
        ops, problem = _load_once()
    if problem is not None:
        raise KernelUnavailable(problem)
    return ops


@functools.cache
def _load_once():
    """(the op module, None), or (None, why it is unavailable)."""
    try:
        path = build()
    except KernelUnavailable as error:
        return None, str(error)
    try:
        return tf.load_op_library(str(path)), None
    except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as error:
        return None, f'loading {path} failed: {error.message}'


# A batch of 1,024 ratings is split between the threads, which meet three
# times per batch: more than a few would mostly wait.  Measured on two cores
# (2M ratings, 25M-sized tables): 2 threads 10-12M ratings/s, 3 or 4 threads
# (more than the cores) 8-8.6M.
MAX_THREADS = 4


def default_threads() -> int:
    """The threads an epoch uses: the CPUs we may use (or TF's intra-op setting,
    if lower), at most MAX_THREADS."""
    cpus = len(os.sched_getaffinity(0))
    configured = tf.config.threading.get_intra_op_parallelism_threads() or cpus
    return max(1, min(configured, cpus, MAX_THREADS))



def main() -> None:
    """Build the library and print its path, or exit with the reason it cannot be built."""
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        print(build())
    except KernelUnavailable as error:
        sys.exit(f'error: {error}')


if __name__ == '__main__':
    main()
