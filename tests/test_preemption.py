"""SIGTERM (a Spot VM's preemption): the trainer checkpoints where it is and exits 0.

A real `python -m trainer.task` gets SIGTERM three times: in the epochs, in
the posterior sweeps and in the top-N iterations; each time it writes the
checkpoint of its position, says so in one line and exits 0, and the same
command resumes.  The fourth run ends with the loss log and metrics of an
uninterrupted run, the posterior mean bit for bit.  The chain's checkpoint
is also resumed in-process from any sweep, through its file.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from test_faults import preprocessed  # noqa: F401  pylint: disable=unused-import  # its small work dir
from trainer import features
from trainer.rating import posterior
from trainer.rating import state


# Patience 0 (no early stop) and enough epochs, sweeps and iterations that each
# phase lasts long enough to be interrupted in (half a second or more each here; a
# signal that comes late lands in the phase's refit, which is as good).
FLAGS = ['--num-epochs', '30', '--early-stopping-patience', '0', '--batch-size', '32',
         '--num-factors', '4', '--learning-rate', '0.01', '--seed', '3',
         '--posterior-samples', '300', '--posterior-burn-in', '20',
         '--topn-iterations', '60', '--topn-search', 'off']  # the iALS iterations themselves
_CLUSTER_ENV = ('TF_CONFIG', 'CLUSTER_SPEC')


def _start(work_dir: str, job_dir: str, err_path: str) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(('AIP_', 'CLOUD_ML_')) and key not in _CLUSTER_ENV}
    with open(err_path, 'wb') as err:
        return subprocess.Popen(
            [sys.executable, '-m', 'trainer.task', '--work-dir', work_dir,
             '--job-dir', job_dir, *FLAGS], cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=err)


def _read(path: str) -> str:
    with open(path, encoding='utf-8', errors='replace') as f:
        return f.read()


def _terminate_after(process: subprocess.Popen, err_path: str, pattern: str) -> str:
    """SIGTERMs the process once its log matches pattern; returns its log after it exits 0."""
    deadline = time.monotonic() + 300
    while not re.search(pattern, _read(err_path)):
        if process.poll() is not None:
            pytest.fail(f'the trainer ended (exit {process.returncode}) before '
                        f'{pattern!r}:\n{_read(err_path)[-3000:]}')
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f'{pattern!r} never came')
        time.sleep(0.002)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, _read(err_path)[-3000:]
    return _read(err_path)


def _loss_rows(job_dir: str) -> list[dict[str, str]]:
    with open(os.path.join(job_dir, features.LOSS_LOG_FILE), encoding='utf-8') as f:
        return [{key: value for key, value in row.items() if key != 'seconds'}
                for row in csv.DictReader(f)]


def _metrics(job_dir: str) -> dict:
    with open(os.path.join(job_dir, features.METRICS_FILE), encoding='utf-8') as f:
        return json.load(f)


def test_sigterm_in_each_phase_checkpoints_exits_0_and_resumes_to_the_same_model(
        preprocessed, tmp_path):
    logs = tmp_path / 'logs'
    logs.mkdir()
    baseline_dir, job_dir = str(tmp_path / 'baseline'), str(tmp_path / 'model')
    baseline = _start(preprocessed, baseline_dir, str(logs / 'baseline.err'))

    stops = [(r'trainer\.rating\.train: Epoch 2/30', r'(refit )?epoch (\d+)', 'epochs'),
             (r'Posterior sweep 20/320', r'posterior sweep (\d+)', 'sweeps'),
             (r'Top-N iteration 1/60', r'top-N (refit )?iteration (\d+)', 'iterations')]
    for number, (trigger, where, phase) in enumerate(stops, 1):
        err_path = str(logs / f'stopped-{number}.err')
        log = _terminate_after(_start(preprocessed, job_dir, err_path), err_path, trigger)
        lines = re.findall(r'SIGTERM: stopped after the checkpoint of (.*), [\d.]+ s after '
                           r'SIGTERM; exiting 0, run the same command to resume$', log,
                           re.MULTILINE)
        assert len(lines) == 1, f'run {number} ({phase}):\n{log[-3000:]}'
        assert re.fullmatch(where, lines[0]), f'run {number} stopped at {lines[0]}, not in {phase}'
        assert 'Traceback' not in log
        assert not os.path.exists(os.path.join(job_dir, features.METRICS_FILE))
        assert not os.path.exists(os.path.join(job_dir, features.LOCK_FILE))
    # The chain resumed from the sweep it stopped at, and was not rerun from the start.
    third = _read(str(logs / 'stopped-3.err'))
    assert re.search(r'Resuming the posterior chain after sweep (\d+)/320', third)
    assert 'Posterior sweep 20/320' not in third

    err_path = str(logs / 'resumed.err')
    resumed = _start(preprocessed, job_dir, err_path)
    assert resumed.wait(timeout=300) == 0, _read(err_path)[-3000:]
    assert baseline.wait(timeout=300) == 0, _read(str(logs / 'baseline.err'))[-3000:]

    assert _loss_rows(job_dir) == _loss_rows(baseline_dir)
    got, expected = _metrics(job_dir), _metrics(baseline_dir)
    for key in ('eval_rmse', 'eval_mae', 'validation_rmse', 'train_rmse', 'best_epoch'):
        assert got[key] == expected[key], key  # the posterior mean bit for bit
    for key in ('iterations', 'validation_ndcg'):
        assert got['topn'][key] == expected['topn'][key], key
    assert got['ranking']['model'] == expected['ranking']['model']  # NDCG@10 of the lists


def _chain_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    users, items, k, count = 60, 40, 3, 900
    user_table = (rng.normal(size=(users + 1, k + 1)) * 0.3).astype(np.float32)
    item_table = (rng.normal(size=(items + 1, k + 1)) * 0.3).astype(np.float32)
    user_table[-1] = item_table[-1] = 0.0
    return (user_table, item_table, 3.0, rng.integers(0, users, count),
            rng.integers(0, items, count), rng.integers(1, 6, count).astype(np.float32))


@pytest.mark.parametrize('kernel', ['tf', 'auto'])
@pytest.mark.parametrize('stop_after', [5, 10, 11, 37, 60])
def test_a_chain_resumed_from_its_checkpoint_file_gives_the_same_mean(kernel, stop_after,
                                                                      tmp_path):
    # 60 sweeps: 10 burn-in, then the running sums recompress (sweep 37) on the way.
    inputs = _chain_inputs()
    settings = {'samples': 50, 'burn_in': 10, 'seed': 1, 'kernel': kernel}
    uninterrupted = posterior.average(*inputs, **settings)
    path = str(tmp_path / 'posterior' / 'chain.npz')

    def save_at_stop(sweep, chain, last):
        if sweep == stop_after:
            state.save_chain(path, chain())
    posterior.average(*inputs, after_sweep=save_at_stop, **settings)
    saved = state.load_chain(path)
    assert saved.sweep == stop_after
    resumed = posterior.average(*inputs, resume=saved, **settings)
    np.testing.assert_array_equal(resumed.user_table, uninterrupted.user_table)
    np.testing.assert_array_equal(resumed.item_table, uninterrupted.item_table)
    assert resumed.noise_std == uninterrupted.noise_std


def test_a_checkpoint_of_another_chain_is_not_resumed(tmp_path, caplog):
    inputs = _chain_inputs()
    path = str(tmp_path / 'chain.npz')

    def save(sweep, chain, last):
        if sweep == 12:
            state.save_chain(path, chain())
    posterior.average(*inputs, samples=20, burn_in=5, seed=1, kernel='tf', after_sweep=save)
    other_start = _chain_inputs(seed=1)
    fresh = posterior.average(*other_start, samples=20, burn_in=5, seed=1, kernel='tf')
    resumed = posterior.average(*other_start, samples=20, burn_in=5, seed=1, kernel='tf',
                                resume=state.load_chain(path))
    np.testing.assert_array_equal(resumed.user_table, fresh.user_table)
    assert 'of another chain' in caplog.text


_NO_CHECKPOINT_SCRIPT = '''
import os, signal, sys, time
from trainer import logs, shutdown, worklock
logs.setup_logging()
shutdown.WATCHDOG_SECONDS = 0.5  # 24 s in a real run
with shutdown.stop_at_checkpoints(), worklock.hold(sys.argv[1], 'a long step'):
    with shutdown.writing():  # SIGTERM while a checkpoint is written: it is finished first
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)
        print('checkpoint written', flush=True)
    time.sleep(60)  # a step that reaches no checkpoint
print('not reached', flush=True)
'''


def test_without_a_checkpoint_in_time_the_trainer_exits_0_after_its_write_releasing_its_lock(
        work_dir):
    started = time.monotonic()
    result = subprocess.run([sys.executable, '-c', _NO_CHECKPOINT_SCRIPT, work_dir], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30
    assert result.stdout.splitlines() == ['checkpoint written']
    assert re.search(r'SIGTERM 0 s ago and no new checkpoint: exiting 0 at the last one '
                     r'\(none yet\); run the same command to resume', result.stderr)
    assert not os.path.exists(os.path.join(work_dir, features.LOCK_FILE))
