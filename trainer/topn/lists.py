"""What the served lists are scored by: iALS factors, EASE neighbours, or a blend of both.

Owns the top-N model as it is served (`ListModel`) and its scores
(`ListScorer`), which the export's `recommend` signature and the trainer's
ranking evaluation both call, so what is measured is what is served:

- 'ials': p_u . q_i (`trainer.topn.ials`);
- 'ease': sum over the user's train movies j of x_uj B_ji over the stored
  neighbours, or all of B (`trainer.topn.ease`);
- 'blend': (1 - w) z(iALS) + w z(EASE), each standardised per user over
  the catalogue (z = (s - mean) / std), w chosen on validation.

With a like term (`ranking.LikeTerm`), each model's score s becomes
log(max(s, TOPN_SCORE_FLOOR)) + beta x log P(rating >= 4) by the rating
model before any blend (`ranking.topn_scores` for iALS: the same formula).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from trainer.rating.model import MatrixFactorization
from trainer.topn import ease as ease_lib
from trainer.topn import ranking

FAMILIES = ('ials', 'ease', 'blend')
# Standard deviations below this count as this (a user with constant scores).
_MIN_STD = 1e-9


@dataclasses.dataclass(frozen=True)
class ListModel:
    """The served top-N model.

    Attributes:
      family: 'ials', 'ease' or 'blend'.
      user_factors, item_factors: iALS's [users + OOV, k] and [movies + OOV, k]
        (ials and blend), else None.
      neighbours: EASE's stored neighbours (ease and blend), else None.
      seen_values: x of each train pair in the catalogue's seen order
        (`ease.user_values`; ease and blend), else None.
      blend: EASE's weight w in a blend (1 for ease, 0 for ials).
    """
    family: str
    user_factors: np.ndarray | None = None
    item_factors: np.ndarray | None = None
    neighbours: ease_lib.Neighbours | None = None
    seen_values: np.ndarray | None = None
    blend: float = 0.0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f'unknown top-N family {self.family!r}; use one of {FAMILIES}')
        if self.family != 'ease' and self.user_factors is None:
            raise ValueError(f'a {self.family} top-N model needs iALS factors')
        if self.family != 'ials' and (self.neighbours is None or self.seen_values is None):
            raise ValueError(f'a {self.family} top-N model needs EASE neighbours and values')

    @property
    def uses_ials(self) -> bool:
        return self.family != 'ease'

    @property
    def uses_ease(self) -> bool:
        return self.family != 'ials'


def _with_like(scores: tf.Tensor, user: tf.Tensor, num_items, model, like) -> tf.Tensor:
    if like is None or not like.weight:
        return scores
    return ranking.with_like(scores, like.weight,
                             ranking.log_liked(user, num_items, model, like))


def standardised(scores: tf.Tensor) -> tf.Tensor:
    """Each row's (scores - mean) / std: the blend's scale."""
    mean, variance = tf.nn.moments(scores, axes=[1], keepdims=True)
    return (scores - mean) / tf.maximum(tf.sqrt(variance), _MIN_STD)


class ListScorer(tf.Module):
    """A ListModel's tensors (variables in an export, constants otherwise) and its scores."""

    def __init__(self, lists: ListModel, seen_row_splits: np.ndarray,
                 as_variables: bool) -> None:
        super().__init__(name='list_scorer')

        def tensor(value: np.ndarray, dtype: tf.DType, name: str):
            value = tf.constant(value, dtype)
            return tf.Variable(value, trainable=False, name=name) if as_variables else value
        self.family = lists.family
        self.blend = float(lists.blend)
        self.user_factors = self.item_factors = None
        self.neighbour_index = self.neighbour_weight = self.seen_values = None
        self.ease_dense = None
        if lists.uses_ials:
            self.user_factors = tensor(lists.user_factors, tf.float32, 'topn_user_factors')
            self.item_factors = tensor(lists.item_factors, tf.float32, 'topn_item_factors')
        if lists.uses_ease and lists.neighbours.dense is not None:
            self.ease_dense = tensor(lists.neighbours.dense, tf.float32, 'ease_dense_weights')
        elif lists.uses_ease:
            indices, weights = ease_lib.sparse_weights(lists.neighbours)
            self.neighbour_index = tensor(indices, tf.int64, 'ease_indices')
            self.neighbour_weight = tensor(weights, tf.float32, 'ease_weights')
        if lists.uses_ease:
            self.seen_values = tensor(lists.seen_values, tf.float32, 'ease_seen_values')
            self.seen_row_splits = tf.constant(seen_row_splits, tf.int64)

    def __call__(self, user: tf.Tensor, num_items, seen: tf.RaggedTensor,
                 model: MatrixFactorization | None = None,
                 like: ranking.LikeTerm | None = None) -> tf.Tensor:
        """Scores [B, num_items] of users [B]; seen: every user's train movies."""
        parts = []
        if self.user_factors is not None:
            parts.append(ranking.topn_scores(self.user_factors, self.item_factors, user,
                                             num_items, model, like))
        if self.seen_values is not None:
            values = tf.RaggedTensor.from_row_splits(self.seen_values, seen.row_splits,
                                                     validate=False)
            if self.ease_dense is not None:
                ease_scores = ease_lib.dense_matrix_scores(self.ease_dense, seen, values, user,
                                                           num_items)
            else:
                ease_scores = ease_lib.scores(self.neighbour_index, self.neighbour_weight,
                                              seen, values, user, num_items)
            parts.append(_with_like(ease_scores, user, num_items, model, like))
        if len(parts) == 1:
            return parts[0]
        return ((1.0 - self.blend) * standardised(parts[0])
                + self.blend * standardised(parts[1]))


def scorer(lists: ListModel, seen: tf.RaggedTensor, num_items: int,
           model: MatrixFactorization | None = None,
           like: ranking.LikeTerm | None = None):
    """A `ranking.rank_users` scorer of lists (constants, not variables)."""
    scores = ListScorer(lists, seen.row_splits.numpy(), as_variables=False)
    return lambda user: scores(user, num_items, seen, model, like)


def record(lists: ListModel) -> dict[str, object]:
    """What metrics.json says of the served model's shape."""
    out: dict[str, object] = {'family': lists.family, 'blend': lists.blend}
    if lists.uses_ials:
        out['factors'] = int(lists.user_factors.shape[1])
    if lists.uses_ease:
        out.update(ease_lambda=lists.neighbours.lam, ease_dropout=lists.neighbours.dropout,
                   ease_form=lists.neighbours.form,
                   ease_user_exponent=lists.neighbours.user_exponent,
                   ease_movies=lists.neighbours.movies,
                   ease_neighbours=int(lists.neighbours.count),
                   ease_dense=lists.neighbours.dense is not None)
    return out
