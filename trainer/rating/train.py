"""The fit loop: sparse training step, validation, early stopping, loss log, checkpoints.

The train split is loaded into memory once (`trainer.data`); a seeded share
of it (`--validation-percent`) is set aside as the validation slice, the
rest is what the model is fitted on.  By default (`--training-kernel auto`)
one epoch over a seeded permutation of the fit ratings is one call of the
fused C++ op (`trainer.ops.kernels`) where it applies: one replica, Adam; it
takes the fit columns and the permutation (`fused.epoch_order`, the one
`data.shuffle` applies) and copies the columns into that order itself.  Its
TensorFlow form, which it matches to float32 rounding and which runs
everywhere else, is one `tf.function` call: a `tf.range` loop slices each
global batch, every replica takes its contiguous part of it, computes the
objective's gradient rows by hand (`model.loss_and_gradients`), and the
gradients (`tf.IndexedSlices` over the rows the batch touched) are summed
across replicas with `all_reduce` and applied by a sparse optimiser
(`trainer.rating.optimizers`).  We own the loop instead of using Keras `fit` so the
same code runs under the default strategy and under
MultiWorkerMirroredStrategy (`trainer.distribute`), where the update is the
gradient of the mean over the global batch, exactly.

The loss log's train columns are the running error of the epoch's batches,
measured before each update (free to compute; Keras reports the same); after
each epoch the validation slice and the eval split are scored, with
predictions clipped to the rating scale, as served (by a C++ op where the
fused epoch's library builds and the model has no implicit-feedback term:
`make_scorer`).  Validation is scored in full (it steers early stopping,
and a sample of it moved the chosen epoch on small data:
docs/performance.md); the eval split, only reported, on a fixed
seeded sample of at most --epoch-eval-ratings ratings (500,000: standard
error of the sampled RMSE about RMSE / sqrt(2 x 500,000), 0.0009 at 0.88),
keyed by the split seed, so every epoch and every run of a split scores the
same ratings.  The final model is scored on the whole eval split.  Only the validation
RMSE steers training: the best epoch is the one with the lowest validation
RMSE, its parameters are kept (in the checkpoint too), and training stops
after `--early-stopping-patience` epochs without improvement.  The final
model is then, with `--final-model refit` (the default), a fresh model
trained on the whole train split, validation slice included, for the best
epoch's number of epochs (its own checkpoints under checkpoints/refit/), or
with `--final-model best` the best epoch's parameters as they are.  With
`--posterior-samples` (on by default) the final model's tables are then
replaced by their Bayesian posterior mean given the ratings it was fitted on
(`trainer.rating.posterior`: Gibbs sweeps from the trained model, averaged).  The
eval split is reported, never used to choose.  With `--implicit-feedback`
the model also learns the SVD++-style y table (TensorFlow-ops epoch, one
replica), and the final model is `model.folded`: the plain model with each
user's implicit sum added to their factors, which posterior averaging then
uses as the centre of that user's prior.

After each epoch one row is written to the loss log and then a checkpoint is
saved (model, optimiser slots, epoch, best epoch and its parameters).  A
re-run with the same model dir restores the last checkpoint and keeps the
loss-log rows up to that epoch (a crash between the two writes leaves one
row too many, which the re-run drops), so the log has exactly one row per
epoch.  Each epoch's shuffle is seeded by (seed, epoch), and its learning rate
is --learning-rate x --learning-rate-decay^(epoch - 1), so a resumed run
repeats the uninterrupted one.  A non-chief worker writes to a scratch copy
of the outputs and resumes from the chief's checkpoints
(`TrainConfig.resume_checkpoint_dir`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from trainer import config as config_lib
from trainer import data
from trainer import features
from trainer import history as history_lib
from trainer import phases as phases_lib
from trainer import shutdown
from trainer.config import TrainConfig
from trainer.history import EpochMetrics
from trainer.ops import kernels
from trainer.rating import fused
from trainer.rating import model as model_lib
from trainer.rating import optimizers
from trainer.rating import posterior as posterior_lib
from trainer.rating import state as state_lib
from trainer.rating.state import ResumeError

logger = logging.getLogger(__name__)

_SUM = tf.distribute.ReduceOp.SUM
# An epoch counts as better only if validation RMSE falls by more than this.
_MIN_IMPROVEMENT = 1e-4

__all__ = ['ResumeError', 'Splits', 'TrainResult', 'Unsupported', 'train']


class Unsupported(ValueError):
    """A combination of flags and cluster this trainer does not run; the message names the fix."""


def _refuse_unsupported(implicit_feedback: bool, replicas: int) -> None:
    """Raises Unsupported for implicit feedback on several replicas.

    Its gradient reaches a variable number of y rows per step, which the
    fixed-shape all-reduce of `pad_rows` cannot carry.
    """
    if implicit_feedback and replicas > 1:
        raise Unsupported(f'--implicit-feedback trains one replica, this cluster has '
                          f'{replicas}; drop the flag or train on one machine')


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `train` returns.

    Attributes:
      model: the final model: the best epoch's parameters.
      history: every epoch so far, restored rows included.
      initial_epoch: the epoch the checkpoint held (0 for a fresh start).
      best_epoch: the epoch with the lowest validation RMSE (the last one
        without a validation slice).
      best_validation_rmse: its validation RMSE, what model selection saw.
      refit: the model was retrained on the whole train split for
        best_epoch epochs (--final-model refit); else it holds the best
        epoch's parameters.
      stopped_early: training stopped before --num-epochs (patience ran out).
      train_seconds: seconds spent in training steps in this run.
      ratings_trained: train ratings processed in this run.
      final: metrics of the final model, train_* over its fit ratings;
        validation_* are NaN after a refit (the slice was trained on).
      splits: the ratings in memory, for the evaluations after training.
      posterior: with --posterior-samples, how the averaging went: sweeps,
        seconds, kernel, and `before`, the trained (MAP) model's metrics
        that `final` improves on; None without.
      search_model: the model fitted on the fit ratings alone (the search
        phase's best epoch; the final model when there was no refit): it has
        not seen the validation slice, so the top-N search can choose the
        like weight with it.
    """
    model: model_lib.MatrixFactorization
    history: tuple[EpochMetrics, ...]
    initial_epoch: int
    best_epoch: int
    best_validation_rmse: float
    refit: bool
    stopped_early: bool
    train_seconds: float
    ratings_trained: int
    final: EpochMetrics
    splits: 'Splits'
    posterior: dict[str, Any] | None = None
    search_model: model_lib.MatrixFactorization | None = None

    @property
    def fit_ratings(self) -> int:
        """Ratings the final model is fitted on: all of train after a refit."""
        return len(self.splits.train if self.refit else self.splits.fit)

    @property
    def validation_ratings(self) -> int:
        return len(self.splits.validation)


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


def _scaled(gradient: tf.IndexedSlices, scale: tf.Tensor, padded: bool) -> tf.IndexedSlices:
    if padded:
        return drop_padding(gradient, scale)
    return tf.IndexedSlices(gradient.values * scale, gradient.indices, gradient.dense_shape)


def replica_slice(batch: tf.Tensor, batch_size: int, size: tf.Tensor,
                  replica: tf.Tensor, replicas: int) -> tuple[tf.Tensor, tf.Tensor]:
    """[start, end) of a replica's contiguous part of global batch `batch`.

    The global batch is rows [batch * batch_size, min(that + batch_size, size));
    each replica takes ceil(its length / replicas) rows of it in replica
    order, so the parts cover it exactly (the last ones may be short or empty).
    """
    start = batch * batch_size
    end = tf.minimum(start + batch_size, size)
    part = (end - start + replicas - 1) // replicas
    low = tf.minimum(start + tf.cast(replica, start.dtype) * part, end)
    return low, tf.minimum(low + part, end)


def make_train_epoch(strategy: tf.distribute.Strategy,
                     model: model_lib.MatrixFactorization,
                     optimizer: optimizers.SparseOptimizer, penalty: tf.Tensor,
                     batch_size: int, rating_min: float, rating_max: float,
                     implicit_l2: float = 0.0) -> Callable[..., tf.Tensor]:
    """Builds the epoch function.

    The function takes the epoch's shuffled (user, item, rating) columns and
    the per-row penalty weights (user [U], item [I]), and returns the sums
    [objective, count, squared error, absolute error] over the epoch, errors
    of clipped predictions made before each update.  A model with implicit
    feedback (one replica only) also updates the y rows of every item its
    batch's users rated, with penalty strength implicit_l2.
    """
    replicas = strategy.num_replicas_in_sync
    rows_per_replica = math.ceil(batch_size / replicas)
    _refuse_unsupported(model.implicit_feedback, replicas)

    def step(batch, user, item, rating, user_weights, item_weights):
        context = tf.distribute.get_replica_context()
        low, high = replica_slice(batch, batch_size, tf.size(rating),
                                  context.replica_id_in_sync_group, replicas)
        user, item, rating = user[low:high], item[low:high], rating[low:high]
        user_rows, item_rows = model.gather(user, item)
        if user_weights is None:  # unit weights: skip two gathers
            user_weight = item_weight = 1.0
        else:
            user_weight = tf.gather(user_weights, user)
            item_weight = tf.gather(item_weights, item)
        offset = None
        if model.implicit_feedback:
            distinct, position = tf.unique(user, out_idx=tf.int64)
            terms = model.implicit_terms(distinct)
            offset = tf.gather(terms['offset'], position)
        loss, prediction, user_gradient, item_gradient = model_lib.loss_and_gradients(
            model, user_rows, item_rows, rating, penalty, user_weight, item_weight,
            user_offset=offset)
        parameters = model.parameters()
        gradients = {
            'user_embedding': tf.IndexedSlices(
                user_gradient, user, tf.shape(parameters['user_embedding'], tf.int64)),
            'item_embedding': tf.IndexedSlices(
                item_gradient, item, tf.shape(parameters['item_embedding'], tf.int64))}
        if model.implicit_feedback:
            twice_error = 2.0 * (prediction - rating)[:, None]
            implicit_penalty, gradients[model_lib.IMPLICIT_NAME] = model_lib.implicit_gradient(
                model, terms, position, twice_error * item_rows[:, :model.num_factors],
                implicit_l2)
            loss += implicit_penalty
        count = tf.cast(tf.size(loss), tf.float32)
        if replicas > 1:  # padding only where a collective needs fixed shapes
            count, gradients = context.all_reduce(_SUM, (count, {
                name: pad_rows(gradient, rows_per_replica)
                for name, gradient in gradients.items()}))
        scale = 1.0 / tf.maximum(count, 1.0)  # the mean over the global batch
        optimizer.apply_gradients({name: _scaled(gradient, scale, padded=replicas > 1)
                                   for name, gradient in gradients.items()}, parameters)
        error = tf.cast(tf.clip_by_value(prediction, rating_min, rating_max) - rating,
                        tf.float64)
        return tf.stack([tf.reduce_sum(tf.cast(loss, tf.float64)),
                         tf.cast(tf.size(loss), tf.float64),
                         tf.reduce_sum(tf.square(error)),
                         tf.reduce_sum(tf.abs(error))])

    @tf.function
    def train_epoch(user, item, rating, user_weights, item_weights) -> tf.Tensor:
        size = tf.size(rating)
        totals = tf.zeros([4], tf.float64)
        for batch in tf.range((size + batch_size - 1) // batch_size):
            totals += strategy.reduce(_SUM, strategy.run(
                step, args=(batch, user, item, rating, user_weights, item_weights)),
                axis=None)
        return totals

    return train_epoch


def _why_not_fused(config: TrainConfig, strategy: tf.distribute.Strategy,
                   model: model_lib.MatrixFactorization,
                   optimizer: optimizers.SparseOptimizer) -> str | None:
    """Why the fused op does not apply to this run; None if it does."""
    if config.implicit_feedback:
        return 'it has no implicit-feedback term (--implicit-feedback)'
    if strategy.num_replicas_in_sync > 1:
        return (f'it trains one replica and this cluster has '
                f'{strategy.num_replicas_in_sync}')
    if isinstance(model.user_embedding, tf.distribute.DistributedValues):
        return f'it updates plain variables, not those of {type(strategy).__name__}'
    if not isinstance(optimizer, optimizers.Adam):
        return f'it trains with adam, not --optimizer {config.optimizer}'
    return None


def choose_train_epoch(config: TrainConfig, strategy: tf.distribute.Strategy,
                       model: model_lib.MatrixFactorization,
                       optimizer: optimizers.SparseOptimizer, penalty: tf.Tensor,
                       rating_min: float, rating_max: float) -> Callable[..., tf.Tensor]:
    """The epoch function --training-kernel asks for: fused where it can run.

    The fused op (`trainer.ops.kernels`) trains one replica with Adam; under a
    multi-replica strategy, with another optimiser, or without a compiler,
    'auto' falls back to `make_train_epoch` (and says why) and 'fused' raises.

    Raises:
      kernels.KernelUnavailable: --training-kernel fused, and it cannot run here.
    """
    if config.training_kernel == 'tf':
        logger.info('Training kernel: TensorFlow ops (--training-kernel tf)')
    else:
        reason = _why_not_fused(config, strategy, model, optimizer)
        if reason is None:
            try:
                epoch = fused.make_epoch(model, optimizer, penalty, config.batch_size,
                                         rating_min, rating_max)
                logger.info('Training kernel: fused (one C++ op per epoch, %d threads)',
                            kernels.default_threads())
                return epoch
            except kernels.KernelUnavailable as error:
                reason = str(error)
        if config.training_kernel == 'fused':
            raise kernels.KernelUnavailable(
                f'--training-kernel fused: {reason}; use --training-kernel auto')
        logger.warning('Training kernel: TensorFlow ops, not fused: %s', reason)
    return make_train_epoch(strategy, model, optimizer, penalty, config.batch_size,
                            rating_min, rating_max, implicit_l2=config.implicit_l2 or 0.0)


def make_scorer(model: model_lib.MatrixFactorization, rating_min: float,
                rating_max: float, chunk_size: int, kernel: str = 'tf'
                ) -> Callable[[data.Ratings], dict[str, float]]:
    """Builds Ratings -> {mse, rmse, mae} of predictions clipped to the scale.

    Scores on the calling worker alone (every worker holds every rating, so
    all compute the same numbers without a collective); NaN for no ratings.
    With kernel 'auto' or 'fused' (--training-kernel) a plain model held in
    plain variables is scored by the C++ op (`fused.make_scorer`: the rows
    read in place, two threads), where it builds; otherwise, and with 'tf',
    by TensorFlow ops in chunks of chunk_size ratings.  The two agree to
    float32 rounding of each prediction.
    """
    if (kernel != 'tf' and not model.implicit_feedback
            and not isinstance(model.user_embedding, tf.distribute.DistributedValues)):
        try:
            fused_sums = fused.make_scorer(model, rating_min, rating_max)
        except kernels.KernelUnavailable:
            pass  # the epoch said why, if it was to be fused
        else:
            return _scorer(fused_sums)

    @tf.function
    def error_sums(user, item, rating) -> tf.Tensor:
        size = tf.size(rating)
        sums = tf.zeros([2], tf.float64)
        for start in tf.range(0, size, chunk_size):
            end = tf.minimum(start + chunk_size, size)
            prediction = tf.clip_by_value(
                model(user[start:end], item[start:end]), rating_min, rating_max)
            error = tf.cast(prediction - rating[start:end], tf.float64)
            sums += tf.stack([tf.reduce_sum(tf.square(error)),
                              tf.reduce_sum(tf.abs(error))])
        return sums

    return _scorer(error_sums)


def _scorer(error_sums: Callable[..., Any]) -> Callable[[data.Ratings], dict[str, float]]:
    """Ratings -> RMSE and MAE, from error_sums(user, item, rating) = [sum e^2, sum |e|]."""
    def score(ratings: data.Ratings) -> dict[str, float]:
        if len(ratings) == 0:
            return _metrics(math.nan, math.nan, 0)
        squared, absolute = error_sums(ratings.user, ratings.item, ratings.rating).numpy()
        return _metrics(float(squared), float(absolute), len(ratings))
    return score


def _metrics(squared: float, absolute: float, count: float) -> dict[str, float]:
    if count == 0:
        return {'mse': math.nan, 'rmse': math.nan, 'mae': math.nan}
    return {'mse': squared / count, 'rmse': math.sqrt(squared / count),
            'mae': absolute / count}


def _epoch_metrics(epoch: int, seconds: float, train: dict[str, float],
                   validation: dict[str, float], eval_: dict[str, float]) -> EpochMetrics:
    return EpochMetrics(
        epoch=epoch, train_mse=train['mse'], train_rmse=train['rmse'],
        train_mae=train['mae'], validation_mse=validation['mse'],
        validation_rmse=validation['rmse'], validation_mae=validation['mae'],
        eval_mse=eval_['mse'], eval_rmse=eval_['rmse'], eval_mae=eval_['mae'],
        seconds=seconds)


@dataclasses.dataclass(frozen=True)
class Splits:
    """The ratings a run reads: the train split, fitted on, validated on, reported on."""
    train: data.Ratings
    fit: data.Ratings
    validation: data.Ratings
    eval: data.Ratings


def load_splits(config: TrainConfig, info: features.DatasetInfo) -> Splits:
    """Loads and checks train and eval; carves the validation slice (keyed by the split seed).

    The slice is keyed by preprocess.py's seed, not --seed, so runs that
    differ only in --seed (or in any hyperparameter) validate on the same
    ratings.
    """
    started = time.perf_counter()
    train_ratings, eval_ratings = data.load_checked((info.train_pattern, info.eval_pattern))
    fit, validation = data.split_validation(
        train_ratings, config.validation_percent, info.seed)
    splits = Splits(train_ratings, fit, validation, eval_ratings)
    logger.info('Loaded %d ratings to fit, %d to validate (%.3g%% of train), '
                '%d eval in %.1f s', len(fit), len(validation),
                config.validation_percent, len(splits.eval),
                time.perf_counter() - started)
    return splits


def sampled_rmse_error(sampled: int, total: int, rmse: float = 0.88) -> float:
    """Standard error of the RMSE of `sampled` of `total` ratings drawn at random.

    For errors near normal, Var(e^2) = 2 MSE^2, so by the delta method the
    RMSE of n ratings has standard error RMSE / sqrt(2 n), times the finite
    population correction sqrt(1 - n / total); 0 when all are scored.
    """
    if sampled <= 0 or sampled >= total:
        return 0.0
    return rmse / math.sqrt(2.0 * sampled) * math.sqrt(1.0 - sampled / total)


def epoch_samples(config: TrainConfig, info: features.DatasetInfo,
                  splits: Splits) -> tuple[data.Ratings, data.Ratings]:
    """(validation, eval) ratings scored after each epoch: all of validation, and
    a seeded sample of at most config.epoch_eval_ratings of eval (keyed by the
    split seed, so runs that differ only in --seed score the same ratings)."""
    sample = data.sample(splits.eval, config.epoch_eval_ratings, info.seed)
    if len(sample) < len(splits.eval):
        logger.info('Per-epoch eval RMSE on a seeded sample of %d of its %d ratings '
                    '(--epoch-eval-ratings; standard error about %.4f at RMSE 0.88); '
                    'the final model is scored on all', len(sample), len(splits.eval),
                    sampled_rmse_error(len(sample), len(splits.eval)))
    return splits.validation, sample


def _should_stop(config: TrainConfig, epoch: int, best_epoch: int,
                 has_validation: bool) -> bool:
    """Early stopping: patience epochs passed since the best one."""
    return (has_validation and config.early_stopping_patience > 0
            and epoch - best_epoch >= config.early_stopping_patience)


def _is_better(validation_rmse: float, best_rmse: float) -> bool:
    return math.isfinite(validation_rmse) and validation_rmse < best_rmse - _MIN_IMPROVEMENT


@dataclasses.dataclass
class _Phase:
    """One fit: its state, its compiled epoch and scorer, and what it has done."""
    config: TrainConfig
    state: state_lib.State
    train_epoch: Callable[..., tf.Tensor]
    score: Callable[[data.Ratings], dict[str, float]]
    user_weights: tf.Tensor | None
    item_weights: tf.Tensor | None
    train_seconds: float = 0.0
    ratings: int = 0


def _start_phase(config: TrainConfig, info: features.DatasetInfo,
                 strategy: tf.distribute.Strategy, state: state_lib.State,
                 fit: data.Ratings) -> _Phase:
    """Compiles the epoch and scorer of a built (or restored) state."""
    if config.implicit_feedback:
        state.model.set_implicit_ratings(fit.user, fit.item)
    user_weights = item_weights = None
    if config.l2_frequency_exponent:
        user_weights, item_weights = data.frequency_weights(
            fit, state.model.user_embedding.shape[0],
            state.model.item_embedding.shape[0], config.l2_frequency_exponent)
    train_epoch = choose_train_epoch(
        config, strategy, state.model, state.optimizer,
        model_lib.penalty_weights(config.num_factors, config.l2, config.l2_bias),
        info.rating_min, info.rating_max)
    score = make_scorer(state.model, info.rating_min, info.rating_max,
                        config.eval_batch_size, config.training_kernel)
    return _Phase(config, state, train_epoch, score, user_weights, item_weights)


def _run_epoch(phase: _Phase, fit: data.Ratings, number: int) -> dict[str, float]:
    """Trains one epoch on a seeded shuffle of fit; returns its running metrics.

    The fused epoch takes fit and the shuffle's permutation
    (`fused.epoch_order`, the one `data.shuffle` applies) and copies the
    columns into that order itself; the TensorFlow form trains on
    `data.shuffle`'s copy.
    """
    seed = data.epoch_seed(phase.config.seed, number)
    phase.state.optimizer.learning_rate.assign(
        phase.config.learning_rate * phase.config.learning_rate_decay ** (number - 1))
    if getattr(phase.train_epoch, 'reads_order', False):
        columns = (fit.user, fit.item, fit.rating)
        order = {'order': fused.epoch_order(len(fit), seed)}
    else:
        shuffled = data.shuffle(fit, seed)
        columns, order = (shuffled.user, shuffled.item, shuffled.rating), {}
    start = time.perf_counter()
    objective, count, squared, absolute = phase.train_epoch(
        *columns, phase.user_weights, phase.item_weights, **order).numpy()
    seconds = time.perf_counter() - start
    phase.train_seconds += seconds
    phase.ratings += int(count)
    return {**_metrics(squared, absolute, count), 'seconds': seconds,
            'objective': objective / max(count, 1.0), 'speed': count / max(seconds, 1e-9)}


def train(config: TrainConfig, info: features.DatasetInfo,
          user_vocab_size: int, item_vocab_size: int,
          strategy: tf.distribute.Strategy | None = None,
          on_epoch_end: Callable[[EpochMetrics], None] | None = None,
          phases: phases_lib.PhaseTimes | None = None) -> TrainResult:
    """Trains (or resumes training) up to config.num_epochs epochs, or until stopped early.

    Then, with --final-model refit and a validation slice, trains a fresh
    model on the whole train split for as many epochs as the best one took.

    Args:
      config: hyperparameters and directories (None fields get
        `config.with_data_defaults`).
      info: the preprocessing hand-off (file patterns, train mean, scale).
      user_vocab_size: users in the TFT vocabulary, OOV excluded.
      item_vocab_size: movies in the TFT vocabulary, OOV excluded.
      strategy: the distribution strategy; None means the current one (the
        default strategy unless the caller entered another's scope).
      on_epoch_end: called with each new loss-log row, after it is written.
      phases: where the seconds of loading, the epochs, the refit and the
        posterior go (`trainer.phases`); None keeps them nowhere.

    Returns:
      The final model and its metrics.

    Raises:
      FileNotFoundError: if a split has no shards.
      ResumeError: if the checkpoint or loss log does not fit this run.
      Unsupported: --implicit-feedback on several replicas.
    """
    config = config_lib.with_data_defaults(config, info)
    strategy = strategy or tf.distribute.get_strategy()
    _refuse_unsupported(config.implicit_feedback, strategy.num_replicas_in_sync)
    state_lib.clear_outputs(config)
    tf.io.gfile.makedirs(config.model_dir)
    state_lib.check_same_data(config, info)
    sizes = (user_vocab_size, item_vocab_size)
    # Restore (or refuse) before the minutes of loading a large split.
    state = state_lib.build_state(config, info, *sizes, strategy)
    phases = phases or phases_lib.PhaseTimes()
    with phases.phase('load'):
        splits = load_splits(config, info)
    return _train_loaded(config, info, sizes, strategy, on_epoch_end, phases, state, splits)


def _train_loaded(config: TrainConfig, info: features.DatasetInfo, sizes: tuple[int, int],
                  strategy: tf.distribute.Strategy,
                  on_epoch_end: Callable[[EpochMetrics], None] | None,
                  phases: phases_lib.PhaseTimes, state: state_lib.State,
                  splits: Splits) -> TrainResult:
    """`train` once the splits are loaded: the epochs, the refit, the posterior."""
    started = time.perf_counter()
    search = _start_phase(config, info, strategy, state, splits.fit)
    initial_epoch = int(search.state.epoch.numpy())
    log_path = features.join(config.model_dir, features.LOSS_LOG_FILE)
    # A worker resuming from the chief's checkpoints has no earlier rows.
    history = (() if config.resume_checkpoint_dir
               else history_lib.keep_restored_rows(log_path, initial_epoch))
    history_lib.write_loss_log(log_path, history)
    has_validation = len(splits.validation) > 0
    epoch_validation, epoch_eval = epoch_samples(config, info, splits)
    for number in range(initial_epoch + 1, config.num_epochs + 1):
        if _should_stop(config, number - 1, int(state.best.epoch.numpy()), has_validation):
            break
        running = _run_epoch(search, splits.fit, number)
        row = _epoch_metrics(number, running['seconds'], running,
                             search.score(epoch_validation), search.score(epoch_eval))
        history += (row,)
        with shutdown.writing():
            history_lib.write_loss_log(log_path, history)  # before the checkpoint: see module doc
        if on_epoch_end is not None:
            on_epoch_end(row)
        # Without a validation slice the last epoch is the best.
        if not has_validation or _is_better(row.validation_rmse,
                                            float(state.best.validation_rmse.numpy())):
            state.best.record(number, row.validation_rmse, state.model)
        state.epoch.assign(number)
        with shutdown.writing():
            state.manager.save(checkpoint_number=number)
        logger.info(
            'Epoch %d/%d: objective %.4f, train RMSE %.4f, validation RMSE %.4f '
            '(best %.4f at epoch %d; a gain under %g does not count), eval RMSE %.4f '
            '(global mean %.4f), %.2f s, %.2fM ratings/s', number, config.num_epochs,
            running['objective'], row.train_rmse, row.validation_rmse,
            state.best.validation_rmse.numpy(), state.best.epoch.numpy(), _MIN_IMPROVEMENT,
            row.eval_rmse, info.global_mean_eval_rmse,
            running['seconds'], running['speed'] / 1e6)
        shutdown.check(f'epoch {number}')
    best_epoch, stopped_early = _keep_best(config, state, has_validation)
    phases.add('rating_epochs', time.perf_counter() - started)
    fits = [search]
    if config.final_model == 'refit' and has_validation and best_epoch > 0:
        with phases.phase('refit'):
            fits.append(_refit(config, info, sizes, strategy, splits, best_epoch))
    final_phase = fits[-1]
    final_fit = splits.fit if len(fits) == 1 else splits.train
    # With implicit feedback: the plain model with the implicit sums folded in.
    final_model = model_lib.folded(final_phase.state.model)
    final_score = final_phase.score
    if final_model is not final_phase.state.model:
        final_score = make_scorer(final_model, info.rating_min, info.rating_max,
                                  config.eval_batch_size, config.training_kernel)

    def final_metrics() -> EpochMetrics:
        return _epoch_metrics(
            best_epoch, 0.0, final_score(final_fit),
            # A refit model has seen the validation slice: its score there is in-sample.
            (final_score(splits.validation) if len(fits) == 1
             else _metrics(math.nan, math.nan, 0)),
            final_score(splits.eval))
    final = final_metrics()
    posterior = None
    if config.posterior_samples and best_epoch > 0:
        # Centred on the implicit sums: what the user factors were before any rating.
        prior_mean = (final_phase.state.model.implicit_offsets().numpy()
                      if config.implicit_feedback else None)
        with phases.phase('posterior'):
            posterior = _average_posterior(config, final_model, final_fit, prior_mean,
                                           splits.validation)
            trained, final = final, final_metrics()
        posterior['before'] = dataclasses.asdict(trained)
        validation = ('' if math.isnan(final.validation_rmse) else
                      f'validation RMSE {final.validation_rmse:.4f} (trained model '
                      f'{trained.validation_rmse:.4f}), ')
        logger.info('Posterior mean of %d sweeps: %seval RMSE %.4f (trained model %.4f), '
                    '%.1f s', posterior['samples'], validation, final.eval_rmse,
                    trained.eval_rmse, posterior['seconds'])
    return TrainResult(
        model=final_model, history=history, initial_epoch=initial_epoch,
        best_epoch=best_epoch,
        best_validation_rmse=float(state.best.validation_rmse.numpy()),
        refit=len(fits) > 1, stopped_early=stopped_early,
        train_seconds=sum(fit.train_seconds for fit in fits),
        ratings_trained=sum(fit.ratings for fit in fits),
        final=final, splits=splits, posterior=posterior,
        search_model=(model_lib.folded(search.state.model) if len(fits) > 1
                      else final_model))


def _average_posterior(config: TrainConfig, model: model_lib.MatrixFactorization,
                       ratings: data.Ratings,
                       user_prior_mean: Any = None,
                       validation: data.Ratings | None = None) -> dict[str, Any]:
    """Replaces the model's tables by their posterior mean given ratings
    (the chain stops by its rule on the validation ratings).

    The chain is checkpointed (`state.save_chain`) every
    CHAIN_CHECKPOINT_SECONDS and at SIGTERM, and resumed from its checkpoint.
    """
    path = state_lib.chain_path(config.checkpoint_dir)
    resume = state_lib.load_chain(state_lib.chain_path(
        config.resume_checkpoint_dir or config.checkpoint_dir))
    saved = {'at': time.monotonic(), 'seconds': 0.0}

    def after_sweep(sweep: int, chain: Callable[[], posterior_lib.ChainState],
                    last: bool) -> None:
        since = time.monotonic() - saved['at']
        # The last sweep too: a run stopped later (in the top-N search) keeps the chain.
        due = (since >= max(state_lib.CHAIN_CHECKPOINT_SECONDS,
                            saved['seconds'] / state_lib.CHAIN_CHECKPOINT_SHARE) or last)
        if due or shutdown.requested():
            started = time.monotonic()
            state_lib.save_chain(path, chain())
            saved.update(at=time.monotonic(), seconds=time.monotonic() - started)
            shutdown.check(f'posterior sweep {sweep}')

    start_scale, mc_error = posterior_lib.default_chain(len(ratings))
    if config.posterior_start_scale is not None:
        start_scale = config.posterior_start_scale
    if config.posterior_mc_error is not None:
        mc_error = config.posterior_mc_error
    result = posterior_lib.average(
        model.user_embedding.numpy(), model.item_embedding.numpy(),
        float(model.global_mean.numpy()), ratings.user.numpy(), ratings.item.numpy(),
        ratings.rating.numpy(), samples=config.posterior_samples,
        burn_in=config.posterior_burn_in, seed=config.seed,
        kernel=config.training_kernel, user_prior_mean=user_prior_mean,
        noise=config.posterior_noise, resume=resume, after_sweep=after_sweep,
        validation=(None if validation is None or not len(validation) else
                    (validation.user.numpy(), validation.item.numpy(),
                     validation.rating.numpy())),
        mc_error=mc_error, min_samples=config.posterior_min_samples,
        start_scale=start_scale)
    model.user_embedding.assign(result.user_table)
    model.item_embedding.assign(result.item_table)
    return {'samples': result.samples, 'burn_in': result.burn_in,
            'seconds': result.seconds, 'kernel': result.kernel,
            'noise_std': result.noise_std, 'ratings': len(ratings), 'noise': result.noise,
            'noise_shapes': result.noise_shapes, 'max_samples': config.posterior_samples,
            'min_samples': config.posterior_min_samples, 'stopped_by': result.stopped_by,
            'mc_error': result.mc_error, 'mc_error_level': result.mc_error_level,
            'mc_validation_ratings': result.validation_sample,
            'autocorrelation': result.autocorrelation,
            'start_scale': start_scale}


def _keep_best(config: TrainConfig, state: state_lib.State,
               has_validation: bool) -> tuple[int, bool]:
    """Puts the best epoch's parameters in the search model.

    Returns:
      (the best epoch, whether early stopping ended the search).
    """
    last_epoch = int(state.epoch.numpy())
    best_epoch = int(state.best.epoch.numpy())
    if best_epoch > 0:
        state.best.restore_into(state.model)
    stopped_early = (_should_stop(config, last_epoch, best_epoch, has_validation)
                     and last_epoch < config.num_epochs)
    if stopped_early:
        logger.info('Stopped early: no validation improvement for %d epochs after '
                    'epoch %d', config.early_stopping_patience, best_epoch)
    if best_epoch and best_epoch != last_epoch:
        logger.info('Best epoch by validation: %d (RMSE %.4f)', best_epoch,
                    state.best.validation_rmse.numpy())
    return best_epoch, stopped_early


REFIT_DIR = 'refit'


def _refit(config: TrainConfig, info: features.DatasetInfo, sizes: tuple[int, int],
           strategy: tf.distribute.Strategy, splits: Splits, epochs: int) -> _Phase:
    """Trains a fresh model on the whole train split for `epochs` epochs.

    Checkpoints go to CHECKPOINT_DIR/refit, so an interrupted refit resumes
    too; it writes no loss-log rows (the loss log is the search's, one row
    per epoch).
    """
    refit_config = dataclasses.replace(
        config, num_epochs=epochs,
        checkpoint_dir=features.join(config.checkpoint_dir, REFIT_DIR),
        resume_checkpoint_dir=(features.join(config.resume_checkpoint_dir, REFIT_DIR)
                               if config.resume_checkpoint_dir else None))
    phase = _start_phase(refit_config, info, strategy,
                         state_lib.build_state(refit_config, info, *sizes, strategy),
                         splits.train)
    for number in range(int(phase.state.epoch.numpy()) + 1, epochs + 1):
        running = _run_epoch(phase, splits.train, number)
        phase.state.epoch.assign(number)
        with shutdown.writing():
            phase.state.manager.save(checkpoint_number=number)
        logger.info('Refit on all %d train ratings, epoch %d/%d: train RMSE %.4f, '
                    '%.2f s', len(splits.train), number, epochs, running['rmse'],
                    running['seconds'])
        shutdown.check(f'refit epoch {number}')
    return phase
