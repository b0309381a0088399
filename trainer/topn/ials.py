"""Implicit-feedback ALS (iALS): the top-N model's maths, in TensorFlow ops.

Owns the objective, one alternating half-step and the scores; the training
run around it (validation, refit, checkpoints) is `trainer.topn.train`'s.

The model scores user u and movie i by s_ui = p_u . q_i and is fitted on the
whole user x movie matrix (Hu, Koren & Volinsky 2008), in the form of
Rendle et al. 2022 ("Revisiting the Performance of iALS on Item
Recommendation Benchmarks"): every pair is pulled towards 0 with a small
weight alpha0, a rated pair towards its target t_ui with weight c_ui, and
each row's ridge penalty grows with its ratings:

    L = sum over rated (u, i) of c_ui (t_ui - s_ui)^2
      + alpha0 * sum over all (u, i) of s_ui^2
      + l2 * sum_u (n_u + alpha0 * movies)^nu |p_u|^2
      + l2 * sum_i (n_i + alpha0 * users)^nu |q_i|^2

    g(r) = max(r - RATING_SHIFT, RATING_FLOOR)      (3 stars: 1, 5 stars: 3, 1-2 stars: 0.2)
    c_ui = g(r_ui)^confidence                        (0: every rating alike)
    t_ui = g(r_ui) ('rating' targets) or 1 ('watched': classic iALS)

'weighted' is Hu, Koren & Volinsky's own weighting, as `implicit` fits it:
every rated pair pulled towards 1 with weight alpha0 (1 + g(r)^confidence),
every other pair towards 0 with weight alpha0.  In the form above that is

    c_ui = alpha0 g(r_ui)^confidence,   t_ui = 1 + 1 / g(r_ui)^confidence

(the rated pair's alpha0 s^2 of the all-pairs sum makes up the rest; the
loss differs by a constant).  On generated 100k it scored eval NDCG@10
0.3906 alone at 128 factors (`implicit`'s, same weights: 0.3879), and a
blend with graded EASE 0.4130 (weight 0.5) where one with 'watched' iALS
did not pass EASE alone (docs/evaluation.md).
With 'rating' targets a movie the user disliked should score about as low
as an unrated one and a 5-star one highest: the list should hold movies the
user would pick *and* like ("relevant" in the ranking evaluation means rated
4 or more), which is what EASE on the same graded matrix (Steck 2019)
exploits.  Rendle et al. scale the penalty with each row's ratings (nu = 1,
with l2 0.003 and alpha0 0.1 on ML-20M); the trainer's default is nu = 0 with
an l2 that grows with the data (`config.default_topn_l2`).
Fixing the movie factors Q, each user's best p_u solves

    (alpha0 Q^T Q + sum_{i rated} c_ui q_i q_i^T + l2_u I) p_u = sum_{i rated} c_ui t_ui q_i

(and the same with the roles swapped).  Q^T Q is shared by every user, so
the unrated pairs cost nothing per pair.  The systems are solved by a few
conjugate-gradient steps started from the current factors, as `implicit`
does (Takacs, Pilaszy & Tikk 2011): each step costs one pass over the rated
pairs (a gather, a row dot product and a segment sum, vectorised over all
pairs), so an iteration is O(ratings x factors) instead of the
O(ratings x factors^2) of exact solves.  With as many steps as factors, CG
solves exactly (the tests check it against `np.linalg.solve`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# g(r) = max(r - RATING_SHIFT, RATING_FLOOR): 3 stars 1, 4 stars 2, 5 stars
# 3; 1 and 2 stars (and half stars below 2.2) 0.2.
RATING_SHIFT = 2.0
RATING_FLOOR = 0.2
# Rated pairs per chunk of a half-step: bounds the [chunk, factors] gathers
# (64 MB of float32 at 128 factors).
_CHUNK = 1 << 17


def preference(ratings: np.ndarray) -> np.ndarray:
    """g(r) = max(r - RATING_SHIFT, RATING_FLOOR), float32."""
    return np.maximum(np.asarray(ratings, np.float32) - RATING_SHIFT,
                      RATING_FLOOR).astype(np.float32)


def confidences(ratings: np.ndarray, confidence: float) -> np.ndarray:
    """c_ui = g(r)^confidence of each rated pair (see the module doc), float32."""
    return (preference(ratings) ** confidence).astype(np.float32)


def row_penalties(counts: np.ndarray, l2: float, exponent: float,
                  unobserved_weight: float, other_side: int) -> np.ndarray:
    """l2 * (n + alpha0 * other_side)^nu per row, float32 (see the module doc)."""
    counts = np.asarray(counts, np.float64)
    return (l2 * (counts + unobserved_weight * other_side) ** exponent).astype(np.float32)


def pair_weights(ratings: np.ndarray, confidence: float, kind: str,
                 unobserved_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """(c_ui, t_ui) of each rated pair, float32: `confidences` and `targets`, or for
    'weighted' alpha0 g^confidence and 1 + 1 / g^confidence (see the module doc)."""
    if kind == 'weighted':
        worth = preference(ratings).astype(np.float64) ** confidence
        return ((unobserved_weight * worth).astype(np.float32),
                (1.0 + 1.0 / worth).astype(np.float32))
    return confidences(ratings, confidence), targets(ratings, kind)


def targets(ratings: np.ndarray, kind: str) -> np.ndarray:
    """t_ui of each rated pair: 1 ('watched') or g(r) ('rating'), float32."""
    if kind == 'watched':
        return np.ones(np.shape(ratings), np.float32)
    if kind == 'rating':
        return preference(ratings)
    raise ValueError(f'unknown target kind {kind!r}; use watched or rating '
                     '(weighted: pair_weights)')


def initial_factors(rows: int, factors: int, seed: int, stream: int,
                    stddev: float) -> np.ndarray:
    """Seeded N(0, stddev^2 / factors) rows, so initial scores have variance ~stddev^4."""
    rng = np.random.default_rng([seed, stream])
    return (rng.standard_normal((rows, factors)) * (stddev / np.sqrt(factors))
            ).astype(np.float32)


@tf.function(reduce_retracing=True)
def _apply(x: tf.Tensor, gram: tf.Tensor, fixed: tf.Tensor, rows: tf.Tensor,
           columns: tf.Tensor, weight: tf.Tensor, l2: tf.Tensor) -> tf.Tensor:
    """A x for every row's system: x G + l2_row x + sum_j c_j (y_j . x_row) y_j."""
    out = tf.matmul(x, gram) + l2[:, None] * x
    size = tf.size(rows)
    for start in tf.range(0, size, _CHUNK):
        end = tf.minimum(start + _CHUNK, size)
        row, y = rows[start:end], tf.gather(fixed, columns[start:end])
        dots = tf.reduce_sum(y * tf.gather(x, row), axis=1) * weight[start:end]
        out += tf.math.unsorted_segment_sum(dots[:, None] * y, row, tf.shape(x)[0])
    return out


@tf.function(reduce_retracing=True)
def _right_hand_side(fixed: tf.Tensor, rows: tf.Tensor, columns: tf.Tensor,
                     weight: tf.Tensor, num_rows: tf.Tensor) -> tf.Tensor:
    """sum over each row's rated pairs of weight_j y_j, [num_rows, factors]."""
    out = tf.zeros([num_rows, tf.shape(fixed)[1]], fixed.dtype)
    size = tf.size(rows)
    for start in tf.range(0, size, _CHUNK):
        end = tf.minimum(start + _CHUNK, size)
        y = tf.gather(fixed, columns[start:end])
        out += tf.math.unsorted_segment_sum(weight[start:end, None] * y,
                                            rows[start:end], num_rows)
    return out


def half_step(solved: tf.Tensor, fixed: tf.Tensor, rows: tf.Tensor,
              columns: tf.Tensor, weight: tf.Tensor, target: tf.Tensor, l2: tf.Tensor,
              unobserved_weight: float, cg_steps: int) -> tf.Tensor:
    """New factors for one side, the other side fixed (see the module doc).

    Args:
      solved: the side's current factors [R, k], the CG starting point.
      fixed: the other side's factors [C, k].
      rows: int [N] the solved side's row of each rated pair.
      columns: int [N] the fixed side's row of each rated pair.
      weight: float [N] c of each rated pair.
      target: float [N] t of each rated pair.
      l2: float [R] the ridge penalty of each solved row (`row_penalties`).
      unobserved_weight: alpha0, the weight pulling every pair towards 0.
      cg_steps: conjugate-gradient steps.

    Returns:
      [R, k] factors; rows without rated pairs solve to zero.
    """
    gram = unobserved_weight * tf.matmul(fixed, fixed, transpose_a=True)
    b = _right_hand_side(fixed, rows, columns, weight * target, tf.shape(solved)[0])
    x = solved
    residual = b - _apply(x, gram, fixed, rows, columns, weight, l2)
    direction = residual
    norm = tf.reduce_sum(residual * residual, axis=1, keepdims=True)
    for _ in range(cg_steps):
        product = _apply(direction, gram, fixed, rows, columns, weight, l2)
        step = tf.math.divide_no_nan(
            norm, tf.reduce_sum(direction * product, axis=1, keepdims=True))
        x += step * direction
        residual -= step * product
        new_norm = tf.reduce_sum(residual * residual, axis=1, keepdims=True)
        direction = residual + tf.math.divide_no_nan(new_norm, norm) * direction
        norm = new_norm
    return x


@tf.function(reduce_retracing=True)
def _rated_loss(user_factors: tf.Tensor, item_factors: tf.Tensor, users: tf.Tensor,
                items: tf.Tensor, weight: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    """sum over rated pairs of c (t - s)^2, a chunk of pairs at a time, in float64."""
    total = tf.constant(0.0, tf.float64)
    size = tf.size(users)
    for start in tf.range(0, size, _CHUNK):
        end = tf.minimum(start + _CHUNK, size)
        scores = tf.reduce_sum(tf.gather(user_factors, users[start:end])
                               * tf.gather(item_factors, items[start:end]), axis=1)
        error = tf.cast(target[start:end] - scores, tf.float64)
        total += tf.reduce_sum(tf.cast(weight[start:end], tf.float64) * error * error)
    # (scores in the factors' precision, sums in float64)
    return total


def objective(user_factors: np.ndarray, item_factors: np.ndarray, users: np.ndarray,
              items: np.ndarray, weight: np.ndarray, target: np.ndarray,
              user_l2: np.ndarray, item_l2: np.ndarray, unobserved_weight: float) -> float:
    """L of the module doc, without forming the user x movie matrix.

    The sum over all pairs is trace(P^T P Q^T Q); the rated pairs' scores are
    computed in TensorFlow ops a chunk at a time, in the factors' precision.
    """
    dtype = np.result_type(user_factors, item_factors)
    rated = float(_rated_loss(tf.constant(user_factors, dtype), tf.constant(item_factors, dtype),
                              tf.constant(users), tf.constant(items),
                              tf.constant(weight, dtype), tf.constant(target, dtype)))
    return objective_from_rated(rated, user_factors, item_factors, user_l2, item_l2,
                                unobserved_weight)


def objective_from_rated(rated: float, user_factors: np.ndarray, item_factors: np.ndarray,
                         user_l2: np.ndarray, item_l2: np.ndarray, unobserved_weight: float,
                         user_gram: np.ndarray | None = None) -> float:
    """L from its rated part, sum over rated pairs of c (t - s)^2, computed elsewhere
    (the C++ half-step returns it): the unobserved pull and the penalties need
    only the factors, O((users + movies) x factors^2), in float64.  user_gram:
    P^T P in float64, if the caller has it."""
    p, q = np.asarray(user_factors, np.float64), np.asarray(item_factors, np.float64)
    if user_gram is None:
        user_gram = p.T @ p
    everything = float(np.sum(user_gram * (q.T @ q)))
    penalty = float(np.sum(user_l2 * np.sum(p * p, axis=1))
                    + np.sum(item_l2 * np.sum(q * q, axis=1)))
    return rated + unobserved_weight * everything + penalty
