"""Tests of trainer/usage.py: a step's CPU and memory samples."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from trainer import features, usage


def test_a_busy_process_is_sampled_as_busy_then_idle_and_its_memory_grows(tmp_path):
    path = str(tmp_path / 'usage' / 'trainer.csv')
    before = usage.read_sample().rss_bytes
    with usage.sampling(path, every_seconds=0.1, write_seconds=0.3) as sampler:
        assert sampler is not None
        held = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        busy_from = time.time()
        while time.time() < busy_from + 1.2:  # one busy thread
            pass
        busy_to = time.time()
        time.sleep(0.6)  # then idle
    # Since this process started: its own threads, not its children.
    cpu_used = sum(os.times()[:2])
    recorded = usage.read_usage(path)
    # The first row runs from the process's start (pytest's imports) to the sampler's.
    started = recorded.seconds[0]
    assert 10 <= len(recorded.seconds) <= 25 and started > 0.05
    assert recorded.seconds == sorted(recorded.seconds)
    assert recorded.seconds[-1] - started > 1.6
    # The samples account for all the CPU the process used, however loaded the machine is.
    # (1%: in a long pytest run other threads of this process run between the last sample
    # and os.times; a sampler missing threads or seconds would be off by far more.)
    assert recorded.mean_cpu_cores() * recorded.seconds[-1] == pytest.approx(cpu_used, rel=0.01,
                                                                          abs=0.15)
    # Rows whose interval (the 0.1 s up to their sample) lies inside each stretch.
    born = usage.process_start().unix_time
    busy = [cores for cores, at in zip(recorded.cpu_cores, recorded.seconds)
            if busy_from + 0.15 < born + at < busy_to - 0.05]
    idle = [cores for cores, at in zip(recorded.cpu_cores, recorded.seconds)
            if born + at > busy_to + 0.2]
    assert len(busy) >= 3 and len(idle) >= 2
    # CPU time moves in 10 ms clock ticks, so one tick of another thread of this
    # process (a long pytest run has some) reads 0.1 core in a 0.1 s row; a busy
    # thread reads about 1 (less on a loaded machine).
    assert np.mean(busy) > 0.2 and np.mean(idle) < 0.1 and max(idle) <= 0.2
    assert recorded.peak_rss_bytes() >= before + 50 * 2**20 and held.all()
    assert recorded.peak_rss_bytes() >= recorded.mean_rss_bytes() > 20 * 2**20


def test_the_file_is_written_while_the_step_runs_and_rewritten_at_the_end(tmp_path):
    path = str(tmp_path / 'extract.csv')
    with usage.sampling(path, every_seconds=0.05, write_seconds=0.1):
        time.sleep(0.4)
        with open(path, encoding='utf-8') as f:
            during = f.read().splitlines()
    with open(path, encoding='utf-8') as f:
        after = f.read().splitlines()
    assert during[0] == ','.join(features.USAGE_COLUMNS) and len(during) >= 2
    assert len(after) > len(during)


def test_no_path_samples_nothing_and_a_foreign_file_is_named(tmp_path):
    with usage.sampling(None) as sampler:
        assert sampler is None
    path = tmp_path / 'loss_log.csv'
    path.write_text('epoch,train_rmse\n1,0.9\n', encoding='utf-8')
    with pytest.raises(ValueError, match='loss_log.csv is not a usage file'):
        usage.read_usage(str(path))


def test_mean_cpu_weighs_each_sample_by_its_interval():
    recorded = usage.Usage(seconds=[1.0, 4.0], cpu_cores=[2.0, 0.0], rss_bytes=[1, 3])
    assert recorded.mean_cpu_cores() == pytest.approx(0.5)  # 2 core-seconds in 4 s
    assert recorded.peak_cpu_cores() == 2.0 and recorded.mean_rss_bytes() == 2.0
