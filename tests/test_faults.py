"""Faults during training: a killed trainer resumes, a broken shard gets one line.

A trainer subprocess is killed with SIGKILL at seeded points (after it logged
epoch k, and while it writes the export); run again with the same flags it
resumes from its last checkpoint and ends where an uninterrupted run ends,
with one loss-log row per epoch.  A corrupt, truncated, empty or missing
TFRecord shard stops the trainer with one error line naming the file.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import pytest
import tensorflow as tf

import preprocess
from conftest import REPO, load_script
from trainer import data, features, task
from trainer.serving import export

extractor = load_script('data-extractor.py')


FLAGS = ['--num-epochs', '8', '--batch-size', '32', '--num-factors', '4',
         '--learning-rate', '0.01', '--seed', '3']
EPOCHS = 8
SEED = 20240611  # the fault points below are drawn from it
_CLUSTER_ENV = ('TF_CONFIG', 'CLUSTER_SPEC')


@pytest.fixture(scope='module')
def preprocessed(tmp_path_factory) -> str:
    """A work dir after data-extractor.py and preprocess.py on 6,000 synthetic ratings."""
    work_dir = str(tmp_path_factory.mktemp('faults') / 'work')
    assert extractor.main(['--work-dir', work_dir, '--dataset', 'synthetic', '--num-users',
                           '150', '--num-movies', '120', '--num-ratings', '6000']) == 0
    assert preprocess.main(['--work-dir', work_dir]) == 0
    return work_dir


def _trainer(work_dir: str, job_dir: str, log_dir: str, name: str) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(('AIP_', 'CLOUD_ML_')) and key not in _CLUSTER_ENV}
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, f'{name}.out'), 'wb') as out, \
            open(os.path.join(log_dir, f'{name}.err'), 'wb') as err:
        return subprocess.Popen(
            [sys.executable, '-m', 'trainer.task', '--work-dir', work_dir,
             '--job-dir', job_dir, *FLAGS], cwd=REPO, env=env, stdout=out, stderr=err)


def _finish(process: subprocess.Popen, log_dir: str, name: str) -> None:
    assert process.wait(timeout=300) == 0, _tail(log_dir, name)


def _tail(log_dir: str, name: str, chars: int | None = 3000) -> str:
    """The end of a trainer's stderr (all of it with chars=None)."""
    with open(os.path.join(log_dir, f'{name}.err'), encoding='utf-8', errors='replace') as f:
        text = f.read()
    return text if chars is None else text[-chars:]


def _kill_when(process: subprocess.Popen, ready: Callable[[], bool], delay: float = 0.0,
               timeout: float = 300) -> None:
    """SIGKILLs the process `delay` seconds after `ready()` turns true."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f'the trainer ended (exit {process.returncode}) before the fault point')
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail('the fault point never came')
        time.sleep(0.005)
    time.sleep(delay)
    assert process.poll() is None, 'the trainer ended before it could be killed'
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def _loss_log(job_dir: str) -> list[dict[str, str]]:
    path = os.path.join(job_dir, features.LOSS_LOG_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding='utf-8') as f:
        return list(csv.DictReader(f))


def _serve(export_dir: str) -> np.ndarray:
    serve = tf.saved_model.load(export_dir).signatures[export.SIGNATURE]
    return serve(user_id=tf.constant(['1', '2', '77', 'nobody']),
                 movie_id=tf.constant(['1', '5', '30', '2']))[features.RATING].numpy()


def test_a_killed_trainer_resumes_and_ends_like_an_uninterrupted_run(preprocessed, tmp_path):
    rng = random.Random(SEED)
    logs = str(tmp_path / 'logs')
    baseline_dir, job_dir = str(tmp_path / 'baseline'), str(tmp_path / 'model')
    baseline = _trainer(preprocessed, baseline_dir, logs, 'baseline')  # alongside run 1

    # 1. Killed a seeded moment after it logged epoch k (during the checkpoint or epoch k+1).
    epoch, delay = rng.randint(2, EPOCHS - 3), rng.uniform(0.0, 0.3)
    _kill_when(_trainer(preprocessed, job_dir, logs, 'killed-training'),
               lambda: len(_loss_log(job_dir)) >= epoch, delay)
    logged = len(_loss_log(job_dir))  # the checkpoint of the last one may be missing
    assert not os.path.exists(os.path.join(job_dir, features.METRICS_FILE))
    _finish(baseline, logs, 'baseline')

    # 2. Run again, killed while it writes the export: no half export is left at export/.
    export_dir = os.path.join(job_dir, features.EXPORT_DIR)
    _kill_when(_trainer(preprocessed, job_dir, logs, 'killed-export'),
               lambda: os.path.isdir(export_dir + '.tmp'))
    assert not os.path.exists(export_dir)
    assert not os.path.exists(os.path.join(job_dir, features.METRICS_FILE))
    # It resumed from run 1's last checkpoint and trained only the epochs after it.
    second = _tail(logs, 'killed-export', chars=None)
    [resumed_from] = [int(number) for number in re.findall(
        r'Resuming from \S*/checkpoints/ckpt-(\d+)$', second, re.MULTILINE)]
    assert logged - 1 <= resumed_from <= logged
    assert [int(number) for number in re.findall(r'trainer\.rating\.train: Epoch (\d+)/', second)] \
        == list(range(resumed_from + 1, len(_loss_log(baseline_dir)) + 1))

    # 3. Run again: nothing left to train, exports, and matches the baseline.
    _finish(_trainer(preprocessed, job_dir, logs, 'resumed'), logs, 'resumed')
    resumed, uninterrupted = _loss_log(job_dir), _loss_log(baseline_dir)
    assert [int(row['epoch']) for row in resumed] == list(range(1, EPOCHS + 1))
    for row, expected in zip(resumed, uninterrupted):
        for column in features.LOSS_LOG_COLUMNS[1:-1]:  # not 'seconds'
            assert float(row[column]) == pytest.approx(float(expected[column]), abs=1e-6)
    metrics = features.read_json(os.path.join(job_dir, features.METRICS_FILE))
    expected = features.read_json(os.path.join(baseline_dir, features.METRICS_FILE))
    assert metrics['epochs'] == EPOCHS and metrics['epochs_this_run'] == 0
    assert metrics['eval_rmse'] == pytest.approx(expected['eval_rmse'], abs=1e-6)
    assert not os.path.exists(export_dir + '.tmp')
    np.testing.assert_allclose(_serve(export_dir),
                               _serve(os.path.join(baseline_dir, features.EXPORT_DIR)),
                               rtol=1e-6)


# --- Broken shards. -------------------------------------------------------------------
def _copy_work_dir(source: str, target: str) -> features.DatasetInfo:
    """A copy of a preprocessed work dir whose dataset_info points at the copy."""
    shutil.copytree(source, target)
    info = features.read_dataset_info(target)
    moved = {'train_pattern': features.split_pattern(target, features.TRAIN),
             'eval_pattern': features.split_pattern(target, features.EVAL)}
    record = {**json.loads(features.to_json(info)), **moved}
    features.write_json(os.path.join(features.transformed_dir(target),
                                     features.DATASET_INFO_FILE), record)
    return features.read_dataset_info(target)


def _shard(pattern: str) -> str:
    [path] = tf.io.gfile.glob(pattern)
    return path


def _break(path: str, how: str) -> str:
    """Damages one shard; returns the path the error must name."""
    with open(path, 'rb') as f:
        content = f.read()
    if how == 'missing-sibling':  # one shard of two is gone
        renamed = path.replace('-00000-of-00001', '-00000-of-00002')
        os.rename(path, renamed)
        return renamed.replace('-00000-of-00002', '-00001-of-00002')
    broken = {
        'truncated': content[:len(content) // 2],
        'trailer-cut': content[:-4],  # tf.data alone reads this without an error
        'bad-framing': gzip.compress(b'\x00garbage, not TFRecord framing' * 40),
        'flipped-byte': content[:len(content) // 2] + bytes([content[len(content) // 2] ^ 0xFF])
        + content[len(content) // 2 + 1:],
        'not-gzip': b'<html>502 Bad Gateway</html>' * 50,
        'empty': b'',
        'not-examples': gzip.compress(_tfrecord_of(b'not a tf.Example')),
    }[how]
    with open(path, 'wb') as f:
        f.write(broken)
    return path


def _tfrecord_of(payload: bytes) -> bytes:
    """Ten records of `payload` in TFRecord framing (uncompressed)."""
    with tempfile.TemporaryDirectory() as temp_dir:
        path = os.path.join(temp_dir, 'records.tfrecord')
        with tf.io.TFRecordWriter(path) as writer:
            for _ in range(10):
                writer.write(payload)
        with open(path, 'rb') as f:
            return f.read()


@pytest.mark.parametrize('split, how', [
    (features.TRAIN, 'truncated'),
    (features.TRAIN, 'trailer-cut'),
    (features.TRAIN, 'flipped-byte'),
    (features.TRAIN, 'bad-framing'),
    (features.TRAIN, 'not-gzip'),
    (features.TRAIN, 'empty'),
    (features.TRAIN, 'missing-sibling'),
    (features.TRAIN, 'not-examples'),
    (features.EVAL, 'truncated'),
])
@pytest.mark.parametrize('run', ['train', 'ranking trial'])
def test_a_broken_shard_stops_the_trainer_with_one_line_naming_it(
        preprocessed, tmp_path, capsys, split, how, run):
    work_dir = str(tmp_path / 'work')
    info = _copy_work_dir(preprocessed, work_dir)
    pattern = info.train_pattern if split == features.TRAIN else info.eval_pattern
    named = _break(_shard(pattern), how)
    # A tuning trial of the top-N model loads the same splits without the rating model.
    trial = ['--metric-only', '--tuning-metric', 'validation_ndcg'] if run != 'train' else []

    code = task.main(['--work-dir', work_dir, *FLAGS[:2], *trial])

    assert code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if 'error' in line.lower()]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1]
    assert errors[0].startswith('trainer: error: ') and named in errors[0]
    assert 'preprocess.py with --overwrite' in errors[0] and 'Traceback' not in err
    assert not os.path.exists(os.path.join(work_dir, features.MODEL_DIR, features.EXPORT_DIR))


def test_a_truncated_shard_exits_non_zero_without_a_traceback(preprocessed, tmp_path):
    work_dir = str(tmp_path / 'work')
    info = _copy_work_dir(preprocessed, work_dir)
    named = _break(_shard(info.train_pattern), 'truncated')

    result = subprocess.run(
        [sys.executable, '-m', 'trainer.task', '--work-dir', work_dir, *FLAGS[:2]],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)

    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('trainer: error: ') and named in last


def test_every_cut_of_a_shard_is_caught_before_training(preprocessed, tmp_path):
    info = features.read_dataset_info(preprocessed)
    with open(_shard(info.eval_pattern), 'rb') as f:
        content = f.read()
    data.check_shards((info.train_pattern, info.eval_pattern))
    path = str(tmp_path / f'eval-00000-of-00001{features.TFRECORD_SUFFIX}')
    step = max(len(content) // 150, 1)
    for cut in [*range(len(content) // 3, len(content), step), len(content) - 1]:
        with open(path, 'wb') as f:
            f.write(content[:cut])
        with pytest.raises(data.ShardError, match='truncated|corrupt'):
            data.check_shards((path,))
    # Why the check exists: tf.data reads a shard missing its gzip trailer without
    # an error, as it does any cut that falls on a record boundary.
    with open(path, 'wb') as f:
        f.write(content[:-4])
    records = tf.data.TFRecordDataset(path, compression_type='GZIP').reduce(
        np.int64(0), _count_one)
    assert int(records) == info.eval_ratings


@tf.autograph.experimental.do_not_convert
def _count_one(count: tf.Tensor, _: tf.Tensor) -> tf.Tensor:
    return count + 1


def test_find_unreadable_shard_passes_good_shards_and_names_a_bad_one(preprocessed, tmp_path):
    info = features.read_dataset_info(preprocessed)
    assert data.find_unreadable_shard((info.train_pattern, info.eval_pattern)) is None
    # The same shards with one cut short: found, and named.
    copy = _copy_work_dir(preprocessed, str(tmp_path / 'copy'))
    broken = _break(_shard(copy.eval_pattern), 'truncated')
    found = data.find_unreadable_shard((copy.train_pattern, copy.eval_pattern))
    assert isinstance(found, data.ShardError) and broken in str(found)
