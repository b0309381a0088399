"""The top-N search: every run chooses its list model on its own validation slice.

`trainer.task` calls `search` after the rating model (with --topn-search on,
the default).  Everything is fitted on the fit ratings (train minus the
validation slice) and scored by NDCG@10 on the slice, ranked as eval is
(`ranking`: candidates the movies a user did not rate in fit, relevant the
slice's ratings >= 4); the eval split is never read.  In order:

1. EASE (`trainer.topn.ease`, graded targets max(r - 2, 0.2)): lambda on a
   ladder of doublings from --ease-lambda at --ease-dropout, walking towards
   the better neighbour until it stops improving (at most EASE_RUNGS solves);
   then EDLAE's dropout p on EASE_DROPOUTS at that lambda, walked the same
   way; then, if another p won, the lambda ladder again at it; then the same
   for the users' weight exponent a on EASE_USER_EXPONENTS from
   --ease-user-exponent (all within EASE_SHARE of the budget; p or a at the
   top of its ladder is on the edge).
   Each point is scored in both of EASE's forms, B's diagonal held at 0
   while fitting (EASE, EDLAE) or not (DLAE), from the same inverse.
   The points are ranked without the like term (it adds nothing to graded EASE on real
   MovieLens 100k: docs/evaluation.md), step 3 tries it on the best rung;
2. iALS (`trainer.topn.train.trial`, with early stopping): first the flags'
   point, then seeded random points in IALS_SPACE (factors; ridge and
   unobserved weight as multiples of the flags' or data defaults;
   confidence 0 or 1; 'watched' or 'weighted' targets, `ials`), at most
   IALS_TRIALS, within 70% of the budget
   (on a sample of the users, `user_sample`, the points after the first are
   ranked at the first's like weight, not each at its best);
3. the served score: EASE's weight w in a blend of the two best models,
   each standardised per user (w = 0: iALS alone, 1: EASE alone), times
   the like weight beta of the rating model's log P(rating >= 4)
   (`lists.ListScorer`), on the points' stored validation scores.  The like
   term needs a rating model that has not seen the slice: the trainer's
   search-phase model (`TrainResult.search_model`).
4. with --topn-model auto, the best point replaces the flags' iALS point
   only if it beats it by CLEAR_MARGIN standard errors of the paired
   per-user NDCG difference (the slice is small: differences within its
   noise do not carry to eval).

EASE is left out of the search past EASE_MAX_WORK ratings x movies in its
Gram matrix (ml-25m), said in one line.

The budget (`default_budget`) grows with the data: 30 s at 100k ratings, 53
at 1M.  Past SEARCH_RATINGS (1M) fit ratings every point is fitted on a
seeded sample of the users holding about that many (`user_sample`; each
movie's ridge scaled to the share kept, `topn_train.UserSample`), so the
search costs and is allowed what it is at 1M: 53 s at 5M and 25M; the
chosen iALS point's iterations are then chosen again on all users, up to
the sample's count, by the caller's run with validation (`refit_config`;
the sample's count, refitted as it was, scored lower).  The slice is ranked on a
seeded sample of at most SEARCH_USERS users and SEARCH_CELLS users x movies.
The points, their order and the users sampled are fixed by the seed;
a stage stops early only when the clock runs out (logged; each stage's
first point runs in any case), so two runs agree whenever both finish
their trials within the budget.  A best value at
the edge of what was searched is said in one log line and kept in the
result (`on_edge`).  The caller refits the best point on all of train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import time
from typing import Any

import numpy as np
import tensorflow as tf

from trainer import data
from trainer import features
from trainer import logs
from trainer import shutdown
from trainer.config import TrainConfig, ease_phrases
from trainer.topn import ease as ease_lib
from trainer.topn import lists as lists_lib
from trainer.topn import ranking
from trainer.topn import train as topn_train

logger = logging.getLogger(__name__)

# 30 s at 100k train ratings, x (ratings / 100k)^BUDGET_EXPONENT, up to SEARCH_RATINGS.
BUDGET_SECONDS, BUDGET_RATINGS, BUDGET_EXPONENT = 30.0, 100_000, 0.25
# Past this many fit ratings the search fits a seeded sample of the users
# holding about this many (`user_sample`), so its cost, and its budget, stop
# growing with the data: 53 s from 1M ratings on.
SEARCH_RATINGS = 1_000_000
# Validation users ranked per search point at most (a seeded sample past it).
SEARCH_USERS = 5_000
# ... and at most this many users x movies (40M: 320 MB per float64 score matrix).
SEARCH_CELLS = 40_000_000
EASE_RUNGS = 8
EASE_RANGE = (25.0, 409_600.0)
# EDLAE's dropout probabilities p the search walks (0: EASE; `trainer.topn.ease`).
EASE_DROPOUTS = (0.0, 0.25, 0.5, 0.67)
# The users' weight exponents a the search walks (0: EASE's unweighted sum; `ease.user_scale`).
EASE_USER_EXPONENTS = (0.0, 0.5, 1.0, 1.5)
IALS_SPACE = {'factors': (16, 24, 32, 48, 64, 96, 128, 192),
              'l2_scale': (1 / 8, 8.0), 'unobserved_scale': (1 / 4, 16.0),
              'confidence': (0.0, 1.0), 'target': ('watched', 'weighted')}
IALS_TRIALS = 12
IALS_SHARE = 0.7
# The search leaves EASE out past this many ratings x movies in its Gram matrix
# (1M: 2.7e9, 21 s on a loaded 2-core machine; ml-25m: about 9e10).
EASE_MAX_WORK = 5e9
# ... and EASE's ladder climbs within this share.
EASE_SHARE = 0.45
# The chosen point must beat the flags' iALS point by this many standard errors
# of the paired per-user NDCG difference on the slice, else the flags' point is kept.
CLEAR_MARGIN = 2.0
BLENDS = (0.0, 1.0, 0.15, 0.3, 0.5, 0.7, 0.85)
LIKE_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0)
_POINT_STREAM, _SAMPLE_STREAM = 0x7E5C, 0x7E5D


def default_budget(train_ratings: int) -> float:
    """The search's seconds: BUDGET_SECONDS at BUDGET_RATINGS, growing as a power up to
    SEARCH_RATINGS (past it the search fits a sample of that size)."""
    ratings = min(train_ratings, SEARCH_RATINGS)
    return BUDGET_SECONDS * max(ratings / BUDGET_RATINGS, 1e-3) ** BUDGET_EXPONENT


def user_sample(fit: data.Ratings, validation: data.Ratings, num_users: int, num_items: int,
                seed: int) -> tuple[data.Ratings, data.Ratings, topn_train.UserSample] | None:
    """The fit and validation ratings of a seeded sample of users holding about
    SEARCH_RATINGS fit ratings, and the sample's share (`topn_train.UserSample`);
    None when fit holds no more than that.

    Every user is kept with probability SEARCH_RATINGS / fit ratings, drawn from
    the split seed: the same users in every run with that seed.  Indices stay
    the vocabulary's (rows of users left out are empty and cost the solves
    nothing), so the rating model's like term scores the same users.
    """
    if len(fit) <= SEARCH_RATINGS:
        return None
    share = SEARCH_RATINGS / len(fit)
    kept = np.random.default_rng([seed, _SAMPLE_STREAM]).random(num_users) < share

    def restrict(ratings: data.Ratings) -> data.Ratings:
        users = ratings.user.numpy()
        mask = kept[np.minimum(users, num_users - 1)] & (users < num_users)
        return data.Ratings(*(tf.constant(column.numpy()[mask]) for column in
                              (ratings.user, ratings.item, ratings.rating)))

    item_counts = np.bincount(fit.item.numpy(), minlength=num_items + features.NUM_OOV_BUCKETS)
    return restrict(fit), restrict(validation), topn_train.UserSample(share, item_counts)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What `search` chose and everything it tried.

    Attributes:
      family: 'ials', 'ease' or 'blend'.
      blend: EASE's weight w (0 for ials, 1 for ease).
      like_weight: beta.
      ease_lambda: EASE's best lambda (None without EASE).
      ease_dropout: its EDLAE dropout probability p (0: EASE; None without EASE).
      ease_form: its form, 'ease' or 'dlae' (`ease.FORMS`; None without EASE).
      ease_user_exponent: its users' weight exponent a (`ease.user_scale`; None without
        EASE).
      ials: the best iALS point {factors, l2, unobserved_weight, confidence,
        iterations} (None without iALS).
      validation_ndcg: the chosen point's NDCG@10 on the slice.
      table: one row per point tried: {stage, settings, validation_ndcg, seconds}.
      on_edge: the chosen values at the edge of what was searched.
      ease_left_out: why the search left EASE out (too large), or None.
      kept_flags: the best point did not beat the flags' iALS point by
        CLEAR_MARGIN standard errors, so the flags' point was kept.
      seconds, budget: spent and allowed.
      users: validation users ranked per point.
      sample: past SEARCH_RATINGS fit ratings, the users the points were fitted
        on, {users, of_users, fit_ratings, of_fit_ratings} (`user_sample`); the
        chosen iALS point's iterations are then chosen again on all users.
      validation_seconds: of `seconds`, those spent ranking the slice.
    """
    family: str
    blend: float
    like_weight: float
    ease_lambda: float | None
    ials: dict[str, Any] | None
    validation_ndcg: float
    table: tuple[dict[str, Any], ...]
    on_edge: tuple[str, ...]
    kept_flags: bool
    ease_left_out: str | None
    seconds: float
    budget: float
    users: int
    sample: dict[str, int] | None = None
    validation_seconds: float = 0.0
    ease_dropout: float | None = None
    ease_form: str | None = None
    ease_user_exponent: float | None = None
    # The chosen iALS point's trial (`topn_train.train`'s `searched`), unless it ran
    # on a sample of the users (its best count does not carry as it is; see
    # `refit_config`); not recorded.
    ials_trial: Any = None

    def record(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items()
                if key != 'ials_trial'}


class _Clock:
    """The search's budget, asked before every point; it also answers SIGTERM.

    The search keeps no checkpoint of its own: on SIGTERM it stops before its
    next point (the rating model's checkpoints are all written by then), and a
    resumed run searches again from the start, as the same seed draws the
    same points.
    """

    def __init__(self, budget: float) -> None:
        self.started, self.budget = time.perf_counter(), budget

    def spent(self) -> float:
        return time.perf_counter() - self.started

    def left(self, share: float = 1.0) -> bool:
        shutdown.check('the rating model (the top-N search starts again on resume)')
        return self.spent() < share * self.budget


class _Slice:
    """The validation slice's judged users, their fit movies masked, and the
    rating model's log P(rating >= 4): each point's scores are ranked as served.

    Scores stay float32 tensors and go through the functions `lists.ListScorer`
    serves with (the like term, the blend's standardising), so the slice ranks
    what `recommend` would, without copies between numpy and TensorFlow.
    Ranks at most SEARCH_CELLS users x movies (a seeded sample of users past it).
    `seconds` counts the time spent setting up, scoring and ranking the slice
    (the trials' own validation is counted apart).
    """

    def __init__(self, fit: data.Ratings, validation: data.Ratings, num_users: int,
                 num_items: int, max_users: int, seed: int, rating_model=None,
                 like: ranking.LikeTerm | None = None) -> None:
        started = time.perf_counter()
        self.num_items = num_items
        cap = max(1, SEARCH_CELLS // max(num_items, 1))
        max_users = min(max_users, cap) if max_users > 0 else cap
        self.judged = ranking.judge(num_users, num_items, validation.user.numpy(),
                                    validation.item.numpy(), validation.rating.numpy(),
                                    max_users=max_users, seed=seed)
        self.seen = topn_train.pairs_catalog(fit, num_users, num_items).seen()
        users = tf.constant(self.judged.users, tf.int64)
        self.seen_rows = tf.gather(self.seen, users)
        self.log_liked = None
        if rating_model is not None and like is not None:
            self.log_liked = ranking.log_liked(users, num_items, rating_model, like)
        self._log_raw: tuple[tf.Tensor, tf.Tensor] | None = None
        relevant_keys = (self.judged.rows.astype(np.int64) * num_items
                         + self.judged.items.astype(np.int64))
        self._relevant_keys = np.unique(relevant_keys)
        self._relevant = np.bincount(self.judged.rows.astype(np.int64),
                                     minlength=self.judged.users.size)
        self.seconds = time.perf_counter() - started

    @contextlib.contextmanager
    def _timed(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started

    def raw(self, scorer) -> tf.Tensor:
        """A scorer's float32 [users, movies] scores of the judged users."""
        users = self.judged.users
        with self._timed():
            blocks = [scorer(tf.constant(users[start:start + 1024], tf.int64))
                      for start in range(0, users.size, 1024)]
            return tf.concat(blocks, 0) if blocks else tf.zeros([0, self.num_items])

    def served(self, raw: tf.Tensor, like_weight: float) -> tf.Tensor:
        """lists.ListScorer's per-model score: raw, or its log plus the like term."""
        if not like_weight or self.log_liked is None:
            return raw
        with self._timed():
            # The log of the last raw scores is kept: the like grid reuses it.
            if self._log_raw is None or self._log_raw[0] is not raw:
                self._log_raw = None
                self._log_raw = (raw, tf.math.log(tf.maximum(raw, ranking.TOPN_SCORE_FLOOR)))
            return self._log_raw[1] + like_weight * self.log_liked

    def blended(self, blend: float, like_weight: float, ials_raw: tf.Tensor,
                ease_raw: tf.Tensor) -> tf.Tensor:
        """The served scores of a blend of the two (lists.ListScorer's)."""
        ials, ease = self.served(ials_raw, like_weight), self.served(ease_raw, like_weight)
        with self._timed():  # (served times itself)
            return ((1.0 - blend) * lists_lib.standardised(ials)
                    + blend * lists_lib.standardised(ease))

    def ndcg(self, scores: tf.Tensor) -> float:
        """NDCG@10 of scores [users, movies], fit movies excluded, top-k as `ranking` takes it."""
        return float(np.mean(self.user_ndcg(scores)))

    def user_ndcg(self, scores: tf.Tensor) -> np.ndarray:
        """Each judged user's NDCG@10 (users with a relevant movie), as `ranking_metrics`
        averages it."""
        with self._timed():
            return self._user_ndcg(scores)

    def _user_ndcg(self, scores: tf.Tensor) -> np.ndarray:
        k = min(ranking.TOP_K, self.num_items)
        _, top, valid = ranking.top_k_unseen(scores, self.seen_rows, k)
        top = np.where(valid.numpy(), top.numpy(), -1)
        users = top.shape[0]
        keys = np.arange(users, dtype=np.int64)[:, None] * self.num_items + top
        hits = ((top >= 0) & np.isin(keys, self._relevant_keys)).astype(np.float64)
        discounts = 1.0 / np.log2(np.arange(2, ranking.TOP_K + 2, dtype=np.float64))
        ideal = np.cumsum(discounts)[np.clip(self._relevant, 1, ranking.TOP_K) - 1]
        judged = self._relevant > 0
        return (hits @ discounts[:top.shape[1]])[judged] / ideal[judged]

    def best_like(self, raw: tf.Tensor, likes: tuple[float, ...]) -> tuple[float, float]:
        """(best NDCG, its like weight) of one model's raw scores over the like grid."""
        ndcg, weight = max((self.ndcg(self.served(raw, weight)), -weight) for weight in likes)
        return ndcg, -weight


def _ease_ladder(config: TrainConfig, fit: data.Ratings, sizes: tuple[int, int],
                 where: _Slice, table: list, clock: _Clock):
    """The walk's best (`ease_walk`): a _Best (settings {'lambda', 'dropout',
    'user_exponent', 'form'}) and its neighbours, the fit pairs' values and its edges (a
    list of phrases); records each point, once per form.

    Each point is scored in both of `ease.FORMS` (one inverse, two rankings) and counts
    as the better of the two.  The Gram matrix is built once per user exponent.
    """
    num_users, num_items = sizes
    users, items, ratings = fit.user.numpy(), fit.item.numpy(), fit.rating.numpy()
    subset = ease_lib.movie_subset(np.bincount(items, minlength=num_items),
                                   config.ease_max_movies)
    values = ease_lib.pair_values(ratings)
    grams: dict[float, np.ndarray] = {}  # by user exponent: the best point's and the last
    seen_values = ease_lib.user_values(users, items, ratings)
    count = ease_lib.stored_count(config.ease_neighbours, num_items)
    kept: list[_Best] = []

    forms = (config.ease_form,) + tuple(form for form in ease_lib.FORMS
                                        if form != config.ease_form)

    def gram(exponent: float) -> np.ndarray:
        if exponent not in grams:
            for key in [key for key in grams
                        if not kept or key != kept[0].settings['user_exponent']]:
                del grams[key]
            grams[exponent] = ease_lib.gram(users, items, values, num_users, subset, num_items,
                                            ease_lib.user_scale(users, num_users, exponent))
        return grams[exponent]

    def score(lam: float, dropout: float, exponent: float) -> float:
        """Both forms from one inverse: the better one's NDCG (the flags' form on a tie)."""
        started = time.perf_counter()
        inverse = ease_lib.penalised_inverse(gram(exponent), lam, dropout)
        best = -math.inf
        for form in forms:
            stored = ease_lib.neighbours(ease_lib.weights_from_inverse(*inverse, form), subset,
                                         num_items, count, lam, dropout, form, exponent)
            model = lists_lib.ListModel('ease', neighbours=stored, seen_values=seen_values,
                                        blend=1.0)
            raw = where.raw(lists_lib.scorer(model, where.seen, num_items))
            ndcg = where.ndcg(raw)
            settings = {'lambda': lam, 'dropout': dropout, 'user_exponent': exponent,
                        'form': form}
            table.append({'stage': 'ease', 'settings': settings, 'like_weight': 0.0,
                          'validation_ndcg': ndcg, 'seconds': time.perf_counter() - started})
            logger.info('Top-N search, EASE lambda %g, dropout %g, user exponent %g, %s form: '
                        'validation NDCG@%d %.4f (%.1f s)', lam, dropout, exponent, form,
                        ranking.TOP_K, ndcg, table[-1]['seconds'])
            started = time.perf_counter()
            best = max(best, ndcg)
            if not kept or ndcg > kept[0].ndcg:
                kept[:] = [_Best(ndcg, settings, raw, stored)]
        return best

    lam = float(np.clip(config.ease_lambda, *EASE_RANGE))
    *_, edges = ease_walk(score, lam, config.ease_dropout, config.ease_user_exponent, clock)
    return kept[0], seen_values, edges


def ease_walk(score, lam: float, dropout: float, exponent: float,
              clock: _Clock) -> tuple[float, float, float, list[str]]:
    """The coordinate walk of `_ease_ladder` over lambda, then the dropout p, then the
    user exponent a, asking score(lam, p, a) once per point; after a ladder that moves
    p or a, lambda's ladder again: the best point tried, (lambda, p, a), and its edges
    (phrases)."""
    tried: dict[tuple[float, float, float], float] = {}
    point = {'lambda': lam, 'dropout': dropout, 'user_exponent': exponent}

    def at(**changes: float) -> float:
        key = tuple({**point, **changes}.values())
        if key not in tried:
            tried[key] = score(*key)
        return tried[key]

    point['lambda'], lam_edge = _ladder(lambda value: at(**{'lambda': value}), lam,
                                        EASE_RANGE, clock)
    edges = []
    for name, ladder, phrase in (('dropout', EASE_DROPOUTS, 'EASE dropout'),
                                 ('user_exponent', EASE_USER_EXPONENTS,
                                  'EASE user exponent')):
        values = tuple(sorted(set(ladder) | {point[name]}))
        best, edge = _walk(lambda value, name=name: at(**{name: value}), values,
                           values.index(point[name]), clock)
        if edge and best > 0:  # 0 is no edge: p >= 0, a >= 0
            edges.append(f'{phrase} {best:g}')
        if best != point[name]:
            point[name] = best
            point['lambda'], lam_edge = _ladder(lambda value: at(**{'lambda': value}),
                                                point['lambda'], EASE_RANGE, clock)
    edges = ([f'EASE lambda {point["lambda"]:g}'] if lam_edge else []) + edges
    return point['lambda'], point['dropout'], point['user_exponent'], edges


def _ladder(score, start: float, bounds: tuple[float, float], clock: _Clock):
    """A ladder of doublings from start within bounds, walking towards the better
    neighbour until it stops improving (at most EASE_RUNGS rungs): (the best rung,
    whether it is on the edge of what was searched)."""
    tried: dict[float, float] = {}

    def rung(value: float) -> float:
        tried[value] = score(value)
        return tried[value]

    def in_range(value: float) -> bool:
        return bounds[0] <= value <= bounds[1]

    value, best = start, rung(start)
    direction = None
    for step in (2.0, 0.5):  # up first, then down
        if in_range(value * step) and clock.left(EASE_SHARE):
            ndcg = rung(value * step)
            if ndcg > best:
                value, best, direction = value * step, ndcg, step
                break
    if direction is None:  # neither tried neighbour is better: on the edge unless both were
        # tried (one is not at the range's end, or when the budget ends the ladder first)
        return value, not (value * 2 in tried and value / 2 in tried)
    while len(tried) < EASE_RUNGS and clock.left(EASE_SHARE) and in_range(value * direction):
        ndcg = rung(value * direction)
        if ndcg <= best:
            return value, False
        value, best = value * direction, ndcg
    return value, True  # still improving where the ladder stopped


def _walk(score, values: tuple[float, ...], start: int, clock: _Clock):
    """The best of a sorted ladder of values, walked from values[start] towards the
    better neighbour until it stops improving: (the best value, whether it is at the
    top of the ladder or its neighbours went untried)."""
    tried: dict[int, float] = {start: score(values[start])}
    at, direction = start, None
    for step in (1, -1):  # up first, then down
        if 0 <= at + step < len(values) and clock.left(EASE_SHARE):
            tried[at + step] = score(values[at + step])
            if tried[at + step] > tried[at]:
                at, direction = at + step, step
                break
    while direction is not None and 0 <= at + direction < len(values) and clock.left(
            EASE_SHARE):
        tried[at + direction] = score(values[at + direction])
        if tried[at + direction] <= tried[at]:
            break
        at += direction
    untried = any(0 <= at + step < len(values) and at + step not in tried for step in (1, -1))
    return values[at], at == len(values) - 1 or untried


def _ials_points(config: TrainConfig, seed: int) -> list[dict[str, Any]]:
    """The flags' point, then seeded random points of IALS_SPACE."""
    rng = np.random.default_rng([seed, _POINT_STREAM])
    targets = IALS_SPACE.get('target')
    points = [{'factors': config.topn_factors, 'l2_scale': 1.0, 'unobserved_scale': 1.0,
               'confidence': config.topn_confidence,
               **({'target': config.topn_target} if targets else {})}]
    for _ in range(IALS_TRIALS - 1):
        def log_uniform(low: float, high: float) -> float:
            return float(np.exp(rng.uniform(np.log(low), np.log(high))))
        points.append({'factors': int(rng.choice(IALS_SPACE['factors'])),
                       'l2_scale': round(log_uniform(*IALS_SPACE['l2_scale']), 4),
                       'unobserved_scale': round(log_uniform(*IALS_SPACE['unobserved_scale']), 4),
                       'confidence': float(rng.choice(IALS_SPACE['confidence'])),
                       **({'target': str(rng.choice(targets))} if targets else {})})
    return points


def ials_config(config: TrainConfig, point: dict[str, Any]) -> TrainConfig:
    """config with an iALS search point's values (scales multiply the config's)."""
    return dataclasses.replace(
        config, topn_factors=int(point['factors']),
        topn_l2=config.topn_l2 * point['l2_scale'],
        topn_unobserved_weight=config.topn_unobserved_weight * point['unobserved_scale'],
        topn_confidence=float(point['confidence']),
        topn_target=point.get('target', config.topn_target))


def _ials_trials(config: TrainConfig, splits, sizes: tuple[int, int], seed: int,
                 where: _Slice, likes: tuple[float, ...], table: list, clock: _Clock,
                 sample: topn_train.UserSample | None = None):
    """(the best iALS point tried within the budget, the flags' point): _Bests; and the
    seconds the trials spent ranking the slice."""
    rows = tuple(size + features.NUM_OOV_BUCKETS for size in sizes)
    best = first = None
    first_like = 0.0
    validation_seconds = 0.0
    trial_config = dataclasses.replace(config, ranking_users=where.judged.users.size)
    stage_started = clock.spent()
    for number, point in enumerate(_ials_points(config, seed)):
        if number and not clock.left(IALS_SHARE):
            logger.info('Top-N search: the budget ends iALS after %d of %d points',
                        number, IALS_TRIALS)
            break
        started = time.perf_counter()
        tried = topn_train.trial(ials_config(trial_config, point), splits.fit,
                                 splits.validation, rows, seed, sample, seen=where.seen)
        validation_seconds += tried.validation_seconds
        iterations, factors = tried.iteration, tried.factors
        raw = where.raw(ranking.factor_scorer(*factors, sizes[1]))
        # On a sample of the users (large data), the points after the first are
        # ranked at the first's like weight, one ranking instead of a grid; the
        # score grid still tries every like weight on the best point.
        point_likes = likes if sample is None or first is None else (first_like,)
        ndcg, weight = where.best_like(raw, point_likes)
        if first is None:
            first_like = weight
        point = {**point, 'iterations': iterations}
        table.append({'stage': 'ials', 'settings': point, 'like_weight': weight,
                      'validation_ndcg': ndcg, 'seconds': time.perf_counter() - started})
        logger.info('Top-N search, iALS %s: validation NDCG@%d %.4f (like weight %g; '
                    '%.1f s); point %d of %d, %s', point, ranking.TOP_K, ndcg, weight,
                    table[-1]['seconds'], number + 1, IALS_TRIALS,
                    _left_text(clock, number + 1, stage_started))
        current = _Best(ndcg, point, raw, factors, tried)
        if best is None or ndcg > best.ndcg:
            best = current
        first = first or current
    return best, first, validation_seconds


def ials_seconds_left(done: int, spent: float, stage_spent: float, budget: float) -> float:
    """The iALS stage's seconds left: at the rate of its points so far, and at most
    until its share of the budget is spent (it then finishes the point it is on)."""
    rate = logs.time_left(done, IALS_TRIALS, stage_spent)
    by_budget = max(0.0, IALS_SHARE * budget - spent)
    return by_budget if rate is None else min(rate, by_budget)


def _left_text(clock: _Clock, done: int, stage_started: float) -> str:
    spent = clock.spent()
    left = ials_seconds_left(done, spent, spent - stage_started, clock.budget)
    return f'about {left:.0f} s left for iALS ({spent:.0f} s of the {clock.budget:.0f} s budget)'


@dataclasses.dataclass(frozen=True)
class _Best:
    """A family's best point: its NDCG, settings, raw validation scores, fitted model
    (and for iALS its `topn_train.Trial`)."""
    ndcg: float
    settings: dict[str, Any]
    raw: np.ndarray
    model: Any
    trial: Any = None


def _row_of(table: list, best: '_Best') -> dict[str, Any]:
    """The table row of a family's best point (its like weight)."""
    stage = 'ease' if 'lambda' in best.settings else 'ials'
    key = best.settings
    return next(row for row in table if row['stage'] == stage and row['settings'] == key)


def _ease_too_big(config: TrainConfig, fit: data.Ratings, num_items: int) -> str | None:
    """Why EASE is too large to search within the budget (its Gram matrix's sparse
    products cost about kept ratings x kept movies), or None."""
    items = fit.item.numpy()
    counts = np.bincount(items, minlength=num_items)
    kept = ease_lib.movie_subset(counts, config.ease_max_movies)
    work = float(counts[kept].sum()) * kept.size
    if work <= EASE_MAX_WORK:
        return None
    return (f'{counts[kept].sum()} ratings x {kept.size} movies = {work:.2g} > '
            f'{EASE_MAX_WORK:.0e}; --topn-model ease trains it anyway')


def _blended(where: _Slice, blend: float, weight: float, ials_best, ease_best) -> tf.Tensor:
    """The served scores of a blend weight and like weight (lists.ListScorer's)."""
    if blend == 0.0:
        return where.served(ials_best.raw, weight)
    if blend == 1.0:
        return where.served(ease_best.raw, weight)
    return where.blended(blend, weight, ials_best.raw, ease_best.raw)


def _unless_clearly_better(config: TrainConfig, where: _Slice, chosen, flags_point, likes,
                           ials_best):
    """(chosen, False), or the flags' iALS point and like weight, (its, True), when chosen
    beats it by less than CLEAR_MARGIN standard errors of the paired per-user difference."""
    weight = config.topn_like_weight if config.topn_like_weight in likes else 0.0
    if chosen[1] == 0.0 and ials_best is flags_point and chosen[2] == weight:
        return chosen, False  # the flags' point itself
    flags_scores = where.served(flags_point.raw, weight)
    difference = where.user_ndcg(chosen[3]) - where.user_ndcg(flags_scores)
    error = difference.std(ddof=1) / math.sqrt(max(difference.size, 1)) if (
        difference.size > 1) else math.inf
    if difference.mean() > CLEAR_MARGIN * error:
        return chosen, False
    logger.info('Top-N search: the best point beats the flags\' iALS point by %.4f NDCG, '
                'under %g standard errors (%.4f): the flags\' point is kept',
                difference.mean(), CLEAR_MARGIN, error)
    return (where.ndcg(flags_scores), 0.0, weight, flags_scores), True


def _ials_edges(point: dict[str, Any]) -> list[str]:
    out = []
    if point['factors'] in (min(IALS_SPACE['factors']), max(IALS_SPACE['factors'])):
        out.append(f'iALS factors {point["factors"]}')
    for name in ('l2_scale', 'unobserved_scale'):
        low, high = np.log(IALS_SPACE[name])
        position = (np.log(point[name]) - low) / (high - low)
        if position < 0.1 or position > 0.9:
            out.append(f'iALS {name} {point[name]:g}')
    return out


def search(config: TrainConfig, splits, sizes: tuple[int, int], seed: int,
           rating_model=None, like: ranking.LikeTerm | None = None) -> SearchResult:
    """Chooses the served top-N model on the validation slice (see the module doc).

    Args:
      config: the run's config, data defaults filled in (topn_l2 etc.).
      splits: `train.Splits`; only fit and validation are read.
      sizes: (users, movies) in the vocabularies, OOV excluded.
      seed: the split seed: the points and the ranked users' sample.
      rating_model: a rating model fitted on fit alone, for the like term.
      like: its like term's cut and noise (the weight is searched).

    Returns:
      The chosen point and the table of every point tried.
    """
    budget = config.topn_search_seconds or default_budget(len(splits.train))
    clock = _Clock(budget)
    max_users = min(config.ranking_users or SEARCH_USERS, SEARCH_USERS)
    sampled = user_sample(splits.fit, splits.validation, *sizes, seed)
    sample = sample_record = None
    whole_fit = splits.fit
    if sampled is not None:
        splits = dataclasses.replace(splits, fit=sampled[0], validation=sampled[1])
        sample = sampled[2]
        sample_record = {'users': int(np.unique(splits.fit.user.numpy()).size),
                         'of_users': int(np.unique(whole_fit.user.numpy()).size),
                         'fit_ratings': len(splits.fit), 'of_fit_ratings': len(whole_fit)}
        logger.info('Top-N search on a seeded sample of %d of %d users (%d of %d fit '
                    'ratings; past %d the search fits a sample)', sample_record['users'],
                    sample_record['of_users'], len(splits.fit), len(whole_fit),
                    SEARCH_RATINGS)
    where = _Slice(splits.fit, splits.validation, *sizes, max_users, seed, rating_model, like)
    likes = LIKE_WEIGHTS if where.log_liked is not None else (0.0,)
    table: list[dict[str, Any]] = []
    families = ('ials', 'ease') if config.topn_model in ('auto', 'blend') else (
        config.topn_model,)
    on_edge: list[str] = []
    ease_best = ials_best = seen_values = None
    left_out = _ease_too_big(config, whole_fit, sizes[1]) if config.topn_model == 'auto' else None
    if left_out:
        logger.info('Top-N search: EASE left out: %s', left_out)
        families = ('ials',)
    if 'ease' in families:
        ease_best, seen_values, edges = _ease_ladder(config, splits.fit, sizes, where, table,
                                                     clock)
        on_edge += edges
    flags_point = None
    trials_validation = 0.0
    if 'ials' in families:
        ials_best, flags_point, trials_validation = _ials_trials(
            config, splits, sizes, seed, where, likes, table, clock, sample)
    blends = {'ials': (0.0,), 'ease': (1.0,), 'blend': BLENDS[2:]}.get(
        config.topn_model if len(families) == 2 else families[0], BLENDS)
    chosen = (-math.inf, 0.0, 0.0, None)
    # Each family's best first (at its best like weight), then the rest while the budget lasts.
    first = [(blend, row['like_weight']) for blend, best in ((0.0, ials_best), (1.0, ease_best))
             if best is not None and blend in blends
             for row in [_row_of(table, best)]]
    grid = first + [point for point in itertools.product(blends, likes) if point not in first]
    for number, (blend, weight) in enumerate(grid):
        if number >= max(len(first), 1) and not clock.left():
            logger.info('Top-N search: the budget ends the score grid after %d of %d points',
                        number, len(grid))
            break
        started = time.perf_counter()
        scores = _blended(where, blend, weight, ials_best, ease_best)
        ndcg = where.ndcg(scores)
        table.append({'stage': 'score', 'settings': {'blend': blend}, 'like_weight': weight,
                      'validation_ndcg': ndcg, 'seconds': time.perf_counter() - started})
        if ndcg > chosen[0]:
            chosen = (ndcg, blend, weight, scores)
    kept_flags = False
    if flags_point is not None and config.topn_model == 'auto':
        chosen, kept_flags = _unless_clearly_better(config, where, chosen, flags_point, likes,
                                                    ials_best)
    ndcg, blend, weight, _ = chosen
    family = 'ials' if blend == 0.0 else 'ease' if blend == 1.0 else 'blend'
    if kept_flags:
        ials_best, on_edge = flags_point, []
    if family != 'ease' and ials_best is not None and not kept_flags:
        on_edge += _ials_edges(ials_best.settings)
    if family == 'ials':
        on_edge = [edge for edge in on_edge if not edge.startswith('EASE')]
    if weight == max(likes) and len(likes) > 1 and not kept_flags:
        on_edge.append(f'like weight {weight:g}')
    interior = [value for value in blends if 0.0 < value < 1.0]
    if family == 'blend' and not kept_flags and blend in (min(interior), max(interior)):
        on_edge.append(f'EASE weight {blend:g}')
    if on_edge:
        logger.info('Top-N search: the best point lies on the edge of its space: %s; '
                    'a wider space may do better', ', '.join(on_edge))
    result = SearchResult(
        family=family, blend=blend, like_weight=weight,
        ease_lambda=None if family == 'ials' else ease_best.settings['lambda'],
        ease_dropout=None if family == 'ials' else ease_best.settings['dropout'],
        ease_form=None if family == 'ials' else ease_best.settings['form'],
        ease_user_exponent=None if family == 'ials' else ease_best.settings['user_exponent'],
        ials=None if family == 'ease' else ials_best.settings,
        validation_ndcg=ndcg, table=tuple(table), on_edge=tuple(on_edge), kept_flags=kept_flags,
        ease_left_out=left_out,
        seconds=clock.spent(), budget=budget, users=int(where.judged.users.size),
        sample=sample_record, validation_seconds=where.seconds + trials_validation,
        ials_trial=None if family == 'ease' or sample is not None else ials_best.trial)
    logger.info('Top-N search: %s in %.1f s of %.0f s (%.1f s ranking validation): %d points '
                'on %d validation users, best validation NDCG@%d %.4f', describe(result),
                result.seconds, budget, result.validation_seconds, len(table), result.users,
                ranking.TOP_K, ndcg)
    return result


def refit_config(config: TrainConfig, result: SearchResult) -> TrainConfig:
    """The config that trains the chosen iALS point on all of train (with
    `result.ials_trial` as `topn_train.train`'s `searched`): its values, and its
    iterations as the cap.  Searched on a sample of the users, the iterations
    are chosen again on all users by validation, up to the sample's count."""
    point = ials_config(config, result.ials)
    return dataclasses.replace(point, topn_iterations=max(1, result.ials['iterations']))


def describe(result: SearchResult) -> str:
    """One phrase: the chosen family and its values."""
    parts = []
    if result.ials is not None:
        point = result.ials
        parts.append(f'iALS ({point["factors"]} factors, l2 x{point["l2_scale"]:g}, '
                     f'unobserved weight x{point["unobserved_scale"]:g}, confidence '
                     f'{point["confidence"]:g}, {point.get("target", "watched")} targets, '
                     f'{point["iterations"]} iterations)')
    if result.ease_lambda is not None:
        settings = ''.join(f', {phrase}' for phrase in ease_phrases(
            result.ease_dropout, result.ease_user_exponent, result.ease_form))
        parts.append(f'EASE (lambda {result.ease_lambda:g}{settings})')
    joined = ' + '.join(parts)
    if result.family == 'blend':
        joined = f'blend, EASE weight {result.blend:g}: {joined}'
    return f'{joined}, like weight {result.like_weight:g}'
