"""Tests of trainer/reporting.py: TensorBoard scalars and the tuning-metric file."""

from __future__ import annotations

import json

import pytest
import tensorflow as tf
import yaml
from tensorflow.core.util import event_pb2

from conftest import REPO
from trainer import features, history, reporting


def test_the_tuning_metric_is_the_study_metric_and_a_loss_log_column():
    study = yaml.safe_load((REPO / 'hptuning.yaml').read_text(encoding='utf-8'))
    assert [metric['metricId'] for metric in study['studySpec']['metrics']] == [
        features.TUNING_METRIC_ID]
    assert features.TUNING_METRIC_ID in features.LOSS_LOG_COLUMNS


def test_the_metric_file_has_cloudml_hypertunes_line_and_is_rewritten(tmp_path):
    path = tmp_path / 'hypertune' / 'output.metrics'
    reporting.report_tuning_metric(str(path), 0.5, 3, '12', 1700000000.5)
    reporting.report_tuning_metric(str(path), 0.875, 4, '12', 1700000001.0)
    # What cloudml-hypertune 0.1.0.dev6 writes for the same report.
    assert path.read_text(encoding='utf-8') == (
        '{"checkpoint_path": "", "global_step": "4", '
        '"timestamp": 1700000001.0, "trial": "12", "validation_rmse": "0.875"}\n')


def test_without_a_trial_id_the_trial_is_zero():
    assert json.loads(reporting.tuning_metric_line(1.0, 2, None, 0.0))['trial'] == '0'


def test_no_log_dir_means_no_callback():
    with reporting.epoch_summaries(None) as on_epoch_end:
        assert on_epoch_end is None


def test_each_epoch_adds_train_validation_and_eval_scalars(tmp_path):
    row = history.EpochMetrics(epoch=2, train_mse=0.81, train_rmse=0.9, train_mae=0.7,
                             validation_mse=0.9, validation_rmse=0.95, validation_mae=0.75,
                             eval_mse=1.0, eval_rmse=1.0, eval_mae=0.8, seconds=1.0)
    with reporting.epoch_summaries(str(tmp_path)) as on_epoch_end:
        on_epoch_end(row)
    expected = {features.TRAIN: (0.9, 0.7), reporting.VALIDATION: (0.95, 0.75),
                features.EVAL: (1.0, 0.8)}
    assert set(expected) == {*features.SPLITS, reporting.VALIDATION}
    for split, (rmse, mae) in expected.items():
        [events] = (tmp_path / split).glob('events.out.tfevents.*')
        assert _scalars(events) == {'rmse': (2, pytest.approx(rmse)),
                                    'mae': (2, pytest.approx(mae))}


def _scalars(path) -> dict[str, tuple[int, float]]:
    """Each scalar in a TensorBoard event file: tag -> (step, value), as TensorBoard reads it."""
    scalars = {}
    for record in tf.data.TFRecordDataset(str(path)):
        event = event_pb2.Event.FromString(record.numpy())
        for value in event.summary.value:
            assert value.metadata.plugin_data.plugin_name == 'scalars'
            scalars[value.tag] = (event.step, float(tf.make_ndarray(value.tensor)))
    return scalars
