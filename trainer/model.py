"""Biased matrix factorisation: the parameters, the prediction rule and the objective.

The model predicts the rating user u gives item i as

    r_hat(u, i) = mu + b_u + b_i + p_u . q_i

where mu is the global mean (the train mean rating, fixed), b_u and b_i are
the user and item biases, and p_u, q_i are rows of the user and item factor
matrices.  Training minimises, over the ratings r of a batch,

    mean over (u, i, r) of  (r - r_hat(u, i))^2
                            + l2 * (|p_u|^2 + |q_i|^2)
                            + l2_bias * (b_u^2 + b_i^2)

The L2 terms are per example, on the rows the example touches, so a user or
item with many ratings is regularised more often, as in the SGD of Surprise's
`SVD`.  Biases start at zero and factors at N(0, init_stddev^2).

Each table has one row per vocabulary entry plus `features.NUM_OOV_BUCKETS`
out-of-vocabulary rows (index == vocabulary size).  Those rows start at zero
and no train example touches them, so an unknown user is predicted as
mu + b_i, an unknown item as mu + b_u.

This module holds no IO, flags or logging setup.  Create the model inside
`strategy.scope()`: its variables use `ONLY_FIRST_REPLICA` aggregation so
that sparse row updates (computed identically on every replica from
all-reduced gradients) work under a mirrored strategy.
"""

from __future__ import annotations

import tensorflow as tf

from trainer import features

# The trainable tables, by name; optimisers key their slots by these names.
PARAMETER_NAMES = ('user_bias', 'item_bias', 'user_factors', 'item_factors')

_AGGREGATION = tf.VariableAggregation.ONLY_FIRST_REPLICA


def _table(initial_value: tf.Tensor, name: str) -> tf.Variable:
    return tf.Variable(initial_value, name=name, aggregation=_AGGREGATION)


def _normal_rows(vocab_size: int, num_factors: int, init_stddev: float,
                 seed: tuple[int, int]) -> tf.Tensor:
    """Seeded N(0, init_stddev^2) rows for the vocabulary, then zero OOV rows."""
    rows = tf.random.stateless_normal(
        [vocab_size, num_factors], seed=seed, stddev=init_stddev)
    oov_rows = tf.zeros([features.NUM_OOV_BUCKETS, num_factors])
    return tf.concat([rows, oov_rows], axis=0)


class MatrixFactorization(tf.Module):
    """Biased matrix factorisation over user and item vocabulary indices.

    Attributes:
      global_mean: scalar, non-trainable: the train mean rating.
      user_bias: [user_vocab_size + NUM_OOV_BUCKETS].
      item_bias: [item_vocab_size + NUM_OOV_BUCKETS].
      user_factors: [user_vocab_size + NUM_OOV_BUCKETS, num_factors].
      item_factors: [item_vocab_size + NUM_OOV_BUCKETS, num_factors].
    """

    def __init__(self, user_vocab_size: int, item_vocab_size: int,
                 num_factors: int, global_mean: float, init_stddev: float,
                 seed: int, name: str | None = None) -> None:
        """Creates the tables; call inside the distribution strategy's scope.

        Args:
          user_vocab_size: users in the TFT vocabulary (OOV rows excluded).
          item_vocab_size: items in the TFT vocabulary (OOV rows excluded).
          num_factors: length of each factor row.
          global_mean: the train mean rating.
          init_stddev: standard deviation of the initial factors.
          seed: seed of the initial factors (stateless, so reproducible).
          name: the tf.Module name.

        Raises:
          ValueError: if a size is not positive or init_stddev is negative.
        """
        super().__init__(name=name)
        if min(user_vocab_size, item_vocab_size, num_factors) < 1:
            raise ValueError(
                'vocabulary sizes and num_factors must be >= 1, got '
                f'{user_vocab_size!r}, {item_vocab_size!r}, {num_factors!r}')
        if init_stddev < 0:
            raise ValueError(f'init_stddev must be >= 0, got {init_stddev!r}')
        self.num_factors = num_factors
        self.global_mean = tf.Variable(
            float(global_mean), dtype=tf.float32, trainable=False,
            name='global_mean', aggregation=_AGGREGATION)
        user_rows = user_vocab_size + features.NUM_OOV_BUCKETS
        item_rows = item_vocab_size + features.NUM_OOV_BUCKETS
        self.user_bias = _table(tf.zeros([user_rows]), 'user_bias')
        self.item_bias = _table(tf.zeros([item_rows]), 'item_bias')
        self.user_factors = _table(
            _normal_rows(user_vocab_size, num_factors, init_stddev, (seed, 1)),
            'user_factors')
        self.item_factors = _table(
            _normal_rows(item_vocab_size, num_factors, init_stddev, (seed, 2)),
            'item_factors')

    def parameters(self) -> dict[str, tf.Variable]:
        """The trainable tables keyed by PARAMETER_NAMES."""
        return {name: getattr(self, name) for name in PARAMETER_NAMES}

    def gather(self, user: tf.Tensor, item: tf.Tensor) -> dict[str, tf.Tensor]:
        """The rows a batch touches, keyed by PARAMETER_NAMES.

        Gathering once and computing prediction and penalty from the same rows
        makes the gradients `tf.IndexedSlices` over the touched rows only.
        """
        indices = {'user_bias': user, 'item_bias': item,
                   'user_factors': user, 'item_factors': item}
        return {name: tf.gather(variable, indices[name])
                for name, variable in self.parameters().items()}

    def predict_from_rows(self, rows: dict[str, tf.Tensor]) -> tf.Tensor:
        """mu + b_u + b_i + p_u . q_i for rows from `gather`."""
        dot = tf.reduce_sum(rows['user_factors'] * rows['item_factors'], axis=-1)
        return self.global_mean + rows['user_bias'] + rows['item_bias'] + dot

    def __call__(self, user: tf.Tensor, item: tf.Tensor) -> tf.Tensor:
        """Predicted ratings (unclipped) for int64 index vectors user and item."""
        return self.predict_from_rows(self.gather(user, item))


def squared_errors(rating: tf.Tensor, prediction: tf.Tensor) -> tf.Tensor:
    """Per-example (r - r_hat)^2."""
    return tf.math.squared_difference(rating, prediction)


def l2_penalties(rows: dict[str, tf.Tensor], l2: float,
                 l2_bias: float) -> tf.Tensor:
    """Per-example l2 * (|p_u|^2 + |q_i|^2) + l2_bias * (b_u^2 + b_i^2)."""
    factors = (tf.reduce_sum(tf.square(rows['user_factors']), axis=-1)
               + tf.reduce_sum(tf.square(rows['item_factors']), axis=-1))
    biases = tf.square(rows['user_bias']) + tf.square(rows['item_bias'])
    return l2 * factors + l2_bias * biases


def per_example_loss(model: MatrixFactorization, user: tf.Tensor,
                     item: tf.Tensor, rating: tf.Tensor, l2: float,
                     l2_bias: float) -> tf.Tensor:
    """The objective's per-example terms; their mean is the batch objective."""
    rows = model.gather(user, item)
    prediction = model.predict_from_rows(rows)
    return squared_errors(rating, prediction) + l2_penalties(rows, l2, l2_bias)
