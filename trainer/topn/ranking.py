"""Top-k recommendation: scoring every movie, excluding seen ones, and ranking metrics.

Owns the rules the `recommend` signature (trainer/serving/export.py) and the
trainer's ranking evaluation share, so what is measured is what is served:

- `score_items`: the model's predicted rating of every vocabulary movie for
  a batch of users, mu + b_u + b_i + p_u . q_i, as one matmul.
- `top_k_unseen`: the k best-scored movies a user did not rate in training
  (train items are masked with one scatter, then `tf.math.top_k`).
- `fallback_scores`: what an unknown user gets.  Every unknown user has the
  same zero factors, so the model would rank movies by item bias alone, and
  a movie with two lucky 5-star ratings has as large a bias as a classic:
  per-example L2 shrinks rare and frequent items alike.  The fallback
  shrinks each bias towards zero by its train count n,

      fallback(i) = mu + b_i * n_i / (n_i + FALLBACK_PRIOR_RATINGS),

  the posterior mean of a movie effect with a prior worth
  FALLBACK_PRIOR_RATINGS ratings.  It stays a predicted rating and, unlike
  bias + w*log(n), needs no weight that trades stars against counts: a
  much-rated mediocre movie (b = 0) never outranks a well-liked one with
  enough ratings.  Known users' lists are ranked by `topn_scores` instead
  (with a like term, a log, usually negative), so the `recommend`
  signature's `scores` hold two scales in one tensor, told apart by its
  `fallback` output; recommend.py labels them (`score_scale`).

Ranking evaluation (`evaluate`), on the eval split, at k = 10:

- candidates: every vocabulary movie the user did not rate in training;
- relevant: the user's eval movies rated >= 4 (in the vocabulary);
- users: every vocabulary user with an eval rating, or, past `max_users`
  of them (the trainer's --ranking-users, 20,000), a sample seeded by the
  split seed, the same for every ranker and every run on that split;
  precision, recall and NDCG average over those with at least one relevant
  movie (the others have no right answer: recall and NDCG are undefined for
  them), coverage uses all of them (so a sample covers fewer movies);
- precision@k = hits / k; recall@k = hits / relevant; NDCG@k with binary
  gains, 1/log2(rank + 1), divided by the ideal DCG of min(relevant, k)
  hits; coverage@k = distinct movies in the users' top-k lists / movies.

The same is computed for two non-personalised rankings with the same
exclusions: most popular (train count, the usual baseline) and the fallback
above.  The model scores users in blocks (users x movies floats per block
bounded by `_BLOCK_FLOATS`), each block scored, masked and cut to its top k
in one graph: about 105 us a user at ml-25m's 59k movies on 2 cores, where
scoring, masking and one `tf.math.top_k` took 330; the non-personalised rankings
need no score matrix (`rank_users_by_one_order`); the metrics are array
operations on the top-k lists: no Python loop per user.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from trainer import data
from trainer import logs
from trainer.rating.model import MatrixFactorization
from trainer.topn import catalog as catalog_lib

logger = logging.getLogger(__name__)

TOP_K = 10
RELEVANT_RATING = 4.0
# The prior's weight, in ratings: a movie's bias counts half at 10 ratings.
# Measured on synthetic ml-100k-shaped data (seed 0, default flags) by the
# planted rating a newcomer would give the fallback's top 10 (ideal 5.08):
# 10 gave 4.94; 0 to 3 gave 4.93, 30 gave 4.73, 100 gave 4.63, and ranking
# by train count 3.64.  Eval NDCG is no guide here: it grows with the prior
# because it rewards popularity (see docs/evaluation.md).
FALLBACK_PRIOR_RATINGS = 10.0
_BLOCK_FLOATS = 1 << 23  # 32 MB of float32 scores per block
_TOP_K_CHUNK = 128  # items per chunk of `top_k_rows`
# Seeds the ranked users' sample apart from the other streams keyed by the split seed.
_SAMPLE_STREAM = 0x5A3B1E


def score_items(model: MatrixFactorization, user: tf.Tensor,
                num_items: int | tf.Tensor) -> tf.Tensor:
    """Predicted (unclipped) ratings of items 0..num_items-1 for each user.

    Args:
      model: the trained model.
      user: int user indices, [B] (the OOV index gives mu + b_i).
      num_items: vocabulary movies; the OOV item rows are left out.

    Returns:
      float32 [B, num_items]; row b equals model(user[b], items).
    """
    user = tf.cast(user, tf.int64)
    k = model.num_factors
    # One matmul, biases included: [p_u, b_u + mu, 1] . [q_i, 1, b_i].
    rows = tf.gather(model.user_embedding, user)
    user_side = tf.concat(
        [rows[:, :k], rows[:, k:] + model.global_mean, tf.ones_like(rows[:, k:])], axis=1)
    items = model.item_embedding[:num_items]
    item_side = tf.concat([items[:, :k], tf.ones_like(items[:, k:]), items[:, k:]], axis=1)
    return tf.matmul(user_side, item_side, transpose_b=True)


def fallback_scores(model: MatrixFactorization, item_counts: tf.Tensor,
                    prior_ratings: float = FALLBACK_PRIOR_RATINGS) -> tf.Tensor:
    """mu + b_i * n_i / (n_i + prior_ratings) per vocabulary item, [num_items]."""
    counts = tf.cast(item_counts, tf.float32)
    num_items = tf.shape(counts)[0]
    return model.global_mean + model.item_bias[:num_items] * (
        counts / (counts + prior_ratings))


def top_k_unseen(scores: tf.Tensor, seen_rows: tf.RaggedTensor,
                 k: int | tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The k best-scored items per row that are not in that row's seen items.

    Args:
      scores: float32 [B, I].
      seen_rows: int [B, None] item indices to exclude per row.
      k: 1 <= k <= I.

    Returns:
      (values [B, k], indices int32 [B, k], valid bool [B, k]); an entry is
      invalid (a seen item, score -inf) only when a row has fewer than k
      unseen items.
    """
    rows = tf.cast(seen_rows.value_rowids(), tf.int64)
    columns = tf.cast(seen_rows.flat_values, tf.int64)
    masked = tf.tensor_scatter_nd_update(
        scores, tf.stack([rows, columns], axis=1),
        tf.fill(tf.shape(columns), tf.constant(-math.inf, scores.dtype)))
    values, indices = top_k_rows(masked, k)
    return values, indices, values > -math.inf


def top_k_rows(scores: tf.Tensor, k: int | tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`tf.math.top_k(scores, k)`, exactly (ties included), in two passes for long rows.

    Each row is cut into chunks of _TOP_K_CHUNK items.  Every one of the row's
    k best items lies in one of the k chunks with the largest maxima (a
    chunk holding one has a maximum at least as large, and at most k - 1
    other chunks can beat it), so a top-k over the chunk maxima and then
    over those chunks' items gives the answer; ties go to the lower index
    as in `tf.math.top_k`, because the chosen chunks are read in item order.
    At 59k movies this takes 45 us a user against 120 for one `top_k`.

    Args:
      scores: float32 [B, I].
      k: 1 <= k <= I.

    Returns:
      (values [B, k], indices int32 [B, k]).
    """
    k = tf.convert_to_tensor(k, tf.int32)
    num_items = tf.shape(scores)[1]
    return tf.cond(k * _TOP_K_CHUNK * 4 <= num_items,
                   lambda: _top_k_by_chunks(scores, k),
                   lambda: tuple(tf.math.top_k(scores, k)))


def _top_k_by_chunks(scores: tf.Tensor, k: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    rows, num_items = tf.shape(scores)[0], tf.shape(scores)[1]
    whole = num_items // _TOP_K_CHUNK * _TOP_K_CHUNK
    maxima = tf.concat([
        tf.reduce_max(tf.reshape(scores[:, :whole], [rows, -1, _TOP_K_CHUNK]), axis=2),
        # The partial last chunk; -inf when there is none, so it only
        # comes into play as padding, whose candidates are all -inf below.
        tf.reduce_max(scores[:, whole:], axis=1, keepdims=True)], axis=1)
    _, chunks = tf.math.top_k(maxima, k)
    chunks = tf.sort(chunks, axis=1)
    candidates = tf.reshape(chunks[:, :, None] * _TOP_K_CHUNK + tf.range(_TOP_K_CHUNK),
                            [rows, -1])
    inside = candidates < num_items
    values = tf.where(
        inside,
        tf.gather(scores, tf.minimum(candidates, num_items - 1), batch_dims=1),
        tf.constant(-math.inf, scores.dtype))
    values, best = tf.math.top_k(values, k)
    return values, tf.gather(candidates, best, batch_dims=1)


def compile_top_k(score_block: Callable[[tf.Tensor], tf.Tensor], seen: tf.RaggedTensor,
                  num_items: int, k: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """One block's top-k unseen items, as a tf.function to call for every block.

    A caller ranking again and again (the top-N model's validation after each
    iteration) compiles it once, with a score_block that reads variables.

    Args:
      score_block: int64 user indices [B] -> float32 scores [B, num_items].
      seen: every user's train items (`Catalog.seen()`).
      num_items: vocabulary movies.
      k: list length; lists are padded with -1 past a user's unseen items.

    Returns:
      int64 user indices [B] -> int32 [B, min(k, num_items)].
    """
    k = min(k, num_items)

    @tf.function(reduce_retracing=True)
    def block_top_k(batch: tf.Tensor) -> tf.Tensor:
        # Scored in the same graph as the mask, which can then overwrite the
        # block in place instead of copying it.
        _, indices, valid = top_k_unseen(score_block(batch), tf.gather(seen, batch), k)
        return tf.where(valid, indices, -1)
    return block_top_k


def rank_users(score_block: Callable[[tf.Tensor], tf.Tensor], users: np.ndarray,
               seen: tf.RaggedTensor, num_items: int, k: int,
               compiled: Callable[[tf.Tensor], tf.Tensor] | None = None,
               progress: logs.ProgressLog | None = None) -> np.ndarray:
    """Top-k unseen items of each user, scored block by block.

    Args:
      score_block: int64 user indices [B] -> float32 scores [B, num_items].
      users: the user indices to rank for.
      seen: every user's train items (`Catalog.seen()`).
      num_items: vocabulary movies.
      k: list length; lists are padded with -1 past a user's unseen items.
      compiled: what `compile_top_k` returned for these arguments, to reuse.
      progress: counts the users ranked (a line with the time left every 15 s).

    Returns:
      int32 [len(users), min(k, num_items)].
    """
    block_top_k = compiled or compile_top_k(score_block, seen, num_items, k)
    block = max(1, _BLOCK_FLOATS // max(num_items, 1))
    lists = [np.zeros((0, min(k, num_items)), np.int32)]
    for start in range(0, len(users), block):
        lists.append(block_top_k(tf.constant(users[start:start + block], tf.int64)).numpy())
        if progress is not None:
            progress.add(len(lists[-1]))
    return np.concatenate(lists)


def rank_users_by_one_order(item_scores: np.ndarray, users: np.ndarray,
                            seen: tf.RaggedTensor, k: int) -> np.ndarray:
    """`rank_users` for a ranking that scores every user alike, without a score matrix.

    With one order for everyone, a user's top-k unseen items are the first k
    positions of that order that are not seen.  If g_i = s_i - i for the
    user's seen positions s_0 < s_1 < ... (g_i = unseen positions before
    s_i), the j-th unseen position is j + #{i : g_i <= j}: one searchsorted
    over all users at once.  Ties rank the lower item index first, as
    `tf.math.top_k` does, so the lists equal `rank_users`'s.

    Args:
      item_scores: [num_items], the same for every user.
      users: the user indices to rank for.
      seen: every user's train items (`Catalog.seen()`).
      k: list length; lists are padded with -1 past a user's unseen items.

    Returns:
      int32 [len(users), min(k, num_items)].
    """
    num_items = item_scores.size
    k = min(k, num_items)
    order = np.argsort(-item_scores, kind='stable')
    position_of = np.empty(num_items, np.int64)
    position_of[order] = np.arange(num_items)
    rows = tf.gather(seen, tf.constant(users, tf.int64))
    row_splits = rows.row_splits.numpy()
    # Not rows.value_rowids(): in TF 2.21 it peaks at 600 bytes a value
    # (2.4 GB for the 4M train pairs of 5M ratings); np.repeat needs 8.
    row_ids = np.repeat(np.arange(row_splits.size - 1), np.diff(row_splits))
    positions = position_of[rows.flat_values.numpy()]
    by_row = np.lexsort((positions, row_ids))
    row_ids, positions = row_ids[by_row], positions[by_row]
    row_starts = row_splits[:-1]
    unseen_before = positions - (np.arange(positions.size) - row_starts[row_ids])
    # Keys sort by row, then by unseen_before (non-decreasing within a row).
    stride = num_items + k + 1
    keys = row_ids * stride + unseen_before
    wanted = np.arange(len(users), dtype=np.int64)[:, None] * stride + np.arange(k)
    seen_first = np.searchsorted(keys, wanted, side='right') - row_starts[:, None]
    top = np.arange(k) + seen_first
    return np.where(top < num_items, order[np.minimum(top, num_items - 1)], -1).astype(np.int32)


def ranking_metrics(top_items: np.ndarray, relevant_rows: np.ndarray,
                    relevant_items: np.ndarray, num_items: int,
                    k: int) -> dict[str, float]:
    """Precision, recall, NDCG and coverage at k of top-k lists (see the module doc).

    Args:
      top_items: int [U, k'] (k' <= k) item indices per user, -1 for padding.
      relevant_rows: int [R] row of top_items each relevant pair belongs to.
      relevant_items: int [R] the relevant item of each pair (unique per row).
      num_items: catalogue size, for coverage.
      k: the cut-off (precision divides by k).

    Returns:
      {'precision', 'recall', 'ndcg', 'coverage'}; NaN for the first three
      when no user has a relevant item, and coverage NaN for no users.
    """
    num_users, width = top_items.shape
    # A (user, item) pair as one int64 key: row * num_items + item.
    relevant_keys = (relevant_rows.astype(np.int64) * num_items
                     + relevant_items.astype(np.int64))
    keys = np.arange(num_users, dtype=np.int64)[:, None] * num_items + top_items
    hits = ((top_items >= 0) & np.isin(keys, relevant_keys)).astype(np.float64)
    relevant = np.bincount(relevant_rows.astype(np.int64), minlength=num_users)
    discounts = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    ideal = np.cumsum(discounts)[np.clip(relevant, 1, k) - 1]
    judged = relevant > 0
    recommended = np.unique(top_items[top_items >= 0])
    if not judged.any():
        precision = recall = ndcg = math.nan
    else:
        found = hits.sum(axis=1)[judged]
        precision = float(np.mean(found / k))
        recall = float(np.mean(found / relevant[judged]))
        ndcg = float(np.mean((hits @ discounts[:width])[judged] / ideal[judged]))
    return {'precision': precision, 'recall': recall, 'ndcg': ndcg,
            'coverage': recommended.size / num_items if num_users else math.nan}


Ranker = Callable[[tf.Tensor], tf.Tensor] | np.ndarray


@dataclasses.dataclass(frozen=True)
class LikeTerm:
    """The rating model's part in the top-N score (--topn-like-weight).

    A movie is relevant when the user watches it and rates it >= RELEVANT_RATING;
    the top-N model scores the first, the rating model the second:
    P(rating >= RELEVANT_RATING) = Phi((predicted rating - cut) / noise).

    Attributes:
      weight: the exponent beta of that probability in the score.
      cut: where a rating starts to count: RELEVANT_RATING less half a step.
      noise: the rating model's error std (its validation RMSE).
    """
    weight: float
    cut: float
    noise: float


# With a like term, top-N scores below this count as this (log of a score).
TOPN_SCORE_FLOOR = 1e-4


def topn_scores(user_factors: tf.Tensor, item_factors: tf.Tensor, user: tf.Tensor,
                num_items: int | tf.Tensor, model: MatrixFactorization | None = None,
                like: LikeTerm | None = None) -> tf.Tensor:
    """The top-N model's scores of items 0..num_items-1 for users [B].

    p_u . q_i; with a like term, log(max(p_u . q_i, TOPN_SCORE_FLOOR)) +
    weight * log P(rating >= RELEVANT_RATING), the rating model's.
    """
    scores = tf.matmul(tf.gather(user_factors, user), item_factors[:num_items],
                       transpose_b=True)
    if like is None or not like.weight:
        return scores
    return with_like(scores, like.weight, log_liked(user, num_items, model, like))


def log_liked(user: tf.Tensor, num_items: int | tf.Tensor, model: MatrixFactorization,
              like: LikeTerm) -> tf.Tensor:
    """log P(rating >= RELEVANT_RATING) [B, num_items] by the rating model (the
    like term's factor; its weight aside)."""
    z = (score_items(model, user, num_items) - like.cut) / like.noise
    liked = 0.5 * tf.math.erfc(-z / math.sqrt(2.0))
    return tf.math.log(tf.maximum(liked, 1e-12))


def with_like(scores: tf.Tensor, weight: float, liked: tf.Tensor | None) -> tf.Tensor:
    """log(max(scores, TOPN_SCORE_FLOOR)) + weight x liked (`log_liked`); scores
    as they are without a like term."""
    if liked is None or not weight:
        return scores
    return tf.math.log(tf.maximum(scores, TOPN_SCORE_FLOOR)) + weight * liked


def factor_scorer(user_factors: np.ndarray, item_factors: np.ndarray, num_items: int,
                  model: MatrixFactorization | None = None,
                  like: LikeTerm | None = None) -> Callable[[tf.Tensor], tf.Tensor]:
    """A `rank_users` scorer of the top-N model: `topn_scores` of these factors."""
    users = tf.constant(user_factors)
    items = tf.constant(item_factors[:num_items])
    return lambda user: topn_scores(users, items, user, num_items, model, like)


def sample_users(eval_users: np.ndarray, max_users: int, seed: int) -> np.ndarray | None:
    """A seeded sample of max_users of the distinct eval users, sorted; None
    to keep them all (max_users 0, or no more users than that)."""
    users = np.unique(eval_users)
    if max_users <= 0 or users.size <= max_users:
        return None
    chosen = np.random.default_rng([seed, _SAMPLE_STREAM]).choice(
        users.size, max_users, replace=False)
    return users[np.sort(chosen)]


@dataclasses.dataclass(frozen=True)
class Judged:
    """Who a ranking is scored on (see the module doc) and what is relevant for them.

    Attributes:
      users: the ranked user indices, ascending.
      rows: the row of `users` each relevant pair belongs to.
      items: the relevant item of each pair.
      users_in_eval: known users with an eval rating, before any sample.
    """
    users: np.ndarray
    rows: np.ndarray
    items: np.ndarray
    users_in_eval: int

    def record(self, k: int, relevant_rating: float) -> dict[str, object]:
        return {'k': k, 'relevant_rating': relevant_rating, 'users': int(self.users.size),
                'users_in_eval': self.users_in_eval,
                'users_with_relevant': int(np.unique(self.rows).size)}


def judge(num_users: int, num_items: int, eval_users: np.ndarray, eval_items: np.ndarray,
          eval_ratings: np.ndarray, relevant_rating: float = RELEVANT_RATING,
          max_users: int = 0, seed: int = 0) -> Judged:
    """The users to rank and their relevant pairs: known users with an eval
    rating (a seeded sample past max_users), eval ratings >= relevant_rating."""
    known = (eval_users < num_users) & (eval_items < num_items)
    users_in_eval = int(np.unique(eval_users[known]).size)
    sample = sample_users(eval_users[known], max_users, seed)
    if sample is not None:
        known &= np.isin(eval_users, sample)
    users, rows = np.unique(eval_users[known], return_inverse=True)
    liked = eval_ratings[known] >= relevant_rating
    return Judged(users, rows[liked], eval_items[known][liked], users_in_eval)


def evaluate_lists(rankers: dict[str, Ranker],
                   catalog: catalog_lib.Catalog, eval_users: np.ndarray,
                   eval_items: np.ndarray, eval_ratings: np.ndarray,
                   k: int = TOP_K, relevant_rating: float = RELEVANT_RATING,
                   max_users: int = 0, seed: int = 0) -> dict[str, object]:
    """Ranking metrics of each ranker on eval ratings (see the module doc).

    Args:
      rankers: name -> a score_block for `rank_users`, or one score per
        item for a ranking that is the same for every user.
      catalog: movies and train pairs.
      eval_users, eval_items, eval_ratings: the eval split, as indices.
      k: the cut-off.
      relevant_rating: eval ratings at or above it are relevant.
      max_users: rank a seeded sample of this many users when there are
        more (every ranker the same ones); 0 ranks all.
      seed: seeds the sample.

    Returns:
      {'k', 'relevant_rating', 'users' (ranked), 'users_in_eval',
      'users_with_relevant', and per ranker name {'precision', 'recall',
      'ndcg', 'coverage'}}.
    """
    judged = judge(catalog.num_users, catalog.num_items, eval_users, eval_items,
                   eval_ratings, relevant_rating, max_users, seed)
    record = judged.record(k, relevant_rating)
    seen = catalog.seen()
    scored = sum(not isinstance(ranker, np.ndarray) for ranker in rankers.values())
    progress = logs.ProgressLog(f'Ranking@{k} on eval: user lists',
                                total=scored * judged.users.size)
    for name, ranker in rankers.items():
        if isinstance(ranker, np.ndarray):
            top = rank_users_by_one_order(ranker, judged.users, seen, k)
        else:
            top = rank_users(ranker, judged.users, seen, catalog.num_items, k,
                             progress=progress)
        record[name] = ranking_metrics(top, judged.rows, judged.items, catalog.num_items, k)
    return record


def evaluate(model: MatrixFactorization, catalog: catalog_lib.Catalog,
             eval_split: data.Ratings, k: int = TOP_K,
             relevant_rating: float = RELEVANT_RATING, max_users: int = 0,
             seed: int = 0,
             topn_factors: tuple[np.ndarray, np.ndarray] | None = None,
             like: LikeTerm | None = None,
             served: Callable[[tf.Tensor], tf.Tensor] | None = None) -> dict[str, object]:
    """The served lists, the rating model's, most popular and fallback, on the eval split.

    'model' is what `recommend` serves: the top-N model's lists when
    served or topn_factors are given (the rating model's then appear as
    'rating_model'), else the lists ranked by predicted rating.

    Args:
      model: the trained model.
      catalog: the train pairs and counts the export also uses.
      eval_split: the eval split (`data.load_ratings`; the trainer's copy).
      k: the cut-off.
      relevant_rating: eval ratings at or above it are relevant.
      max_users: rank a seeded sample of this many eval users when there
        are more; 0 ranks all.
      seed: seeds the sample.
      topn_factors: the top-N model's (user, movie) factors, or None.
      like: the rating model's part in the top-N score (`topn_scores`), or None.
      served: the served top-N model's scorer (`lists.scorer`), in place of
        topn_factors and like.

    Returns:
      What `evaluate_lists` returns.
    """
    users, items, ratings = (eval_split.user.numpy(), eval_split.item.numpy(),
                             eval_split.rating.numpy())
    num_items = catalog.num_items
    by_rating = lambda user: score_items(model, user, num_items)  # noqa: E731
    rankers: dict[str, Ranker] = {'model': by_rating}
    if topn_factors is not None and served is None:
        served = factor_scorer(*topn_factors, num_items, model, like)
    if served is not None:
        rankers = {'model': served, 'rating_model': by_rating}
    record = evaluate_lists(
        {**rankers, 'most_popular': catalog.item_counts.astype(np.float64),
         'fallback': fallback_scores(model, catalog.item_counts).numpy()},
        catalog, users, items, ratings, k, relevant_rating, max_users, seed)
    logger.info('Ranking@%d on eval: %s', k, summary_line(record))
    return record


def summary_line(record: dict[str, object]) -> str:
    """One line: the model's ranking metrics next to the most-popular baseline."""
    def metrics(name: str) -> str:
        values = record[name]
        return (f'precision {values["precision"]:.4f}, recall {values["recall"]:.4f}, '
                f'NDCG {values["ndcg"]:.4f}, coverage {values["coverage"]:.3f}')
    sampled = record.get('users_in_eval', record['users']) > record['users']
    sample = (f', a seeded sample of {record["users"]} of {record["users_in_eval"]} eval users'
              if sampled else '')
    rating_model = (f'; ranked by predicted rating: {metrics("rating_model")}'
                    if 'rating_model' in record else '')
    return (f'ranking@{record["k"]} ({record["users_with_relevant"]} users with an '
            f'eval rating >= {record["relevant_rating"]:g}{sample}): {metrics("model")}'
            f'{rating_model}; most popular: {metrics("most_popular")}')
