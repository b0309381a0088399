"""trainer/logs.py: TensorFlow's native start-up lines hidden by default, shown with --verbose."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import REPO
from trainer import logs

# What TensorFlow 2.21 prints while it loads here (no GPU), one line of each kind.
STARTUP_LINES = [
    'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR',
    'I0000 00:00:1796387177.598432   14134 port.cc:153] oneDNN custom operations are on. You '
    'may see slightly different numerical results due to floating-point round-off errors',
    'I0000 00:00:1796387177.598734   14134 cudart_stub.cc:31] Could not find cuda drivers on '
    'your machine, GPU will not be used.',
    'I0000 00:00:1796387177.694147   14134 cpu_feature_guard.cc:227] This TensorFlow binary is '
    'optimized to use available CPU instructions in performance-critical operations.',
    'To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild '
    'TensorFlow with the appropriate compiler flags.',
    'E0000 00:00:1796387180.014119   14134 cuda_platform.cc:52] failed call to cuInit: '
    'INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)',
]
# Marks of those lines in a process's stderr.
MARKS = ('absl::InitializeLog', 'oneDNN custom operations', 'cuda')


@pytest.mark.parametrize('line', STARTUP_LINES)
def test_start_up_lines_are_recognised(line):
    assert logs.is_startup_line(line + '\n')


@pytest.mark.parametrize('line', [
    'E0000 00:00:1796387180.014119   14134 op_kernel.cc:1830] OP_REQUIRES failed: bad shard',
    'Traceback (most recent call last):',
    'trainer: error: something real',
])
def test_other_lines_are_kept(line):
    assert not logs.is_startup_line(line)


def _run_trainer(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items()
               if key != 'TF_CPP_MIN_LOG_LEVEL'}
    return subprocess.run(
        [sys.executable, '-m', 'trainer.task', '--work-dir', str(tmp_path / 'none'), *flags],
        cwd=REPO, env=environ, capture_output=True, text=True, timeout=120, check=False)


def test_entry_point_hides_start_up_lines_unless_verbose(tmp_path):
    quiet = _run_trainer(tmp_path)
    verbose = _run_trainer(tmp_path, '--verbose')

    # Both import TensorFlow, then stop with the same one-line error.
    for result in (quiet, verbose):
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1].startswith('trainer: error: ')
    assert len(quiet.stderr.strip().splitlines()) == 1, quiet.stderr
    assert not [mark for mark in MARKS if mark in quiet.stderr]
    assert [mark for mark in MARKS if mark in verbose.stderr] == list(MARKS), verbose.stderr


def test_progress_is_logged_once_per_interval(caplog):
    now = [100.0]
    progress = logs.ProgressLog('rating rows parsed', every_seconds=10, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger='trainer.progress')
    for step in range(25):  # a batch of 1,000 rows a second for 25 seconds
        now[0] = 100.0 + step
        progress.add(1_000)

    assert [record.getMessage() for record in caplog.records] == [
        'rating rows parsed: 11,000 so far', 'rating rows parsed: 21,000 so far']


def test_progress_with_a_total_estimates_the_time_left_at_the_rate_so_far(caplog):
    now = [50.0]
    progress = logs.ProgressLog('Posterior sweeps', every_seconds=15, clock=lambda: now[0],
                                total=120)
    caplog.set_level(logging.INFO, logger='trainer.progress')
    for sweep in range(120):  # 2 s a sweep, counted from the start, not the first sweep
        now[0] = 50.0 + 2.0 * (sweep + 1)
        progress.add(1)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[:2] == ['Posterior sweeps: 8 of 120 (7%), 16 s so far, about 224 s left',
                         'Posterior sweeps: 16 of 120 (13%), 32 s so far, about 208 s left']
    assert len(lines) == 15 and lines[-1].endswith('about 0 s left')


def test_time_left_needs_some_work_done():
    assert logs.time_left(0, 10, 5.0) is None
    assert logs.time_left(5, 10, 0.0) is None
    assert logs.time_left(1, 4, 3.0) == pytest.approx(9.0)
    assert logs.time_left(5, 4, 3.0) == 0.0  # more than the estimate: nothing left


def test_a_heartbeat_speaks_only_in_silence(caplog):
    caplog.set_level(logging.INFO, logger='trainer.progress')
    with logs.heartbeat('Preprocessing', 'the analyse phase', every_seconds=0.05):
        time.sleep(0.2)
    beats = [record.getMessage() for record in caplog.records]
    assert len(beats) >= 2 and all(
        re.fullmatch(r'Preprocessing: \d+ s so far; waiting on the analyse phase', line)
        for line in beats)
    caplog.clear()
    progress = logs.ProgressLog('rows written', every_seconds=0.0)
    with logs.heartbeat('Preprocessing', 'the write', every_seconds=0.1):
        for _ in range(30):  # a progress line every 10 ms: the heartbeat keeps quiet
            progress.add(1)
            time.sleep(0.01)
    assert not [record for record in caplog.records if 'waiting on' in record.getMessage()]
