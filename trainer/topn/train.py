"""The top-N model's training run: iALS iterations, validation by NDCG@10, refit, resume.

`trainer.topn.ials` owns the maths; this module runs it the way `trainer.rating.train`
runs the rating model, so both follow one protocol:

- search: iterations on the fit ratings (train minus the validation slice);
  after each, the validation slice is ranked (`ranking.evaluate_lists`:
  candidates are the movies a user did not rate in the fit ratings, relevant
  are the user's validation movies rated >= 4) and its NDCG@10 logged: on a
  seeded sample (keyed by the split seed, the same users every iteration) of
  at most --topn-validation-users users (5,000) and VALIDATION_CELLS users x
  movies (200M: 3,387 users at 25M, where ranking them took 0.43 s against
  9.1 s of solves; docs/performance.md#per-epoch-evaluation);
  training stops after `--early-stopping-patience` iterations without a
  better NDCG, or at `--topn-iterations`;
- refit (`--final-model refit`, with a validation slice): a fresh model on
  the whole train split for the best iteration count; otherwise the best
  iteration's factors are kept.

Every iteration is deterministic (full-batch alternating solves from seeded
factors), so after each one the state (phase, iteration, factors, the best
iteration so far) is written to CHECKPOINT_DIR/topn/state.npz (temp file,
then rename) and a killed run resumes where it stopped and ends with the
same factors.  One row per search iteration goes to topn_log.csv: the
objective L of `ials.py`, exact (its rated part summed by the C++ op in the
iteration's last half-step, `ials_solve.cc`; by a pass over the pairs in
TensorFlow ops without it), the validation NDCG@10 and the solves' seconds.

In a multi-worker cluster every worker computes the same factors (the
solves are not split across workers); only the chief's are kept.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import time

import numpy as np
import tensorflow as tf

from trainer import config as config_lib
from trainer import data
from trainer import features
from trainer import fileio
from trainer import shutdown
from trainer.config import TrainConfig
from trainer.history import ResumeError
from trainer.ops import kernels
from trainer.topn import catalog as catalog_lib
from trainer.topn import ials
from trainer.topn import ranking

logger = logging.getLogger(__name__)

_STATE_FILE = 'state.npz'
_SEARCH, _REFIT = 'search', 'refit'
# Seeds the two initial tables apart from the rating model's streams.
_USER_STREAM, _ITEM_STREAM = 0x1A15, 0x1A16
# An iteration counts as better only if validation NDCG grows by more than this.
_MIN_IMPROVEMENT = 1e-4
# Validation ranks at most this many users x movies after each iteration (with
# --topn-validation-users above 0): ranking costs about in proportion to it.
VALIDATION_CELLS = 200_000_000


@dataclasses.dataclass(frozen=True)
class TopNResult:
    """What `train` returns.

    Attributes:
      user_factors: [users + OOV, k] float32; OOV rows are zero.
      item_factors: [movies + OOV, k] float32.
      iterations: the iterations of the final factors.
      best_validation_ndcg: NDCG@10 on the validation slice at that
        iteration (NaN without a slice).
      refit: the final factors were refitted on the whole train split.
      seconds: seconds spent in iterations in this run.
      history: (iteration, objective, validation NDCG, seconds) per search iteration.
      refit_seconds: of this run's seconds, those of the refit's iterations.
      validation_seconds: seconds spent ranking the validation slice in this run
        (beside `seconds`).
    """
    user_factors: np.ndarray
    item_factors: np.ndarray
    iterations: int
    best_validation_ndcg: float
    refit: bool
    seconds: float
    history: tuple[tuple[int, float, float, float], ...]
    refit_seconds: float = 0.0
    validation_seconds: float = 0.0


@dataclasses.dataclass
class _State:
    phase: str
    iteration: int
    user_factors: np.ndarray
    item_factors: np.ndarray
    best_iteration: int = 0
    best_ndcg: float = -math.inf
    history: list = dataclasses.field(default_factory=list)
    # The best iteration's factors, kept in memory (not checkpointed).
    best_factors: tuple[np.ndarray, np.ndarray] | None = None


def _state_path(config: TrainConfig) -> str:
    return features.join(config.checkpoint_dir, features.TOPN_CHECKPOINT_DIR, _STATE_FILE)


def _save(config: TrainConfig, state: _State) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, phase=state.phase, iteration=state.iteration,
             user_factors=state.user_factors, item_factors=state.item_factors,
             best_iteration=state.best_iteration, best_ndcg=state.best_ndcg,
             history=np.asarray(state.history, np.float64).reshape(-1, 4))
    path = _state_path(config)
    fileio.makedirs(path.rsplit('/', 1)[0])
    with shutdown.writing():
        with fileio.open_file(path + '.tmp', 'wb') as f:
            f.write(buffer.getvalue())
        fileio.replace(path + '.tmp', path)


def _fresh(config: TrainConfig, phase: str, shape: tuple[int, int]) -> _State:
    return _State(phase, 0,
                  ials.initial_factors(shape[0], config.topn_factors, config.seed,
                                       _USER_STREAM, config.topn_init_stddev),
                  ials.initial_factors(shape[1], config.topn_factors, config.seed,
                                       _ITEM_STREAM, config.topn_init_stddev))


def _restore(config: TrainConfig, shape: tuple[int, int]) -> _State | None:
    path = _state_path(config)
    if not fileio.exists(path):
        return None
    with fileio.open_file(path, 'rb') as f:
        saved = np.load(io.BytesIO(f.read()))
        state = _State(str(saved['phase']), int(saved['iteration']),
                       saved['user_factors'], saved['item_factors'],
                       int(saved['best_iteration']), float(saved['best_ndcg']),
                       [tuple(row) for row in saved['history']])
    found = (state.user_factors.shape[0], state.item_factors.shape[0],
             state.user_factors.shape[1])
    if found != (*shape, config.topn_factors):
        raise ResumeError(
            f'{path} holds a top-N model of {found[0]} users, {found[1]} movies and '
            f'{found[2]} factors, this run wants {shape[0]}, {shape[1]} and '
            f'{config.topn_factors}; pass --overwrite or another --job-dir')
    logger.info('Resuming the top-N model: %s, iteration %d', state.phase, state.iteration)
    return state


@dataclasses.dataclass(frozen=True)
class UserSample:
    """Ratings of a seeded share of the users, fitted in place of all of them (the
    top-N search at large data, `search.user_sample`).

    A movie's rated pairs and its unobserved pull (alpha0 P^T P) then shrink by
    about `share`, its ridge does not: each movie row's ridge is set to share x
    its penalty on the whole split (`item_counts`), so its normal equations are
    share x the whole data's in expectation and a point's ridge means on the
    sample what it means on all users.  Users' rows are as on the whole data.

    Attributes:
      share: the expected share of users (so of each movie's ratings) kept.
      item_counts: rated pairs of each movie row in the whole split [movie rows].
    """
    share: float
    item_counts: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Side:
    """One side's rated pairs grouped by its rows, for the C++ op."""
    offsets: np.ndarray
    other: np.ndarray
    weight: np.ndarray
    target: np.ndarray

    @classmethod
    def group(cls, rows: np.ndarray, other: np.ndarray, weight: np.ndarray,
              target: np.ndarray, num_rows: int) -> '_Side':
        order = np.argsort(rows, kind='stable')
        offsets = np.zeros(num_rows + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=num_rows), out=offsets[1:])
        return cls(offsets, other[order].astype(np.int32), weight[order], target[order])


class _Iterator:
    """Alternating half-steps over one split's rated pairs: with the C++ op
    (`ials_solve.cc`) where it builds, else `ials.half_step` in TensorFlow ops."""

    def __init__(self, config: TrainConfig, ratings: data.Ratings,
                 shape: tuple[int, int], sample: UserSample | None = None) -> None:
        self.config = config
        users, items = ratings.user.numpy(), ratings.item.numpy()
        self.users, self.items = tf.constant(users, tf.int64), tf.constant(items, tf.int64)
        weight, target = ials.pair_weights(ratings.rating.numpy(), config.topn_confidence,
                                           config.topn_target, config.topn_unobserved_weight)
        self.weight, self.target = tf.constant(weight), tf.constant(target)

        def penalties(indices: np.ndarray, rows: int, other_side: int) -> tf.Tensor:
            # Over the vocabulary's rows (OOV rows excluded from the count).
            return tf.constant(ials.row_penalties(
                np.bincount(indices, minlength=rows), config.topn_l2,
                config.topn_l2_exponent, config.topn_unobserved_weight, other_side))
        vocabulary = [rows - features.NUM_OOV_BUCKETS for rows in shape]
        self.user_l2 = penalties(users, shape[0], vocabulary[1])
        self.item_l2 = penalties(items, shape[1], vocabulary[0])
        if sample is not None:  # the whole split's movie penalties, times the share kept
            self.item_l2 = tf.constant(sample.share * ials.row_penalties(
                sample.item_counts, config.topn_l2, config.topn_l2_exponent,
                config.topn_unobserved_weight, vocabulary[0]))
        # Rows without rated pairs (OOV rows, users only in the validation
        # slice) solve to zero; set them so exactly, not as CG leaves them.
        self.user_rated = np.bincount(users, minlength=shape[0])[:, None] > 0
        self.item_rated = np.bincount(items, minlength=shape[1])[:, None] > 0
        self.ops = _solver_ops(config)
        # (user factors, movie factors, their rated loss or None) after the last step.
        self._rated_loss: tuple[np.ndarray, np.ndarray, float | None] | None = None
        # P^T P (float64) of the user factors of the last movie half-step with its loss.
        self._fixed_gram: np.ndarray | None = None
        if self.ops is not None:
            self.sides = (_Side.group(users, items, weight, target, shape[0]),
                          _Side.group(items, users, weight, target, shape[1]))

    def _solve(self, side: int, solved: np.ndarray, fixed: np.ndarray,
               with_loss: bool = False) -> tuple[np.ndarray, float | None]:
        """The side's new factors, and with_loss (C++ op only) their rated loss."""
        config = self.config
        l2 = (self.user_l2, self.item_l2)[side]
        rated_loss = None
        if self.ops is None:
            rows, columns = (self.users, self.items) if side == 0 else (self.items, self.users)
            out = ials.half_step(tf.constant(solved), tf.constant(fixed), rows, columns,
                                 self.weight, self.target, l2,
                                 config.topn_unobserved_weight, config.topn_cg_steps).numpy()
        else:
            pairs = self.sides[side]
            fixed_gram = fixed.T.astype(np.float64) @ fixed
            if with_loss:  # the objective's unobserved pull needs it too
                self._fixed_gram = fixed_gram
            gram = config.topn_unobserved_weight * fixed_gram
            out, loss = self.ops.implicit_als_solve_rows(
                offsets=pairs.offsets, other=pairs.other, weight=pairs.weight,
                target=pairs.target, other_table=fixed, gram=gram.astype(np.float32),
                l2=l2, start=solved, cg_steps=config.topn_cg_steps,
                threads=kernels.default_threads(), with_loss=with_loss)
            out = out.numpy()
            if with_loss:
                rated_loss = float(np.sum(loss.numpy()))
        rated = self.user_rated if side == 0 else self.item_rated
        # (rows without rated pairs add nothing to the loss, zeroed or not)
        return np.where(rated, out, 0.0).astype(np.float32), rated_loss

    def step(self, state: _State) -> float:
        started = time.perf_counter()
        state.user_factors, _ = self._solve(0, state.user_factors, state.item_factors)
        state.item_factors, rated_loss = self._solve(1, state.item_factors, state.user_factors,
                                                     with_loss=True)
        state.iteration += 1
        self._rated_loss = (state.user_factors, state.item_factors, rated_loss)
        return time.perf_counter() - started

    def objective(self, state: _State) -> float:
        """L of the state's factors (`ials.py`): its rated part from the last step's
        C++ half-step where that solved these factors, else by a pass over the pairs."""
        user_l2, item_l2 = self.user_l2.numpy(), self.item_l2.numpy()
        alpha0 = self.config.topn_unobserved_weight
        last = self._rated_loss
        if (last is not None and last[2] is not None and last[0] is state.user_factors
                and last[1] is state.item_factors):
            return ials.objective_from_rated(last[2], state.user_factors, state.item_factors,
                                             user_l2, item_l2, alpha0, self._fixed_gram)
        return ials.objective(state.user_factors, state.item_factors, self.users.numpy(),
                              self.items.numpy(), self.weight.numpy(), self.target.numpy(),
                              user_l2, item_l2, alpha0)


def _solver_ops(config: TrainConfig):
    """The C++ ops for the half-steps, or None for TensorFlow ops (--training-kernel
    tf, or the ops unavailable under auto, which says why once)."""
    if config.training_kernel == 'tf':
        return None
    try:
        return kernels.load()
    except kernels.KernelUnavailable as error:
        if config.training_kernel == 'fused':
            raise
        logger.warning('Top-N model in TensorFlow ops (slower): %s', error)
        return None


class _Validation:
    """NDCG@10 of the current factors on the validation slice, ranked as eval is.

    The users, their relevant pairs and the compiled ranking are set up once;
    each call only copies the factors into the variables the ranking reads.
    """

    def __init__(self, config: TrainConfig, fit: data.Ratings, validation: data.Ratings,
                 shape: tuple[int, int], seed: int, seen: tf.RaggedTensor | None = None) -> None:
        """seen: fit's `pairs_catalog(...).seen()`, if the caller has it."""
        started = time.perf_counter()
        num_users, num_items = (rows - features.NUM_OOV_BUCKETS for rows in shape)
        self.num_items = num_items
        self.judged = ranking.judge(num_users, num_items, validation.user.numpy(),
                                    validation.item.numpy(), validation.rating.numpy(),
                                    max_users=validation_users(config, num_items), seed=seed)
        self.user_factors = tf.Variable(tf.zeros([shape[0], config.topn_factors]))
        self.item_factors = tf.Variable(tf.zeros([num_items, config.topn_factors]))
        self.scorer = lambda user: tf.matmul(  # noqa: E731
            tf.gather(self.user_factors, user), self.item_factors, transpose_b=True)
        self.seen = pairs_catalog(fit, num_users, num_items).seen() if seen is None else seen
        self.top_k = ranking.compile_top_k(self.scorer, self.seen, num_items, ranking.TOP_K)
        # Seconds spent setting up and ranking, so far.
        self.seconds = time.perf_counter() - started

    def ndcg(self, state: _State) -> float:
        started = time.perf_counter()
        self.user_factors.assign(state.user_factors)
        self.item_factors.assign(state.item_factors[:self.num_items])
        top = ranking.rank_users(self.scorer, self.judged.users, self.seen, self.num_items,
                                 ranking.TOP_K, compiled=self.top_k)
        ndcg = ranking.ranking_metrics(top, self.judged.rows, self.judged.items,
                                       self.num_items, ranking.TOP_K)['ndcg']
        self.seconds += time.perf_counter() - started
        return ndcg


def validation_users(config: TrainConfig, num_items: int) -> int:
    """The most validation users ranked after each iteration (0: all).

    At most --ranking-users (a search point sets it to its slice's users, so
    its trials rank the slice's sample) and --topn-validation-users, and, with
    the latter above 0, VALIDATION_CELLS users x movies.
    """
    caps = [cap for cap in (config.ranking_users, config.topn_validation_users) if cap > 0]
    if config.topn_validation_users > 0:
        caps.append(max(1, VALIDATION_CELLS // max(num_items, 1)))
    return min(caps) if caps else 0


def pairs_catalog(ratings: data.Ratings, num_users: int, num_items: int) -> catalog_lib.Catalog:
    """A title-less catalogue of ratings' pairs: what ranking excludes and counts."""
    return catalog_lib.build_catalog([''] * num_items, {}, num_users,
                                     ratings.user.numpy(), ratings.item.numpy())


def _write_log(config: TrainConfig, history: list) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator='\n')
    writer.writerow(features.TOPN_LOG_COLUMNS)
    writer.writerows((int(row[0]), *(f'{value:.6g}' for value in row[1:])) for row in history)
    fileio.write_text(features.join(config.model_dir, features.TOPN_LOG_FILE), text.getvalue())


def _search(config: TrainConfig, state: _State, splits, sizes: tuple[int, int],
            seed: int) -> tuple[float, float]:
    """Runs search iterations until patience or the cap; returns their seconds and
    validation's."""
    iterator = _Iterator(config, splits.fit, sizes)
    has_validation = len(splits.validation) > 0
    validation = (_Validation(config, splits.fit, splits.validation, sizes, seed)
                  if has_validation else None)
    if validation is not None:
        logger.info('Top-N validation ranks %d of its %d users after each iteration '
                    '(a seeded sample past --topn-validation-users or %dM users x movies)',
                    validation.judged.users.size, validation.judged.users_in_eval,
                    VALIDATION_CELLS // 1_000_000)
    seconds = 0.0
    while state.iteration < config.topn_iterations:
        if (has_validation and config.early_stopping_patience
                and state.iteration - state.best_iteration >= config.early_stopping_patience):
            break
        took = iterator.step(state)
        seconds += took
        ndcg = validation.ndcg(state) if has_validation else math.nan
        state.history.append((state.iteration, iterator.objective(state), ndcg, took))
        if not has_validation or (math.isfinite(ndcg)
                                  and ndcg > state.best_ndcg + _MIN_IMPROVEMENT):
            state.best_iteration, state.best_ndcg = state.iteration, ndcg
            state.best_factors = (state.user_factors, state.item_factors)
        _write_log(config, state.history)
        _save(config, state)
        logger.info('Top-N iteration %d/%d: objective %.6g, validation NDCG@%d %.4f '
                    '(best %.4f at %d), %.2f s', state.iteration, config.topn_iterations,
                    state.history[-1][1], ranking.TOP_K, ndcg, state.best_ndcg,
                    state.best_iteration, took)
        shutdown.check(f'top-N iteration {state.iteration}')
    return seconds, (validation.seconds if validation is not None else 0.0)


def train(config: TrainConfig, splits, user_rows: int, item_rows: int,
          seed: int, searched: Trial | None = None) -> TopNResult:
    """Fits (or resumes) the top-N model; see the module doc.

    Args:
      config: the run's config (topn_* fields, patience, final_model).
      splits: `train.Splits`: train, fit, validation and eval ratings.
      user_rows: users in the vocabulary plus OOV rows.
      item_rows: movies in the vocabulary plus OOV rows.
      seed: the split seed, which seeds the sample of ranked validation users.
      searched: the search's trial of these settings.  With a refit, its best
        iteration count and its history (topn_log.csv) stand for the search
        iterations, which would only repeat it (on all users where it ran on a
        sample: `search.user_sample`), and the run goes straight to the refit.

    Returns:
      The final factors and how they were chosen.

    Raises:
      ResumeError: a checkpoint of other shapes is in the way.
    """
    shape = (user_rows, item_rows)
    users, movies = user_rows - features.NUM_OOV_BUCKETS, item_rows - features.NUM_OOV_BUCKETS
    if config.topn_unobserved_weight is None:
        config = dataclasses.replace(
            config, topn_unobserved_weight=config_lib.default_unobserved_weight(movies))
    if config.topn_l2 is None:
        config = dataclasses.replace(
            config, topn_l2=config_lib.default_topn_l2(len(splits.train), users, movies))
    fileio.makedirs(config.model_dir)
    state = _restore(config, shape)
    seconds = validation_seconds = 0.0
    if (state is None and searched is not None and config.final_model == 'refit'
            and len(splits.validation) > 0):
        state = _fresh(config, _REFIT, shape)
        state.best_iteration = max(1, searched.iteration)
        state.best_ndcg, state.history = searched.ndcg, list(searched.history)
        _write_log(config, state.history)
        _save(config, state)
        logger.info('Top-N model: the search chose %d iterations; refit on all train ratings',
                    state.best_iteration)
    state = state or _fresh(config, _SEARCH, shape)
    if state.phase == _SEARCH:
        seconds, validation_seconds = _search(config, state, splits, shape, seed)
        refit = (config.final_model == 'refit' and len(splits.validation) > 0
                 and state.best_iteration > 0)
        best = state.best_iteration, state.best_ndcg, list(state.history)
        if not refit:
            _keep_best(config, state, splits.fit)
            return _result(state, False, seconds, 0.0, validation_seconds)
        state = _fresh(config, _REFIT, shape)
        state.best_iteration, state.best_ndcg, state.history = best
        _save(config, state)
    iterator = _Iterator(config, splits.train, shape)
    refit_seconds = 0.0
    while state.iteration < state.best_iteration:
        refit_seconds += iterator.step(state)
        _save(config, state)
        logger.info('Top-N refit on all %d train ratings, iteration %d/%d',
                    len(splits.train), state.iteration, state.best_iteration)
        shutdown.check(f'top-N refit iteration {state.iteration}')
    return _result(state, True, seconds + refit_seconds, refit_seconds, validation_seconds)


def _keep_best(config: TrainConfig, state: _State, fit: data.Ratings) -> None:
    """Puts the best search iteration's factors in state.

    A run resumed after the best iteration no longer holds them in memory;
    iterations are deterministic, so they are recomputed from the start.
    """
    if state.iteration == state.best_iteration:
        return
    if state.best_factors is None:
        replayed = _fresh(config, _SEARCH, (state.user_factors.shape[0],
                                            state.item_factors.shape[0]))
        iterator = _Iterator(config, fit, (state.user_factors.shape[0],
                                           state.item_factors.shape[0]))
        while replayed.iteration < state.best_iteration:
            iterator.step(replayed)
        state.best_factors = replayed.user_factors, replayed.item_factors
    state.user_factors, state.item_factors = state.best_factors


def _result(state: _State, refit: bool, seconds: float, refit_seconds: float,
            validation_seconds: float) -> TopNResult:
    return TopNResult(state.user_factors, state.item_factors, state.best_iteration,
                      state.best_ndcg if math.isfinite(state.best_ndcg) else math.nan,
                      refit, seconds, tuple(tuple(row) for row in state.history),
                      refit_seconds, validation_seconds)


@dataclasses.dataclass(frozen=True)
class Trial:
    """What `trial` returns.

    Attributes:
      ndcg: the best validation NDCG@10.
      iteration: its iteration.
      factors: its (user, movie) factors.
      validation_seconds: the seconds spent ranking validation.
      history: (iteration, objective, validation NDCG, seconds) per iteration,
        as topn_log.csv has them.
    """
    ndcg: float
    iteration: int
    factors: tuple[np.ndarray, np.ndarray]
    validation_seconds: float
    history: tuple[tuple[int, float, float, float], ...]


def trial(config: TrainConfig, fit: data.Ratings, validation: data.Ratings,
          shape: tuple[int, int], seed: int, sample: UserSample | None = None,
          seen: tf.RaggedTensor | None = None) -> Trial:
    """One search point: iterations on fit, NDCG@10 on validation after each,
    early stopping as `train` does; no checkpoint, no log.  With `sample`, fit
    and validation hold a sample of the users (see `UserSample`); `seen` is
    fit's `pairs_catalog(...).seen()`, if the caller has it.
    """
    iterator = _Iterator(config, fit, shape, sample)
    validate = _Validation(config, fit, validation, shape, seed, seen)
    state = _fresh(config, _SEARCH, shape)
    best = (-math.inf, 0, (state.user_factors, state.item_factors))
    history = []
    while state.iteration < config.topn_iterations:
        if (config.early_stopping_patience
                and state.iteration - best[1] >= config.early_stopping_patience):
            break
        took = iterator.step(state)
        ndcg = validate.ndcg(state)
        history.append((state.iteration, iterator.objective(state), ndcg, took))
        if math.isfinite(ndcg) and ndcg > best[0] + _MIN_IMPROVEMENT:
            best = (ndcg, state.iteration, (state.user_factors, state.item_factors))
    return Trial(*best, validate.seconds, tuple(history))
