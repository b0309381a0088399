"""Tests of trainer/distribute.py and of the trainer as a Vertex AI custom-job replica.

Multi-worker runs start two `python -m trainer.task` processes on 127.0.0.1
(MultiWorkerMirroredStrategy configures the TensorFlow runtime once per
process, so it cannot run inside pytest).  Each run has a deadline, after
which both process groups get SIGKILL: a worker that lost its peer would
otherwise wait in a collective, and TF 2.21 catches SIGTERM for its
preemption notifier instead of exiting.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import tensorflow as tf
from tensorflow.core.util import event_pb2

import preprocess
from conftest import REPO, load_script, served_rmse
from trainer import config, distribute, features, history, task
from trainer.serving import export

# 4,040 train ratings: 15 batches of 257 and a last one of 185, which the two
# workers split 93/92, so the uneven last batch is exercised too.
TRAINER_FLAGS = ['--batch-size', '257', '--learning-rate', '0.02',
                 '--num-factors', '8']
TRAIN_RATINGS = 4040
EPOCHS = 3
DEADLINE_SECONDS = 150
# The environment a replica reads; cleared so the test machine's cannot leak in.
CLUSTER_AND_VERTEX_VARIABLES = (
    distribute.ENV_TF_CONFIG, distribute.ENV_CLUSTER_SPEC, config.ENV_MODEL_DIR,
    config.ENV_CHECKPOINT_DIR, config.ENV_TENSORBOARD_LOG_DIR,
    config.ENV_TRIAL_ID, config.ENV_HP_METRIC_FILE)
EPOCH_LINE = re.compile(r'Epoch (\d+)/\d+: objective (\S+), train RMSE (\S+), '
                        r'validation RMSE (\S+) .*?, eval RMSE (\S+)')


@pytest.fixture(scope='module')
def prepared(tmp_path_factory) -> str:
    """A work dir after data-extractor.py (synthetic) and preprocess.py."""
    path = str(tmp_path_factory.mktemp('work'))
    assert load_script('data-extractor.py').main([
        '--work-dir', path, '--dataset', 'synthetic', '--num-ratings', '5000',
        '--num-users', '100', '--num-movies', '200', '--synthetic-model', 'rank3']) == 0
    assert preprocess.main(['--work-dir', path]) == 0
    assert features.read_dataset_info(path).train_ratings == TRAIN_RATINGS
    return path


@pytest.fixture(scope='module')
def single(prepared, tmp_path_factory) -> dict:
    """One in-process run as a tuning trial with TensorBoard: the reference."""
    root = tmp_path_factory.mktemp('single')
    paths = {'model_dir': str(root / 'model'),
             'tensorboard': str(root / 'tensorboard'),
             'metric_file': str(root / 'hypertune' / 'output.metrics')}
    with pytest.MonkeyPatch.context() as patch:
        for name in CLUSTER_AND_VERTEX_VARIABLES:
            patch.delenv(name, raising=False)
        patch.setenv(config.ENV_TENSORBOARD_LOG_DIR, paths['tensorboard'])
        patch.setenv(config.ENV_TRIAL_ID, '7')
        patch.setenv(config.ENV_HP_METRIC_FILE, paths['metric_file'])
        started = time.time()
        assert task.main(['--work-dir', prepared, '--job-dir', paths['model_dir'],
                          '--num-epochs', str(EPOCHS), *TRAINER_FLAGS]) == 0
        paths['time_window'] = (started, time.time())
    paths['metrics'] = features.read_json(
        os.path.join(paths['model_dir'], features.METRICS_FILE))
    paths['history'] = _loss_log(paths['model_dir'])
    return paths


# --- Translation and strategy choice. -----------------------------------------

VERTEX_CLUSTER_SPEC = {
    'cluster': {'workerpool0': ['cmle-training-workerpool0-ab-0:2222'],
                'workerpool1': ['cmle-training-workerpool1-ab-0:2222',
                                'cmle-training-workerpool1-ab-1:2222']},
    'environment': 'cloud',
    'task': {'type': 'workerpool1', 'index': 1, 'trial': '3'},
    'job': '{"python_module":"","package_uris":[],"job_args":[]}',
}


def test_cluster_spec_becomes_tf_config_with_tensorflow_task_types():
    assert distribute.tf_config_from_cluster_spec(VERTEX_CLUSTER_SPEC) == {
        'cluster': {'chief': ['cmle-training-workerpool0-ab-0:2222'],
                    'worker': ['cmle-training-workerpool1-ab-0:2222',
                               'cmle-training-workerpool1-ab-1:2222']},
        'task': {'type': 'worker', 'index': 1}}


def test_empty_pools_are_dropped_and_every_pool_is_mapped():
    spec = {'cluster': {'workerpool0': ['a:1'], 'workerpool1': [],
                        'workerpool2': ['c:1'], 'workerpool3': ['d:1']},
            'task': {'type': 'workerpool3', 'index': 0}}
    assert distribute.tf_config_from_cluster_spec(spec) == {
        'cluster': {'chief': ['a:1'], 'ps': ['c:1'], 'evaluator': ['d:1']},
        'task': {'type': 'evaluator', 'index': 0}}


@pytest.mark.parametrize('spec', [
    {'cluster': {'workerpool0': ['a:1']}},
    {'task': {'type': 'workerpool0', 'index': 0}},
    {'cluster': {'workerpool7': ['a:1']}, 'task': {'type': 'workerpool7'}},
    {'cluster': {'workerpool0': ['a:1']}, 'task': {'type': 'chief', 'index': 0}},
])
def test_malformed_cluster_specs_are_refused(spec):
    with pytest.raises(distribute.ClusterError, match='CLUSTER_SPEC'):
        distribute.tf_config_from_cluster_spec(spec)


def test_cluster_spec_is_adopted_only_without_tf_config():
    environ = {distribute.ENV_CLUSTER_SPEC: json.dumps(VERTEX_CLUSTER_SPEC)}
    distribute.adopt_cluster_spec(environ)
    assert json.loads(environ[distribute.ENV_TF_CONFIG]) == \
        distribute.tf_config_from_cluster_spec(VERTEX_CLUSTER_SPEC)

    own = {distribute.ENV_CLUSTER_SPEC: json.dumps(VERTEX_CLUSTER_SPEC),
           distribute.ENV_TF_CONFIG: '{"cluster": {}}'}
    distribute.adopt_cluster_spec(own)
    assert own[distribute.ENV_TF_CONFIG] == '{"cluster": {}}'

    nothing: dict[str, str] = {}
    distribute.adopt_cluster_spec(nothing)
    assert not nothing

    with pytest.raises(distribute.ClusterError, match='not JSON'):
        distribute.adopt_cluster_spec({distribute.ENV_CLUSTER_SPEC: '{cluster'})


@pytest.mark.parametrize('cluster, task_type, task_id, expected', [
    ({}, None, None, distribute.Task('chief', 0, 1, True)),
    ({'chief': ['a:1']}, 'chief', 0, distribute.Task('chief', 0, 1, True)),
    ({'worker': ['a:1']}, 'worker', 0, distribute.Task('worker', 0, 1, True)),
    ({'chief': ['a:1'], 'worker': ['b:1']}, 'chief', 0,
     distribute.Task('chief', 0, 2, True)),
    ({'chief': ['a:1'], 'worker': ['b:1', 'c:1']}, 'worker', 0,
     distribute.Task('worker', 0, 3, False)),
    ({'worker': ['a:1', 'b:1']}, 'worker', 0, distribute.Task('worker', 0, 2, True)),
    ({'worker': ['a:1', 'b:1']}, 'worker', 1, distribute.Task('worker', 1, 2, False)),
])
def test_find_task_names_the_chief(cluster, task_type, task_id, expected):
    assert distribute.find_task(tf.train.ClusterSpec(cluster), task_type,
                                task_id) == expected


@pytest.mark.parametrize('cluster, task_type, task_id, message', [
    ({'chief': ['a:1'], 'worker': ['b:1'], 'ps': ['c:1']}, 'worker', 0, "'ps'"),
    ({'chief': ['a:1'], 'worker': ['b:1']}, 'evaluator', 0, "'evaluator'"),
    ({'worker': ['a:1', 'b:1']}, 'worker', 2, 'not in the cluster'),
    ({'worker': ['a:1', 'b:1']}, None, None, 'no "task"'),
])
def test_find_task_refuses_clusters_it_cannot_train_in(cluster, task_type,
                                                       task_id, message):
    with pytest.raises(distribute.ClusterError, match=message):
        distribute.find_task(tf.train.ClusterSpec(cluster), task_type, task_id)


@pytest.mark.parametrize('variable, value', [
    (distribute.ENV_TF_CONFIG, '{"cluster": {"chief": ["127.0.0.1:1"]}, '
                               '"task": {"type": "chief", "index": 0}}'),
    (distribute.ENV_CLUSTER_SPEC, '{"cluster": {"workerpool0": ["127.0.0.1:1"]}, '
                                  '"task": {"type": "workerpool0", "index": 0}}'),
    (None, None),
])
def test_a_single_replica_gets_the_default_strategy(variable, value, monkeypatch):
    for name in (distribute.ENV_TF_CONFIG, distribute.ENV_CLUSTER_SPEC):
        monkeypatch.delenv(name, raising=False)
    if variable is not None:
        monkeypatch.setenv(variable, value)
    strategy, this_task = distribute.make_strategy(os.environ)
    assert strategy is tf.distribute.get_strategy()
    assert this_task.is_chief and this_task.num_workers == 1


def test_an_unsupported_cluster_fails_in_one_line(prepared, monkeypatch, capsys):
    monkeypatch.delenv(distribute.ENV_CLUSTER_SPEC, raising=False)
    monkeypatch.setenv(distribute.ENV_TF_CONFIG, json.dumps({
        'cluster': {'chief': ['127.0.0.1:1'], 'ps': ['127.0.0.1:2']},
        'task': {'type': 'chief', 'index': 0}}))
    assert task.main(['--work-dir', prepared]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "'ps'" in errors[0]


# --- The Vertex AI environment of a single replica. ---------------------------

def test_a_tuning_trial_writes_the_metric_file_vertex_reads(single):
    with open(single['metric_file'], encoding='utf-8') as f:
        lines = f.read().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    # cloudml-hypertune 0.1.0.dev6's keys and value types.
    assert sorted(report) == ['checkpoint_path', 'global_step', 'timestamp', 'trial',
                              'validation_rmse']
    assert report['trial'] == '7'
    assert report['global_step'] == str(single['metrics']['best_epoch'])
    # The validation slice's RMSE, never the eval split's.
    assert float(report['validation_rmse']) == pytest.approx(
        single['metrics']['validation_rmse'], rel=1e-12)
    assert single['metrics']['validation_rmse'] != single['metrics']['eval_rmse']
    assert single['time_window'][0] <= report['timestamp'] <= single['time_window'][1]
    assert list(report) == sorted(report)  # written with sorted keys


def _scalars(run_dir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the event files of one TensorBoard run.

    Checks that each tag is marked as TensorBoard's scalar plugin data.
    """
    scalars: dict[str, dict[int, float]] = {}
    plugins: dict[str, str] = {}
    for path in tf.io.gfile.glob(os.path.join(run_dir, 'events.out.tfevents.*')):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = float(
                    tf.make_ndarray(value.tensor))
                if value.metadata.plugin_data.plugin_name:
                    plugins[value.tag] = value.metadata.plugin_data.plugin_name
    assert plugins == dict.fromkeys(scalars, 'scalars')
    return scalars


def _loss_log(model_dir: str | pathlib.Path) -> tuple[history.EpochMetrics, ...]:
    return history.read_loss_log(os.path.join(model_dir, features.LOSS_LOG_FILE))


def test_tensorboard_gets_rmse_and_mae_per_epoch(single):
    rows = _loss_log(single['model_dir'])
    for split in features.SPLITS:
        scalars = _scalars(os.path.join(single['tensorboard'], split))
        assert sorted(scalars) == ['mae', 'rmse']
        for metric in ('rmse', 'mae'):
            assert sorted(scalars[metric]) == list(range(1, EPOCHS + 1))
            for row in rows:
                assert scalars[metric][row.epoch] == pytest.approx(
                    getattr(row, f'{split}_{metric}'), rel=1e-6)


# --- Two workers. -------------------------------------------------------------

def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(('127.0.0.1', 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _run_replicas(environments: list[dict[str, str]], argv: list[str],
                  log_dir: pathlib.Path, exit_code: int = 0) -> list[str]:
    """Runs one trainer per environment until all end or the deadline passes.

    Returns:
      Each replica's output; fails the test unless every replica exits exit_code.
    """
    base = {name: value for name, value in os.environ.items()
            if name not in CLUSTER_AND_VERTEX_VARIABLES}
    base['TF_CPP_MIN_LOG_LEVEL'] = '2'
    log_dir.mkdir(parents=True, exist_ok=True)
    processes, logs = [], []
    for index, environment in enumerate(environments):
        logs.append(log_dir / f'replica-{index}.log')
        with open(logs[-1], 'w', encoding='utf-8') as log:
            processes.append(subprocess.Popen(
                [sys.executable, '-m', 'trainer.task', *argv], cwd=REPO,
                env={**base, **environment}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
    deadline = time.monotonic() + DEADLINE_SECONDS
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    outputs = [path.read_text(encoding='utf-8') for path in logs]
    for process, output in zip(processes, outputs):
        assert process.returncode == exit_code, (
            f'replica exited {process.returncode} (-9: killed at the '
            f'{DEADLINE_SECONDS} s deadline):\n{output[-4000:]}')
    return outputs


def _epoch_lines(output: str) -> list[tuple[str, ...]]:
    return EPOCH_LINE.findall(output)


def _assert_same_global_metrics(outputs: list[str], epochs: list[int]) -> None:
    """Every worker logged the same (all-reduced) metrics for the same epochs."""
    lines = [_epoch_lines(output) for output in outputs]
    assert [int(line[0]) for line in lines[0]] == epochs
    assert all(other == lines[0] for other in lines[1:])


def _assert_matches_single(metrics: dict, single: dict, epoch: int) -> None:
    """The run's final metrics equal the single-process run's after `epoch`.

    Both runs take the same global batches in the same order and apply the
    same summed gradient (the all-gather keeps the batch's row order); only
    the order of float additions may differ.  Measured here: bit-identical.
    1e-5 leaves room for other summation orders, while a wrong split is far
    outside it: a whole --batch-size per worker (one process with batch 514)
    ends epoch 2 at eval RMSE 1.0512 instead of 1.0269.
    """
    assert metrics['epochs'] == epoch
    best = metrics['best_epoch']
    assert best == min(single['history'][:epoch], key=lambda row: row.validation_rmse).epoch
    if metrics['final_model'] == 'refit':
        # Refit on all train ratings for `best` epochs, as the single run did.
        assert epoch == single['metrics']['epochs']
        expected = single['metrics']
    else:
        expected = dataclasses.asdict(
            next(row for row in single['history'] if row.epoch == best))
    for name in ('eval_rmse', 'eval_mae', 'validation_rmse'):
        assert metrics[name] == pytest.approx(expected[name], rel=1e-5)


def _vertex_layout(base: pathlib.Path) -> dict[str, str]:
    """AIP_MODEL_DIR and AIP_CHECKPOINT_DIR as Vertex AI derives them."""
    return {config.ENV_MODEL_DIR: f'{base}/model/',
            config.ENV_CHECKPOINT_DIR: f'{base}/checkpoints/'}


def _output_names(single: dict) -> list[str]:
    """What one process writes, with the export in AIP_MODEL_DIR (model/)."""
    names = set(os.listdir(single['model_dir'])) - {features.EXPORT_DIR}
    return sorted(names | {'model'})


@pytest.fixture(scope='module')
def first_run(prepared, tmp_path_factory) -> dict:
    """Two workers from TF_CONFIG (no chief task: worker 0 is the chief).

    EPOCHS - 1 epochs, laid out as config.yaml runs the trainer (--job-dir is
    the base output dir; AIP_MODEL_DIR, AIP_CHECKPOINT_DIR below it), as a
    tuning trial with TensorBoard.
    """
    root = tmp_path_factory.mktemp('tf-config')
    run = {'base': root / 'base', 'scratch': root / 'scratch',
           'tensorboard': root / 'tensorboard'}
    run['scratch'].mkdir()
    cluster = {'worker': [f'127.0.0.1:{port}' for port in _free_ports(2)]}
    environments = [{
        distribute.ENV_TF_CONFIG: json.dumps(
            {'cluster': cluster, 'task': {'type': 'worker', 'index': index}}),
        **_vertex_layout(run['base']),
        'TMPDIR': str(run['scratch']),
        config.ENV_TENSORBOARD_LOG_DIR: str(run['tensorboard']),
        config.ENV_TRIAL_ID: '7',
        # Separate machines on Vertex AI: each replica has its own /tmp.
        config.ENV_HP_METRIC_FILE: str(root / f'metrics-{index}'),
    } for index in range(2)]
    # Two of the single run's three epochs, keeping the best as trained, with
    # no posterior averaging (the restarted run below refits and averages, as
    # the single run does).
    run['outputs'] = _run_replicas(environments, [
        '--work-dir', prepared, '--job-dir', str(run['base']),
        '--num-epochs', str(EPOCHS - 1), '--final-model', 'best',
        '--posterior-samples', '0', *TRAINER_FLAGS],
        root / 'logs')
    run['metric_files'] = [root / f'metrics-{index}' for index in range(2)]
    return run


def test_two_workers_refuse_implicit_feedback_in_one_line(prepared, tmp_path):
    cluster = {'worker': [f'127.0.0.1:{port}' for port in _free_ports(2)]}
    environments = [{distribute.ENV_TF_CONFIG: json.dumps(
        {'cluster': cluster, 'task': {'type': 'worker', 'index': index}})}
        for index in range(2)]
    outputs = _run_replicas(environments, [
        '--work-dir', prepared, '--job-dir', str(tmp_path / 'model'),
        '--implicit-feedback', *TRAINER_FLAGS], tmp_path / 'logs', exit_code=2)
    for output in outputs:
        errors = [line for line in output.splitlines() if line.startswith('trainer: error:')]
        assert errors == ['trainer: error: --implicit-feedback trains one replica, this '
                          'cluster has 2; drop the flag or train on one machine'], output[-2000:]


def test_two_workers_from_tf_config_train_like_one(first_run, single, prepared):
    outputs, base = first_run['outputs'], first_run['base']
    _assert_same_global_metrics(outputs, list(range(1, EPOCHS)))
    metrics = features.read_json(str(base / features.METRICS_FILE))
    assert (metrics['workers'], metrics['replicas']) == (2, 2)
    assert metrics['ratings_per_second'] > 0
    _assert_matches_single(metrics, single, EPOCHS - 1)
    # Only worker 0, the chief, wrote outputs (what one process writes); the
    # other worker's scratch dir is gone.
    assert sorted(os.listdir(base)) == _output_names(single)
    assert os.listdir(first_run['scratch']) == []
    assert [path.exists() for path in first_run['metric_files']] == [True, False]
    for split in features.SPLITS:
        assert len(os.listdir(first_run['tensorboard'] / split)) == 1
    assert 'eval RMSE' in outputs[0] and 'loss log:' not in outputs[1]

    # The chief exported the model the two workers trained and scored.
    signature = tf.saved_model.load(str(base / 'model')).signatures[export.SIGNATURE]
    assert served_rmse(signature, prepared) == pytest.approx(metrics['eval_rmse'], rel=1e-4)
    rating = signature(user_id=tf.constant(['nobody']),
                       movie_id=tf.constant(['1']))[features.RATING].numpy()
    assert rating.shape == (1,) and 1 <= rating[0] <= 5


def test_restarted_replicas_from_cluster_spec_resume_from_the_chief(
        first_run, single, prepared, tmp_path):
    # Vertex AI restarts every replica (scheduling.restartJobOnWorkerRestart),
    # with CLUSTER_SPEC: the worker's scratch dir is new, so it resumes from
    # the chief's checkpoints in AIP_CHECKPOINT_DIR.
    base = tmp_path / 'base'
    shutil.copytree(first_run['base'], base)
    ports = _free_ports(2)
    pools = {'workerpool0': [f'127.0.0.1:{ports[0]}'],
             'workerpool1': [f'127.0.0.1:{ports[1]}']}
    environments = [{
        distribute.ENV_CLUSTER_SPEC: json.dumps({
            'cluster': pools, 'environment': 'cloud',
            'task': {'type': pool, 'index': 0}}),
        **_vertex_layout(base),
        'TMPDIR': str(tmp_path),
    } for pool in pools]
    outputs = _run_replicas(environments, [
        '--work-dir', prepared, '--job-dir', str(base),
        '--num-epochs', str(EPOCHS), *TRAINER_FLAGS], tmp_path / 'logs')

    _assert_same_global_metrics(outputs, [EPOCHS])
    assert 'chief-0 of 2 workers (chief)' in outputs[0]
    for output in outputs:
        assert f'Resuming from {base}/checkpoints/ckpt-{EPOCHS - 1}' in output
    metrics = features.read_json(str(base / features.METRICS_FILE))
    assert metrics['epochs_this_run'] == 1
    assert metrics['export_dir'] == f'{base}/model'
    _assert_matches_single(metrics, single, EPOCHS)
    assert [row.epoch for row in _loss_log(base)] == list(range(1, EPOCHS + 1))
    assert sorted(os.listdir(base)) == _output_names(single)
    assert sorted(os.listdir(tmp_path)) == ['base', 'logs']
