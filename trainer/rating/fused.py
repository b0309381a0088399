"""The rating model's epoch as one C++ op (`MatrixFactorizationAdamEpoch`).

A training step in TensorFlow ops (`train.make_train_epoch`) is a chain of
about 45 small kernels, and on a CPU scheduling them costs more than their
arithmetic.  The op (`trainer/ops/fused_epoch.cc`, built and loaded by
`trainer.ops.kernels`) runs a whole epoch of the same computation (the
objective and gradient of `model.loss_and_gradients`, the lazy Adam of
`optimizers.Adam`) on `threads` threads.
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

    Returns a tf.function (user, item, rating, user_weights, item_weights) ->
    [objective, count, squared error, absolute error] sums, which trains the
    model in place and advances the optimiser's step count by the epoch's
    batches.
    """
    ops = kernels.load()
    threads = threads or kernels.default_threads()
    parameters = model.parameters()
    moments = [(optimizer.first_moments[name], optimizer.second_moments[name])
               for name in model_lib.PARAMETER_NAMES]
    range_ = tf.constant([rating_min, rating_max], tf.float32)
    empty = tf.zeros([0], tf.float32)

    @tf.function
    def train_epoch(user, item, rating, user_weights, item_weights) -> tf.Tensor:
        if user_weights is None:
            user_weights = item_weights = empty
        totals = ops.matrix_factorization_adam_epoch(
            user_table=parameters['user_embedding'].handle,
            item_table=parameters['item_embedding'].handle,
            user_m=moments[0][0].handle, user_v=moments[0][1].handle,
            item_m=moments[1][0].handle, item_v=moments[1][1].handle,
            user=tf.cast(user, tf.int32), item=tf.cast(item, tf.int32),
            rating=tf.cast(rating, tf.float32),
            user_weight=user_weights, item_weight=item_weights,
            penalty=penalty, global_mean=model.global_mean,
            learning_rate=optimizer.learning_rate,
            first_step=optimizer.iterations + 1, batch_size=batch_size,
            rating_range=range_, threads=threads, beta_1=optimizer.beta_1,
            beta_2=optimizer.beta_2, epsilon=optimizer.epsilon)
        with tf.control_dependencies([totals]):
            steps = (tf.size(rating, tf.int64) + batch_size - 1) // batch_size
            optimizer.iterations.assign_add(steps)
        return tf.identity(totals)

    return train_epoch

