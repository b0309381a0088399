"""Biased matrix factorisation: the parameters, the prediction rule and the objective.

The model predicts the rating user u gives item i as

    r_hat(u, i) = mu + b_u + b_i + p_u . q_i

where mu is the global mean (the train mean rating, fixed), b_u and b_i are
the user and item biases, and p_u, q_i are rows of the user and item factor
matrices.  Training minimises, over the ratings r of a batch,

    mean over (u, i, r) of  (r - r_hat(u, i))^2
                            + l2 * (w_u |p_u|^2 + w_i |q_i|^2)
                            + l2_bias * (w_u b_u^2 + w_i b_i^2)

The L2 terms are per example, on the rows the example touches, so a user or
item with many ratings is regularised more often, as in the SGD of Surprise's
`SVD`; the row weights w (1 unless the trainer passes
`frequency_weights`) temper that: w = n^-alpha for a row with n train
ratings, scaled to mean 1 over the ratings, so alpha = 0 is Surprise's
per-example penalty and alpha = 1 one penalty per row whatever its count.
Biases start at zero and factors at N(0, init_stddev^2).

Each side is one table, `user_embedding` and `item_embedding`, whose row is
the factors followed by the bias ([p_u, b_u]): a training step gathers, sums
duplicate rows of and updates two tables, not four, which halves the sparse
operations that dominate a step on a CPU.  The properties `user_factors`,
`user_bias`, `item_factors` and `item_bias` read the columns.

Each table has one row per vocabulary entry plus `features.NUM_OOV_BUCKETS`
out-of-vocabulary rows (index == vocabulary size).  Those rows start at zero
and no train example touches them, so an unknown user is predicted as
mu + b_i, an unknown item as mu + b_u.

`loss_and_gradients` writes the objective's gradient out by hand (it is
short, and tested against `tf.GradientTape`): the per-example gradient rows
come out as plain tensors ready for a sparse update, with no tape.

With `implicit_feedback` (SVD++ style, Koren 2008) the user's factors are
p_u + |N(u)|^-1/2 * sum of y_j over the items j in N(u), the items u rated
among the ratings the model is fitted on (`set_implicit_ratings`): which
movies a user chose to rate says something about their taste even before
the ratings do.  The y_j are a third table, `implicit_embedding`, with the
per-example penalty l2 * mean over N(u) of |y_j|^2.  N(u) is fixed once the
model is fitted, so `folded` turns the model into a plain one with the sum
added to each user's factors: export, ranking and serving never see y.

This module holds no IO, flags or logging setup.  Create the model inside
`strategy.scope()`: its variables use `ONLY_FIRST_REPLICA` aggregation so
that sparse row updates (computed identically on every replica from
all-reduced gradients) work under a mirrored strategy.
"""

from __future__ import annotations

import tensorflow as tf

from trainer import features

# The trainable tables, by name; optimisers key their slots by these names.
PARAMETER_NAMES = ('user_embedding', 'item_embedding')
# The third table of a model with implicit feedback.
IMPLICIT_NAME = 'implicit_embedding'

_AGGREGATION = tf.VariableAggregation.ONLY_FIRST_REPLICA


def _embedding(vocab_size: int, num_factors: int, init_stddev: float,
               seed: tuple[int, int], name: str) -> tf.Variable:
    """[vocab + OOV, num_factors + 1]: seeded N(0, init_stddev^2) factors, zero
    bias column, zero OOV rows."""
    factors = tf.random.stateless_normal(
        [vocab_size, num_factors], seed=seed, stddev=init_stddev)
    rows = tf.concat([factors, tf.zeros([vocab_size, 1])], axis=1)
    oov_rows = tf.zeros([features.NUM_OOV_BUCKETS, num_factors + 1])
    return tf.Variable(tf.concat([rows, oov_rows], axis=0), name=name,
                       aggregation=_AGGREGATION)


class MatrixFactorization(tf.Module):
    """Biased matrix factorisation over user and item vocabulary indices.

    Attributes:
      global_mean: scalar, non-trainable: the train mean rating.
      user_embedding: [user_vocab_size + NUM_OOV_BUCKETS, num_factors + 1],
        each row the user's factors then bias.
      item_embedding: [item_vocab_size + NUM_OOV_BUCKETS, num_factors + 1].
      implicit_embedding: with implicit_feedback, the y_j,
        [item_vocab_size + NUM_OOV_BUCKETS, num_factors], starting at zero.
    """

    def __init__(self, user_vocab_size: int, item_vocab_size: int,
                 num_factors: int, global_mean: float, init_stddev: float,
                 seed: int, name: str | None = None,
                 implicit_feedback: bool = False) -> None:
        """Creates the tables; call inside the distribution strategy's scope.

        Args:
          user_vocab_size: users in the TFT vocabulary (OOV rows excluded).
          item_vocab_size: items in the TFT vocabulary (OOV rows excluded).
          num_factors: length of each factor row.
          global_mean: the train mean rating.
          init_stddev: standard deviation of the initial factors.
          seed: seed of the initial factors (stateless, so reproducible).
          name: the tf.Module name.
          implicit_feedback: add the SVD++ term (see the module doc); call
            `set_implicit_ratings` before predicting.

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
        self.user_embedding = _embedding(user_vocab_size, num_factors,
                                         init_stddev, (seed, 1), 'user_embedding')
        self.item_embedding = _embedding(item_vocab_size, num_factors,
                                         init_stddev, (seed, 2), 'item_embedding')
        self.implicit_feedback = implicit_feedback
        if implicit_feedback:
            self.implicit_embedding = tf.Variable(
                tf.zeros([item_vocab_size + features.NUM_OOV_BUCKETS, num_factors]),
                name=IMPLICIT_NAME, aggregation=_AGGREGATION)
        self._implicit: tuple[tf.Tensor, tf.Tensor, tf.Tensor] | None = None

    @property
    def user_factors(self) -> tf.Tensor:
        return self.user_embedding[:, :self.num_factors]

    @property
    def user_bias(self) -> tf.Tensor:
        return self.user_embedding[:, self.num_factors]

    @property
    def item_factors(self) -> tf.Tensor:
        return self.item_embedding[:, :self.num_factors]

    @property
    def item_bias(self) -> tf.Tensor:
        return self.item_embedding[:, self.num_factors]

    def set_weights(self, *, user_factors: object = None, user_bias: object = None,
                    item_factors: object = None, item_bias: object = None) -> None:
        """Assigns the given parts of the tables (OOV rows included); others stay."""
        k = self.num_factors
        for table, factors, bias in ((self.user_embedding, user_factors, user_bias),
                                     (self.item_embedding, item_factors, item_bias)):
            if factors is not None:
                table.assign(tf.concat([tf.constant(factors, tf.float32),
                                        table[:, k:]], axis=1))
            if bias is not None:
                table.assign(tf.concat([table[:, :k],
                                        tf.constant(bias, tf.float32)[:, None]], axis=1))

    def parameters(self) -> dict[str, tf.Variable]:
        """The trainable tables keyed by PARAMETER_NAMES (and IMPLICIT_NAME)."""
        names = PARAMETER_NAMES + ((IMPLICIT_NAME,) if self.implicit_feedback else ())
        return {name: getattr(self, name) for name in names}

    def set_implicit_ratings(self, user: object, item: object) -> None:
        """Sets N(u): the items each user rated among the fitted ratings.

        Args:
          user: user indices of the ratings the model is fitted on.
          item: their item indices; (user, item) pairs are unique.
        """
        user = tf.cast(tf.convert_to_tensor(user), tf.int64)
        item = tf.cast(tf.convert_to_tensor(item), tf.int64)
        rows = self.user_embedding.shape[0]
        order = tf.argsort(user, stable=True)
        counts = tf.math.bincount(user, minlength=rows, maxlength=rows, dtype=tf.int64)
        splits = tf.concat([[0], tf.cumsum(counts)], axis=0)
        scale = tf.math.divide_no_nan(1.0, tf.sqrt(tf.cast(counts, tf.float32)))
        self._implicit = (splits, tf.gather(item, order), scale)

    def implicit_terms(self, users: tf.Tensor) -> dict[str, tf.Tensor]:
        """The implicit sums of distinct users, and what their gradient needs.

        Returns:
          'offset': |N(u)|^-1/2 * sum of y_j over N(u), [U, num_factors];
          'items': every j in N(u) of every user, concatenated;
          'rows': their y rows;
          'owner': the position in users each of those belongs to;
          'scale': |N(u)|^-1/2 per user (0 for a user with none), [U];
          'mean_square': mean |y_j|^2 over N(u) per user, [U].

        Raises:
          ValueError: set_implicit_ratings was not called.
        """
        if self._implicit is None:
            raise ValueError('a model with implicit feedback needs set_implicit_ratings '
                             'before it predicts')
        splits, items, scale = self._implicit
        users = tf.cast(users, tf.int64)
        ranges = tf.ragged.range(tf.gather(splits, users), tf.gather(splits, users + 1))
        owner = ranges.value_rowids()
        rated = tf.gather(items, ranges.flat_values)
        implicit_rows = tf.gather(self.implicit_embedding, rated)
        count = tf.size(users, out_type=tf.int64)
        user_scale = tf.gather(scale, users)
        return {
            'offset': tf.math.unsorted_segment_sum(implicit_rows, owner, count)
                      * user_scale[:, None],
            'items': rated, 'rows': implicit_rows, 'owner': owner, 'scale': user_scale,
            'mean_square': tf.math.unsorted_segment_sum(
                tf.reduce_sum(tf.square(implicit_rows), axis=-1), owner, count)
                * tf.square(user_scale)}

    def implicit_offsets(self) -> tf.Tensor:
        """Every user's implicit sum, laid out like the user table (zero bias column)."""
        offset = self.implicit_terms(tf.range(tf.shape(self.user_embedding, tf.int64)[0]))
        return tf.pad(offset['offset'], [[0, 0], [0, 1]])

    def effective_user_embedding(self) -> tf.Tensor:
        """The user table with the implicit sums added to the factors (the table itself without)."""
        if not self.implicit_feedback:
            return tf.convert_to_tensor(self.user_embedding)
        return self.user_embedding + self.implicit_offsets()

    def gather(self, user: tf.Tensor, item: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The (user rows, item rows) a batch touches, [B, num_factors + 1] each."""
        return (tf.gather(self.user_embedding, user),
                tf.gather(self.item_embedding, item))

    def predict_from_rows(self, user_rows: tf.Tensor, item_rows: tf.Tensor) -> tf.Tensor:
        """mu + b_u + b_i + p_u . q_i for rows from `gather`."""
        k = self.num_factors
        dot = tf.reduce_sum(user_rows[:, :k] * item_rows[:, :k], axis=-1)
        return self.global_mean + user_rows[:, k] + item_rows[:, k] + dot

    def __call__(self, user: tf.Tensor, item: tf.Tensor) -> tf.Tensor:
        """Predicted ratings (unclipped) for int index vectors user and item."""
        user_rows, item_rows = self.gather(user, item)
        if self.implicit_feedback:
            distinct, position = tf.unique(user)
            offset = tf.gather(self.implicit_terms(distinct)['offset'], position)
            user_rows += tf.pad(offset, [[0, 0], [0, 1]])
        return self.predict_from_rows(user_rows, item_rows)


def folded(model: MatrixFactorization) -> MatrixFactorization:
    """The plain model that predicts as `model` does: implicit sums added to the user factors.

    A model without implicit feedback is returned as it is.
    """
    if not model.implicit_feedback:
        return model
    user_rows, item_rows = (table.shape[0] - features.NUM_OOV_BUCKETS
                            for table in (model.user_embedding, model.item_embedding))
    plain = MatrixFactorization(user_rows, item_rows, model.num_factors,
                                float(model.global_mean.numpy()), init_stddev=0.0, seed=0,
                                name=model.name)
    plain.user_embedding.assign(model.effective_user_embedding())
    plain.item_embedding.assign(model.item_embedding)
    return plain


def penalty_weights(num_factors: int, l2: float, l2_bias: float) -> tf.Tensor:
    """The per-column L2 strength of an embedding row: l2 per factor, l2_bias last."""
    return tf.constant([l2] * num_factors + [l2_bias], tf.float32)


def loss_and_gradients(model: MatrixFactorization, user_rows: tf.Tensor,
                       item_rows: tf.Tensor, rating: tf.Tensor,
                       penalty: tf.Tensor, user_weight: tf.Tensor | float = 1.0,
                       item_weight: tf.Tensor | float = 1.0,
                       user_offset: tf.Tensor | None = None
                       ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """The objective's per-example terms and their gradients.

    Args:
      model: the model (for mu and the factor count).
      user_rows: gathered user rows, [B, K + 1].
      item_rows: gathered item rows, [B, K + 1].
      rating: the ratings, [B].
      penalty: `penalty_weights`, [K + 1].
      user_weight: per-example weights of the user rows' penalty, [B] or scalar.
      item_weight: the same for the item rows.
      user_offset: implicit sums added to the user factors, [B, K]; they
        predict but are not penalised here (see `implicit_gradient`).

    Returns:
      (loss [B], prediction [B], user gradient rows [B, K + 1], item gradient
      rows [B, K + 1]): loss[b] = (r - r_hat)^2 + its rows' penalty, and the
      gradient rows are d loss[b] / d row (the batch mean's gradient is their
      sum over equal rows, divided by B).
    """
    k = model.num_factors
    predicting_rows = (user_rows if user_offset is None
                       else user_rows + tf.pad(user_offset, [[0, 0], [0, 1]]))
    prediction = model.predict_from_rows(predicting_rows, item_rows)
    error = prediction - rating
    user_weight = tf.reshape(tf.cast(user_weight, tf.float32), [-1, 1])
    item_weight = tf.reshape(tf.cast(item_weight, tf.float32), [-1, 1])
    user_penalty = penalty * user_weight
    item_penalty = penalty * item_weight
    loss = (tf.square(error)
            + tf.reduce_sum(user_penalty * tf.square(user_rows), axis=-1)
            + tf.reduce_sum(item_penalty * tf.square(item_rows), axis=-1))
    twice_error = 2.0 * error[:, None]
    ones = tf.ones_like(twice_error)
    user_gradient = (twice_error * tf.concat([item_rows[:, :k], ones], axis=1)
                     + 2.0 * user_penalty * user_rows)
    item_gradient = (twice_error * tf.concat([predicting_rows[:, :k], ones], axis=1)
                     + 2.0 * item_penalty * item_rows)
    return loss, prediction, user_gradient, item_gradient


def implicit_gradient(model: MatrixFactorization, terms: dict[str, tf.Tensor],
                      position: tf.Tensor, offset_gradient: tf.Tensor,
                      l2: float) -> tuple[tf.Tensor, tf.IndexedSlices]:
    """The implicit penalty per example and the gradient rows of the y table.

    Args:
      model: the model (for the table's shape).
      terms: `model.implicit_terms` of the batch's distinct users.
      position: each example's index into those users, [B].
      offset_gradient: d (squared error) / d offset per example, [B, K]
        (2 * error * q_i).
      l2: the per-example strength of l2 * mean over N(u) of |y_j|^2.

    Returns:
      (penalty [B], gradient): the rows of every y_j in N(u) per distinct
      user, summed over that user's examples, as d loss / d y_j.
    """
    users = tf.size(terms['scale'], out_type=tf.int64)
    summed = tf.math.unsorted_segment_sum(offset_gradient, position, users)
    examples = tf.math.unsorted_segment_sum(
        tf.ones_like(position, tf.float32), position, users)
    owner = terms['owner']
    data_rows = tf.gather(summed * terms['scale'][:, None], owner)
    # d/dy_j of l2 * |y_j|^2 / |N(u)|, once per example of the user.
    shrink = tf.gather(2.0 * l2 * examples * tf.square(terms['scale']), owner)
    rows = data_rows + shrink[:, None] * terms['rows']
    penalty = l2 * tf.gather(terms['mean_square'], position)
    return penalty, tf.IndexedSlices(rows, terms['items'],
                                     tf.shape(model.implicit_embedding, tf.int64))


def per_example_loss(model: MatrixFactorization, user: tf.Tensor,
                     item: tf.Tensor, rating: tf.Tensor, l2: float,
                     l2_bias: float) -> tf.Tensor:
    """The objective's per-example terms (unit row weights)."""
    user_rows, item_rows = model.gather(user, item)
    penalty = penalty_weights(model.num_factors, l2, l2_bias)
    return loss_and_gradients(model, user_rows, item_rows, rating, penalty)[0]
