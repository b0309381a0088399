"""What the chief reports to Vertex AI besides its files: TensorBoard scalars and the tuning metric.

- TensorBoard (`AIP_TENSORBOARD_LOG_DIR`): after each epoch, the scalars
  `rmse` and `mae` under the runs `train/`, `validation/` and `eval/`, so
  TensorBoard draws them in one chart per metric; the step is the epoch.  They are
  written with `tf.summary.write` and the scalar plugin's metadata, which is
  what `tf.summary.scalar` writes: that one needs the `tensorboard` package,
  which the training image does not install.
- Hyperparameter tuning: the final model's validation RMSE as metric
  `validation_rmse`, or with --tuning-metric validation_ndcg the top-N
  model's best validation NDCG@10 (never the eval split's: the tuning
  service chooses by it), written the way cloudml-hypertune 0.1.0.dev6 writes it (the file
  Vertex AI's tuning service reads): one JSON object per line, keys sorted,
  values as strings except the timestamp, e.g.

      {"checkpoint_path": "", "global_step": "12", "timestamp": 1700000000.0,
       "trial": "3", "validation_rmse": "0.93"}

  cloudml-hypertune rewrites the whole file with the reports of the current
  process; so does `report_tuning_metric`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator

import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from trainer import features
from trainer.history import EpochMetrics

# The TensorBoard run of the validation slice.
VALIDATION = 'validation'

# TensorBoard's scalar plugin (tensorboard/plugins/scalar/metadata.py).
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars'),
    data_class=summary_pb2.DATA_CLASS_SCALAR)


def write_epoch_summaries(writers: dict[str, tf.summary.SummaryWriter],
                          row: EpochMetrics) -> None:
    """Writes one epoch's RMSE and MAE to the train and eval writers."""
    values = {features.TRAIN: (row.train_rmse, row.train_mae),
              VALIDATION: (row.validation_rmse, row.validation_mae),
              features.EVAL: (row.eval_rmse, row.eval_mae)}
    for split, (rmse, mae) in values.items():
        with writers[split].as_default(step=row.epoch):
            for tag, value in (('rmse', rmse), ('mae', mae)):
                tf.summary.write(tag, tf.constant(value, tf.float32),
                                 metadata=_SCALAR_METADATA)
        writers[split].flush()


@contextlib.contextmanager
def epoch_summaries(log_dir: str | None
                    ) -> Iterator[Callable[[EpochMetrics], None] | None]:
    """An on_epoch_end callback writing TensorBoard scalars under log_dir.

    Yields None when log_dir is None; closes the writers on exit.
    """
    if log_dir is None:
        yield None
        return
    writers = {split: tf.summary.create_file_writer(features.join(log_dir, split))
               for split in (*features.SPLITS, VALIDATION)}
    try:
        yield lambda row: write_epoch_summaries(writers, row)
    finally:
        for writer in writers.values():
            writer.close()


def tuning_metric_line(value: float, global_step: int, trial_id: str | None,
                       timestamp: float, metric_id: str = features.TUNING_METRIC_ID) -> str:
    """One line of the metric file, as cloudml-hypertune 0.1.0.dev6 writes it."""
    return json.dumps({
        'timestamp': timestamp,
        'trial': str(trial_id or 0),
        metric_id: str(float(value)),
        'global_step': str(int(global_step)),
        'checkpoint_path': '',
    }, sort_keys=True) + '\n'


def report_tuning_metric(path: str, value: float, global_step: int,
                         trial_id: str | None, timestamp: float,
                         metric_id: str = features.TUNING_METRIC_ID) -> None:
    """Writes the metric file in place, as cloudml-hypertune does.

    The path is local: the tuning service reads it on this machine.
    """
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        f.write(tuning_metric_line(value, global_step, trial_id, timestamp, metric_id))
