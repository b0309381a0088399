"""The fit loop: strategy, sparse training step, metrics, loss log, checkpoints.

One epoch is one `tf.function` call that iterates the distributed dataset and
runs the step on every replica with `strategy.run`; gradients are
`tf.IndexedSlices` over the rows the batch touched, summed across replicas
with `all_reduce`, and applied by a sparse optimiser (`trainer.optimizers`).
We own the loop instead of using Keras `fit` so the same code runs under the
default strategy and under MultiWorkerMirroredStrategy (`trainer.distribute`),
where each worker takes its slice of every global batch and the metrics are
summed across workers, so every worker logs the same global numbers.

After each epoch the whole train and eval splits are scored (batched, with
predictions clipped to the rating scale, as served), one row is written to
the loss log and then a checkpoint is saved (model, optimiser slots, epoch).
A re-run with the same model dir restores the last checkpoint and keeps the
loss-log rows up to that epoch (a crash between the two writes leaves one
row too many, which the re-run drops), so the log has exactly one row per
epoch.  Each epoch's shuffle is seeded by (seed, epoch), so a resumed run
repeats the uninterrupted one.  A non-chief worker writes to a scratch copy
of the outputs and resumes from the chief's checkpoints
(`TrainConfig.resume_checkpoint_dir`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import time
from collections.abc import Callable

import tensorflow as tf

from trainer import data
from trainer import features
from trainer import model as model_lib
from trainer import optimizers
from trainer.config import TrainConfig

logger = logging.getLogger(__name__)

_SUM = tf.distribute.ReduceOp.SUM
_CHECKPOINTS_TO_KEEP = 3


class ResumeError(ValueError):
    """The model dir holds a run this one cannot continue; the message says why."""


@dataclasses.dataclass(frozen=True)
class EpochMetrics:
    """One loss-log row; fields are features.LOSS_LOG_COLUMNS.

    Metrics are over the whole split, of predictions clipped to the rating
    scale, after the epoch; `seconds` is the epoch's training time alone.
    """
    epoch: int
    train_mse: float
    train_rmse: float
    train_mae: float
    eval_mse: float
    eval_rmse: float
    eval_mae: float
    seconds: float


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `train` returns.

    Attributes:
      model: the trained model (restored and trained further).
      history: every epoch so far, restored rows included.
      initial_epoch: the epoch the checkpoint held (0 for a fresh start).
      train_seconds: seconds spent in training steps in this run.
      ratings_trained: train ratings processed in this run.
      final: train/eval metrics of the final model.
    """
    model: model_lib.MatrixFactorization
    history: tuple[EpochMetrics, ...]
    initial_epoch: int
    train_seconds: float
    ratings_trained: int
    final: EpochMetrics


def pad_rows(gradient: tf.IndexedSlices, rows: int) -> tf.IndexedSlices:
    """Pads a sparse gradient to `rows` rows with zero values at an out-of-range index.

    MultiWorkerMirroredStrategy all-reduces `tf.IndexedSlices` by
    all-gathering them, and in TF 2.21 a collective inside the epoch's
    while loop keeps one instance key for every iteration, whose shape must
    not change: the smaller last batch failed with "Shape mismatch in the
    collective instance".  Padding every batch to the full per-replica size
    avoids that; `drop_padding` removes the rows again.
    """
    padding = rows - tf.shape(gradient.indices)[0]
    sentinel = tf.cast(gradient.dense_shape[0], gradient.indices.dtype)
    zeros = tf.zeros(tf.concat([[padding], tf.shape(gradient.values)[1:]], 0),
                     gradient.values.dtype)
    return tf.IndexedSlices(
        tf.concat([gradient.values, zeros], 0),
        tf.concat([gradient.indices, tf.fill([padding], sentinel)], 0),
        gradient.dense_shape)


def drop_padding(gradient: tf.IndexedSlices, scale: tf.Tensor) -> tf.IndexedSlices:
    """The rows of `gradient` with an in-range index, times scale."""
    keep = gradient.indices < tf.cast(gradient.dense_shape[0],
                                      gradient.indices.dtype)
    return tf.IndexedSlices(tf.boolean_mask(gradient.values, keep) * scale,
                            tf.boolean_mask(gradient.indices, keep),
                            gradient.dense_shape)


def make_train_epoch(strategy: tf.distribute.Strategy,
                     model: model_lib.MatrixFactorization,
                     optimizer: optimizers.SparseOptimizer, l2: float,
                     l2_bias: float,
                     batch_size: int) -> Callable[[object], tf.Tensor]:
    """Builds the epoch function: distributed dataset -> [objective sum, count].

    Each replica takes its slice of the global batch (at most
    ceil(batch_size / replicas) ratings); the gradients of the summed
    per-example losses and the rating count are summed across replicas, so
    the update is the gradient of the mean over the global batch, exactly,
    however unevenly the last batch splits.
    """
    rows_per_replica = math.ceil(batch_size / strategy.num_replicas_in_sync)

    def step(batch: dict[str, tf.Tensor]) -> tf.Tensor:
        parameters = model.parameters()
        with tf.GradientTape() as tape:
            losses = model_lib.per_example_loss(
                model, batch[features.USER], batch[features.ITEM],
                batch[features.RATING], l2, l2_bias)
            total = tf.reduce_sum(losses)
        gradients = {name: pad_rows(gradient, rows_per_replica)
                     for name, gradient in tape.gradient(total, parameters).items()}
        count, gradients = tf.distribute.get_replica_context().all_reduce(
            _SUM, (tf.cast(tf.size(losses), tf.float32), gradients))
        scale = 1.0 / tf.maximum(count, 1.0)
        optimizer.apply_gradients(
            {name: drop_padding(gradient, scale)
             for name, gradient in gradients.items()}, parameters)
        return tf.stack([tf.reduce_sum(tf.cast(losses, tf.float64)),
                         tf.cast(tf.size(losses), tf.float64)])

    @tf.function
    def train_epoch(batches: object) -> tf.Tensor:
        totals = tf.zeros([2], tf.float64)
        for batch in batches:
            totals += strategy.reduce(
                _SUM, strategy.run(step, args=(batch,)), axis=None)
        return totals

    return train_epoch


def make_evaluate(strategy: tf.distribute.Strategy,
                  model: model_lib.MatrixFactorization, rating_min: float,
                  rating_max: float) -> Callable[[tf.data.Dataset], dict[str, float]]:
    """Builds dataset -> {mse, rmse, mae} of predictions clipped to the scale.

    An empty dataset gives NaN metrics.
    """

    def batch_sums(batch: dict[str, tf.Tensor]) -> tf.Tensor:
        prediction = tf.clip_by_value(
            model(batch[features.USER], batch[features.ITEM]),
            rating_min, rating_max)
        error = tf.cast(prediction - batch[features.RATING], tf.float64)
        return tf.stack([tf.reduce_sum(tf.square(error)),
                         tf.reduce_sum(tf.abs(error)),
                         tf.cast(tf.size(error), tf.float64)])

    @tf.function
    def error_sums(batches: object) -> tf.Tensor:
        sums = tf.zeros([3], tf.float64)
        for batch in batches:
            sums += strategy.reduce(
                _SUM, strategy.run(batch_sums, args=(batch,)), axis=None)
        return sums

    def evaluate(dataset: tf.data.Dataset) -> dict[str, float]:
        squared, absolute, count = (float(total) for total in error_sums(
            strategy.experimental_distribute_dataset(dataset)).numpy())
        if count == 0:
            return {'mse': math.nan, 'rmse': math.nan, 'mae': math.nan}
        return {'mse': squared / count, 'rmse': math.sqrt(squared / count),
                'mae': absolute / count}

    return evaluate


def read_loss_log(path: str) -> tuple[EpochMetrics, ...]:
    """Rows of an existing loss log; () if there is none.

    Raises:
      ResumeError: if the header is not LOSS_LOG_COLUMNS.
    """
    if not tf.io.gfile.exists(path):
        return ()
    with tf.io.gfile.GFile(path) as f:
        reader = csv.reader(f)
        header = tuple(next(reader, ()))
        if header != features.LOSS_LOG_COLUMNS:
            raise ResumeError(
                f'{path} is not a loss log: columns {header!r}, expected '
                f'{features.LOSS_LOG_COLUMNS!r}; re-run the trainer with --overwrite')
        return tuple(EpochMetrics(int(row[0]), *map(float, row[1:]))
                     for row in reader if row)


def write_loss_log(path: str, history: tuple[EpochMetrics, ...]) -> None:
    """Rewrites the whole CSV (object stores cannot append), via a temp file."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator='\n')
    writer.writerow(features.LOSS_LOG_COLUMNS)
    writer.writerows(dataclasses.astuple(row) for row in history)
    tmp = path + '.tmp'
    with tf.io.gfile.GFile(tmp, 'w') as f:
        f.write(text.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)


def clear_outputs(config: TrainConfig) -> None:
    """With --overwrite, removes the model and checkpoint dirs (logged)."""
    if not config.overwrite:
        return
    for directory in dict.fromkeys((config.model_dir, config.checkpoint_dir)):
        if tf.io.gfile.exists(directory):
            logger.warning('--overwrite: removing %s', directory)
            tf.io.gfile.rmtree(directory)


def _check_shapes(path: str, model: model_lib.MatrixFactorization) -> None:
    """Refuses a checkpoint whose tables have other shapes, before restoring."""
    saved = dict(tf.train.list_variables(path))
    for name, variable in model.parameters().items():
        shape = saved.get(f'model/{name}/.ATTRIBUTES/VARIABLE_VALUE')
        if shape is not None and list(shape) != variable.shape.as_list():
            raise ResumeError(
                f'checkpoint {path} holds {name} of shape {list(shape)}, this '
                f'run builds {variable.shape.as_list()} (another --num-factors '
                'or vocabulary); re-run with the original flags or with '
                '--overwrite to start fresh')


def restore(checkpoint: tf.train.Checkpoint, directory: str) -> None:
    """Restores the latest checkpoint in directory, if any, insisting on an exact match.

    Raises:
      ResumeError: if the checkpoint was written with another --optimizer,
        --num-factors or vocabulary, which resuming cannot reconcile.
    """
    path = tf.train.latest_checkpoint(directory)
    if path is None:
        return
    _check_shapes(path, checkpoint.model)
    status = checkpoint.restore(path)
    try:
        status.assert_consumed()
    except AssertionError as error:
        status.expect_partial()  # we report the mismatch ourselves
        raise ResumeError(
            f'checkpoint {path} does not match this optimizer (another '
            '--optimizer?); re-run with the original flags or with '
            '--overwrite to start fresh') from error
    logger.info('Resuming from %s', path)


def _keep_restored_rows(path: str, epoch: int) -> tuple[EpochMetrics, ...]:
    """Loss-log rows up to the restored epoch; later rows are dropped (logged)."""
    history = read_loss_log(path)
    kept = tuple(row for row in history if row.epoch <= epoch)
    if len(kept) < len(history):
        logger.warning('Dropping %d loss-log rows after restored epoch %d',
                       len(history) - len(kept), epoch)
    if [row.epoch for row in kept] != list(range(1, epoch + 1)):
        logger.warning('Loss log %s lacks rows for some of epochs 1..%d',
                       path, epoch)
    return kept


def _epoch_metrics(epoch: int, seconds: float, train: dict[str, float],
                   eval_: dict[str, float]) -> EpochMetrics:
    return EpochMetrics(
        epoch=epoch, train_mse=train['mse'], train_rmse=train['rmse'],
        train_mae=train['mae'], eval_mse=eval_['mse'],
        eval_rmse=eval_['rmse'], eval_mae=eval_['mae'], seconds=seconds)


@dataclasses.dataclass(frozen=True)
class _State:
    """What a checkpoint holds, and its manager."""
    model: model_lib.MatrixFactorization
    optimizer: optimizers.SparseOptimizer
    epoch: tf.Variable
    manager: tf.train.CheckpointManager


_DATA_FILE = 'data.json'
# The DatasetInfo fields that identify the data a checkpoint was trained on.
_DATA_FIELDS = ('dataset', 'source_md5', 'seed', 'eval_percent', 'train_ratings',
                'eval_ratings', 'users', 'movies')


def check_same_data(config: TrainConfig, info: features.DatasetInfo) -> None:
    """Refuses to resume a checkpoint trained on other data; records this data.

    A checkpoint dir remembers which preprocessing output it was trained on
    (checkpoints/data.json).  When preprocess.py re-ran with --overwrite (another
    split seed, another archive), resuming would continue a model fitted to the
    old split and report it against the new one: refused.

    Raises:
      ResumeError: the checkpoints were trained on other data.
    """
    current = {name: getattr(info, name) for name in _DATA_FIELDS}
    resume_dir = config.resume_checkpoint_dir or config.checkpoint_dir
    recorded_path = features.join(resume_dir, _DATA_FILE)
    if (not config.overwrite and tf.train.latest_checkpoint(resume_dir)
            and tf.io.gfile.exists(recorded_path)):
        recorded = features.read_json(recorded_path)
        changed = sorted(name for name in _DATA_FIELDS if recorded.get(name) != current[name])
        if changed:
            raise ResumeError(
                f'the checkpoints in {resume_dir} were trained on other data '
                f'({", ".join(changed)} changed: preprocess.py re-ran?); pass '
                '--overwrite to train afresh, or another --job-dir')
    tf.io.gfile.makedirs(config.checkpoint_dir)
    features.write_json(features.join(config.checkpoint_dir, _DATA_FILE), current)


def _build_state(config: TrainConfig, info: features.DatasetInfo,
                 user_vocab_size: int, item_vocab_size: int,
                 strategy: tf.distribute.Strategy) -> _State:
    """Creates model, optimiser and epoch counter in the strategy scope; restores."""
    with strategy.scope():
        model = model_lib.MatrixFactorization(
            user_vocab_size, item_vocab_size, config.num_factors,
            global_mean=info.train_mean_rating,
            init_stddev=config.init_stddev, seed=config.seed)
        optimizer = optimizers.make_optimizer(
            config.optimizer, model.parameters(), config.learning_rate)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name='epoch',
                            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                     epoch=epoch)
    manager = tf.train.CheckpointManager(
        checkpoint, config.checkpoint_dir, max_to_keep=_CHECKPOINTS_TO_KEEP)
    # With --overwrite nobody resumes: a worker must not read the chief's
    # checkpoints while the chief is removing them.
    if not config.overwrite:
        restore(checkpoint, config.resume_checkpoint_dir or config.checkpoint_dir)
    return _State(model, optimizer, epoch, manager)


def _scored_splits(train_records: tf.data.Dataset, info: features.DatasetInfo,
                   batch_size: int) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """The train and eval splits in file order, for metrics."""
    return (data.make_batches(train_records, batch_size),
            data.make_batches(data.read_records(info.eval_pattern), batch_size))


def train(config: TrainConfig, info: features.DatasetInfo,
          user_vocab_size: int, item_vocab_size: int,
          strategy: tf.distribute.Strategy | None = None,
          on_epoch_end: Callable[[EpochMetrics], None] | None = None
          ) -> TrainResult:
    """Trains (or resumes training) up to config.num_epochs epochs.

    Args:
      config: hyperparameters and directories.
      info: the preprocessing hand-off (file patterns, train mean, scale).
      user_vocab_size: users in the TFT vocabulary, OOV excluded.
      item_vocab_size: movies in the TFT vocabulary, OOV excluded.
      strategy: the distribution strategy; None means the current one (the
        default strategy unless the caller entered another's scope).
      on_epoch_end: called with each new loss-log row, after it is written.

    Returns:
      The model and its metrics.

    Raises:
      FileNotFoundError: if a split has no shards.
      ResumeError: if the checkpoint or loss log does not fit this run.
    """
    strategy = strategy or tf.distribute.get_strategy()
    clear_outputs(config)
    tf.io.gfile.makedirs(config.model_dir)
    check_same_data(config, info)
    state = _build_state(config, info, user_vocab_size, item_vocab_size,
                         strategy)
    initial_epoch = int(state.epoch.numpy())
    log_path = features.join(config.model_dir, features.LOSS_LOG_FILE)
    # A worker resuming from the chief's checkpoints has no earlier rows.
    history = (() if config.resume_checkpoint_dir
               else _keep_restored_rows(log_path, initial_epoch))
    write_loss_log(log_path, history)
    train_records = data.read_records(info.train_pattern)
    scored = _scored_splits(train_records, info, config.eval_batch_size)
    train_epoch = make_train_epoch(strategy, state.model, state.optimizer,
                                   config.l2, config.l2_bias, config.batch_size)
    evaluate = make_evaluate(strategy, state.model, info.rating_min,
                             info.rating_max)
    if initial_epoch >= config.num_epochs:
        logger.info('Checkpoint is at epoch %d >= --num-epochs %d: no training',
                    initial_epoch, config.num_epochs)
    train_seconds, ratings = 0.0, 0
    for number in range(initial_epoch + 1, config.num_epochs + 1):
        batches = data.make_batches(
            train_records, config.batch_size,
            shuffle_seed=data.epoch_seed(config.seed, number),
            shuffle_buffer=config.shuffle_buffer)
        start = time.perf_counter()
        objective, count = train_epoch(
            strategy.experimental_distribute_dataset(batches)).numpy()
        seconds = time.perf_counter() - start
        history += (_epoch_metrics(number, seconds, *map(evaluate, scored)),)
        write_loss_log(log_path, history)  # before the checkpoint: see module doc
        if on_epoch_end is not None:
            on_epoch_end(history[-1])
        state.epoch.assign(number)
        state.manager.save(checkpoint_number=number)
        train_seconds, ratings = train_seconds + seconds, ratings + int(count)
        logger.info(
            'Epoch %d/%d: objective %.4f, train RMSE %.4f, eval RMSE %.4f '
            '(global mean %.4f), %.2f s', number, config.num_epochs,
            objective / max(count, 1.0), history[-1].train_rmse,
            history[-1].eval_rmse, info.global_mean_eval_rmse, seconds)
    last_epoch = int(state.epoch.numpy())
    # Evaluating is collective: decide on what every worker knows alike (the
    # restored epoch), not on the loss log only the chief has.
    final = (history[-1] if last_epoch > initial_epoch
             else _epoch_metrics(last_epoch, 0.0, *map(evaluate, scored)))
    return TrainResult(model=state.model, history=history,
                       initial_epoch=initial_epoch, train_seconds=train_seconds,
                       ratings_trained=ratings, final=final)
