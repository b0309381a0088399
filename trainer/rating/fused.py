"""The rating model's epoch as one C++ op (`MatrixFactorizationAdamEpoch`).

A training step in TensorFlow ops (`train.make_train_epoch`) is a chain of
about 45 small kernels, and on a CPU scheduling them costs more than their
arithmetic.  The op (`trainer/ops/fused_epoch.cc`, built and loaded by
`trainer.ops.kernels`) runs a whole epoch of the same computation (the
objective and gradient of `model.loss_and_gradients`, the lazy Adam of
`optimizers.Adam`) on `threads` threads.  It takes the ratings as they are
held and the epoch's order (`epoch_order`, the permutation `data.shuffle`
applies, drawn by `shuffle_order.cc`) and copies the columns into that order
itself.  `make_scorer` scores ratings with `score_ratings.cc`.
"""

from __future__ import annotations

import tensorflow as tf

from trainer.ops import kernels
from trainer.rating import model as model_lib
from trainer.rating import optimizers


def make_epoch(model: model_lib.MatrixFactorization, optimizer: optimizers.Adam,
               penalty: tf.Tensor, batch_size: int, rating_min: float,
               rating_max: float, threads: int | None = None):
    """The fused counterpart of `train.make_train_epoch` (one replica, Adam).

    Returns a tf.function (user, item, rating, user_weights, item_weights,
    order=None) -> [objective, count, squared error, absolute error] sums,
    which trains the model in place on the ratings at positions `order` (all,
    as they come, for None) and advances the optimiser's step count by the
    epoch's batches.
    """
    ops = kernels.load()
    threads = threads or kernels.default_threads()
    parameters = model.parameters()
    moments = [(optimizer.first_moments[name], optimizer.second_moments[name])
               for name in model_lib.PARAMETER_NAMES]
    range_ = tf.constant([rating_min, rating_max], tf.float32)
    empty = tf.zeros([0], tf.float32)
    empty_order = tf.zeros([0], tf.int32)

    @tf.function
    def train_epoch(user, item, rating, user_weights, item_weights,
                    order=None) -> tf.Tensor:
        if user_weights is None:
            user_weights = item_weights = empty
        if order is None:
            order = empty_order
        totals = ops.matrix_factorization_adam_epoch(
            user_table=parameters['user_embedding'].handle,
            item_table=parameters['item_embedding'].handle,
            user_m=moments[0][0].handle, user_v=moments[0][1].handle,
            item_m=moments[1][0].handle, item_v=moments[1][1].handle,
            user=tf.cast(user, tf.int32), item=tf.cast(item, tf.int32),
            rating=tf.cast(rating, tf.float32), order=order,
            user_weight=user_weights, item_weight=item_weights,
            penalty=penalty, global_mean=model.global_mean,
            learning_rate=optimizer.learning_rate,
            first_step=optimizer.iterations + 1, batch_size=batch_size,
            rating_range=range_, threads=threads, beta_1=optimizer.beta_1,
            beta_2=optimizer.beta_2, epsilon=optimizer.epsilon)
        with tf.control_dependencies([totals]):
            size = tf.where(tf.size(order) > 0, tf.size(order), tf.size(rating))
            steps = (tf.cast(size, tf.int64) + batch_size - 1) // batch_size
            optimizer.iterations.assign_add(steps)
        return tf.identity(totals)

    train_epoch.reads_order = True  # `train._run_epoch` passes the permutation
    return train_epoch


def epoch_order(size: int, seed: int) -> tf.Tensor:
    """The positions `data.shuffle(ratings, seed)` takes, for `size` ratings: int32 [size].

    The same permutation as `tf.random.experimental.stateless_shuffle` of
    0 .. size - 1 with seed (seed, 0), drawn by `shuffle_order.cc`, which
    fetches the entries each swap needs ahead of it.

    Raises:
      kernels.KernelUnavailable: the ops cannot be built or loaded.
    """
    key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(
        seed=tf.constant([seed, 0], tf.int64))
    return kernels.load().stateless_shuffled_range(
        size=tf.constant(size, tf.int64), key=key, counter=counter)


def make_scorer(model: model_lib.MatrixFactorization, rating_min: float,
                rating_max: float, threads: int | None = None):
    """A function (user, item, rating) -> [squared error, absolute error] sums
    of the model's predictions clipped to [rating_min, rating_max], by
    `score_ratings.cc` (a plain model: no implicit-feedback term).

    Raises:
      kernels.KernelUnavailable: the ops cannot be built or loaded.
    """
    ops = kernels.load()
    threads = threads or kernels.default_threads()
    range_ = tf.constant([rating_min, rating_max], tf.float32)

    def error_sums(user, item, rating) -> tf.Tensor:
        return ops.matrix_factorization_score(
            user_table=model.user_embedding, item_table=model.item_embedding,
            user=user, item=item, rating=rating, global_mean=model.global_mean,
            rating_range=range_, threads=threads)

    return error_sums
