"""The cloud path on gs://, against a real GCS emulator on 127.0.0.1 (tests/gcs_emulator.py).

Each step runs as users run it: a subprocess with the emulator's env, its
work dir a gs:// URL and its working directory an empty temp dir that must
stay empty (nothing may land on local disk under a 'gs:' path). The checks
read the bucket back through google-cloud-storage, Beam and TensorFlow in
this process. Small data (5,000 ratings) keeps the file under ~90 s on two
cores.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import gcs_emulator
from conftest import served_rmse
import plot
from trainer import features

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN = 'run'  # the work dir's prefix in the bucket
NUM_RATINGS = 5000
STEP_TIMEOUT_SECONDS = 240
SYNTHETIC_FLAGS = ('--dataset', 'synthetic', '--num-ratings', str(NUM_RATINGS),
                   '--num-users', '100', '--num-movies', '200')


# --- Helpers. --------------------------------------------------------------------------
def run_step(gcs: gcs_emulator.GcsEmulator, cwd: pathlib.Path, *args: str) -> str:
    """Runs `python ARGS` with the emulator's env in the empty dir `cwd`; returns stdout."""
    env = {**gcs.env, 'PYTHONPATH': str(REPO)}
    try:
        result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                                text=True, timeout=STEP_TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f'{args[0]} took over {STEP_TIMEOUT_SECONDS} s\n{gcs.log_tail()}')
    gcs.check_alive()
    assert result.returncode == 0, (f'{" ".join(args)} exited {result.returncode}\n'
                                    f'{result.stdout[-2000:]}\n{result.stderr[-4000:]}\n'
                                    f'{gcs.log_tail()}')
    assert not any(cwd.iterdir()), f'{args[0]} wrote locally: {sorted(cwd.iterdir())}'
    return result.stdout


def storage_client():
    """A google-cloud-storage client; STORAGE_EMULATOR_HOST points it at the emulator."""
    from google.cloud import storage  # pylint: disable=import-outside-toplevel
    return storage.Client()


def object_names(gcs: gcs_emulator.GcsEmulator, prefix: str) -> set[str]:
    """Names of the objects under PREFIX/, relative to it, without directory markers."""
    prefix = prefix.rstrip('/') + '/'
    return {blob.name[len(prefix):] for blob in storage_client().list_blobs(gcs.bucket, prefix=prefix)
            if not blob.name.endswith('/')}


def read_object(gcs: gcs_emulator.GcsEmulator, name: str) -> bytes:
    return storage_client().bucket(gcs.bucket).blob(name).download_as_bytes()


# --- The chain, one module fixture per step. -----------------------------------------
@pytest.fixture(scope='module')
def staged(gcs, tmp_path_factory) -> str:
    work_dir = gcs.url(RUN)
    run_step(gcs, tmp_path_factory.mktemp('extract-cwd'), str(REPO / 'data-extractor.py'),
             '--work-dir', work_dir, *SYNTHETIC_FLAGS)
    return work_dir


@pytest.fixture(scope='module')
def preprocessed(gcs, staged, tmp_path_factory) -> str:
    run_step(gcs, tmp_path_factory.mktemp('preprocess-cwd'), str(REPO / 'preprocess.py'),
             '--work-dir', staged)
    return staged


@pytest.fixture(scope='module')
def trained(gcs, preprocessed, tmp_path_factory) -> str:
    stdout = run_step(gcs, tmp_path_factory.mktemp('train-cwd'), '-m', 'trainer.task',
                      '--work-dir', preprocessed, '--num-epochs', '2')
    assert 'eval RMSE' in stdout
    return preprocessed


# --- The emulator itself. ------------------------------------------------------------
def test_tensorflow_beam_and_the_storage_client_see_the_same_bucket(gcs):
    from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
    with tf.io.gfile.GFile(gcs.url('check/by-tf.txt'), 'w') as f:
        f.write('written by TensorFlow')
    storage_client().bucket(gcs.bucket).blob('check/by-client.txt').upload_from_string(
        b'written by google-cloud-storage')
    # Beam renames with a batch copy and a batch delete, through the proxy's repair.
    FileSystems.rename([gcs.url('check/by-tf.txt')], [gcs.url('check/moved-by-beam.txt')])

    assert object_names(gcs, 'check') == {'by-client.txt', 'moved-by-beam.txt'}
    assert read_object(gcs, 'check/moved-by-beam.txt') == b'written by TensorFlow'
    with tf.io.gfile.GFile(gcs.url('check/by-client.txt'), 'rb') as f:
        assert f.read() == b'written by google-cloud-storage'
    assert sorted(tf.io.gfile.glob(gcs.url('check/*.txt'))) == [
        gcs.url('check/by-client.txt'), gcs.url('check/moved-by-beam.txt')]


def test_a_context_manager_emulator_stops_its_processes_and_restores_the_env(gcs):
    outer_endpoint = os.environ['STORAGE_EMULATOR_HOST']
    with gcs_emulator.GcsEmulator(bucket='second-bucket') as inner:
        pids = [inner.emulator_pid, inner.proxy_pid]
        assert os.environ['STORAGE_EMULATOR_HOST'] == inner.endpoint != outer_endpoint
        assert inner.client_env()['HTTPS_PROXY'] == inner.endpoint
    assert os.environ['STORAGE_EMULATOR_HOST'] == outer_endpoint
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_watchdog_stops_a_hung_emulator():
    with gcs_emulator.GcsEmulator(bucket='hung-bucket', hang_seconds=0.5,
                                  probe_seconds=0.2) as emulator:
        os.kill(emulator.emulator_pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while emulator.failure is None and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(gcs_emulator.EmulatorError, match='did not answer'):
            emulator.check_alive()
        assert emulator.emulator_pid is None and emulator.proxy_pid is None


def test_batch_parts_without_a_content_id_get_one():
    body = (b'--b1\nContent-Type: application/http\n\nDELETE /storage/v1/b/x/o/1 HTTP/1.1\n\n\n'
            b'--b1\nContent-Type: application/http\nContent-ID: <kept>\n\n'
            b'DELETE /storage/v1/b/x/o/2 HTTP/1.1\n\n\n--b1--\n')
    repaired = gcs_emulator.add_batch_content_ids(body, 'multipart/mixed; boundary="b1"')
    assert repaired.count(b'Content-ID:') == 2
    assert b'Content-ID: <kept>' in repaired
    assert repaired.replace(b'\nContent-ID: <part-1>', b'', 1) == body


@pytest.mark.parametrize('path, expected', [
    ('/bkt/a%2Fb%20c.txt', '/download/storage/v1/b/bkt/o/a%2Fb%20c.txt?alt=media'),
    ('/bkt/plain', '/download/storage/v1/b/bkt/o/plain?alt=media'),
])
def test_tensorflow_reads_become_json_api_downloads(path, expected):
    assert gcs_emulator.storage_read_to_json_api(path) == expected


@pytest.mark.parametrize('method, path, bucket', [
    ('GET', '/storage/v1/b/bkt/storageLayout', 'bkt'),
    ('GET', '/storage/v1/b/bkt/o/storageLayout', None),  # an object of that name
    ('POST', '/storage/v1/b/bkt/storageLayout', None),
])
def test_only_storage_layout_requests_are_answered_by_the_proxy(method, path, bucket):
    assert gcs_emulator.storage_layout_bucket(method, path) == bucket


# --- The workflow on gs://. ------------------------------------------------------------
def test_extractor_stages_raw_files_in_the_bucket(gcs, staged):
    raw = f'{RUN}/{features.RAW_DIR}'
    layout = features.ML_100K
    assert object_names(gcs, raw) == {
        features.SOURCE_FILE, features.TRUTH_FILE, layout.ratings_file, layout.movies_file}
    source = json.loads(read_object(gcs, f'{raw}/{features.SOURCE_FILE}'))
    assert source['dataset'] == features.SYNTHETIC
    ratings = read_object(gcs, f'{raw}/{layout.ratings_file}').decode().splitlines()
    assert len(ratings) == NUM_RATINGS


def test_preprocess_writes_tfrecords_transform_fn_and_info_to_the_bucket(gcs, preprocessed):
    transformed = f'{RUN}/{features.TRANSFORMED_DIR}'
    names = object_names(gcs, transformed)
    assert {features.DATASET_INFO_FILE, 'transform_fn/saved_model.pb',
            'transformed_metadata/schema.pbtxt'} <= names
    # Nothing else at the top: Beam's temp files and our tmp/ were deleted in the bucket.
    top_level = {name.split('/')[0] for name in names}
    shards = {name for name in top_level if name.endswith(features.TFRECORD_SUFFIX)}
    assert top_level - shards == {features.DATASET_INFO_FILE, 'transform_fn',
                                  'transformed_metadata', features.REJECTED_DIR}
    assert {shard.split('-')[0] for shard in shards} == set(features.SPLITS)
    info = features.read_dataset_info(preprocessed)
    assert info.rows_read == NUM_RATINGS
    assert info.train_ratings + info.eval_ratings == info.rows_accepted
    for split, expected in ((features.TRAIN, info.train_ratings),
                            (features.EVAL, info.eval_ratings)):
        shards = tf.io.gfile.glob(features.split_pattern(preprocessed, split))
        assert shards and all(shard.startswith(gcs.url(transformed)) for shard in shards)
        records = tf.data.TFRecordDataset(shards, compression_type='GZIP')
        assert int(records.reduce(0, lambda count, _: count + 1)) == expected


def test_plot_reads_a_loss_log_from_the_bucket(gcs, tmp_path, capsys):
    model_dir = 'plot-only/model'
    bucket = storage_client().bucket(gcs.bucket)
    log = io.StringIO()
    writer = csv.writer(log)
    writer.writerow(features.LOSS_LOG_COLUMNS)
    writer.writerows([(1, 1.2, 1.095, 0.9, 1.21, 1.1, 0.93, 1.3, 1.14, 0.95, 0.5),
                      (2, 0.9, 0.949, 0.75, 0.98, 0.99, 0.79, 1.0, 1.0, 0.8, 0.4)])
    bucket.blob(f'{model_dir}/{features.LOSS_LOG_FILE}').upload_from_string(log.getvalue())
    bucket.blob(f'{model_dir}/{features.METRICS_FILE}').upload_from_string(
        json.dumps({'dataset': 'synthetic', 'global_mean_eval_rmse': 1.1}))
    out = tmp_path / 'loss.png'

    assert plot.main(['--model-dir', gcs.url(model_dir), '--out', str(out)]) == 0

    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    stdout = capsys.readouterr().out
    assert f'read 2 epochs from {gcs.url(model_dir)}/{features.LOSS_LOG_FILE}' in stdout
    assert 'last epoch eval RMSE 1.0000' in stdout


def test_trainer_reads_and_exports_through_the_bucket(gcs, trained):
    model_dir = f'{RUN}/{features.MODEL_DIR}'
    names = object_names(gcs, model_dir)
    assert {features.LOSS_LOG_FILE, features.METRICS_FILE,
            f'{features.EXPORT_DIR}/saved_model.pb'} <= names
    assert any(name.startswith(f'{features.CHECKPOINT_DIR}/') for name in names)
    log = plot.read_loss_log(gcs.url(f'{model_dir}/{features.LOSS_LOG_FILE}'))
    assert log.epochs == [1, 2]
    metrics = json.loads(read_object(gcs, f'{model_dir}/{features.METRICS_FILE}'))
    assert metrics['epochs'] == 2 and np.isfinite(metrics['eval_rmse'])
    assert metrics['export_dir'] == gcs.url(f'{model_dir}/{features.EXPORT_DIR}')

    # The export read back from the bucket serves the model metrics.json scored.
    model = tf.saved_model.load(gcs.url(f'{model_dir}/{features.EXPORT_DIR}'))
    signature = model.signatures['serving_default']
    assert served_rmse(signature, trained) == pytest.approx(metrics['eval_rmse'], rel=1e-4)
    rating = signature(user_id=tf.constant(['no-such-user']),
                       movie_id=tf.constant(['1']))['rating'].numpy()
    info = features.read_dataset_info(trained)
    assert info.rating_min <= rating[0] <= info.rating_max
