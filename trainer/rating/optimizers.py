"""Sparse optimisers: SGD, Adagrad and (lazy) Adam over the embedding rows a batch touches.

Each optimiser is a `tf.Module` whose slot variables (one per parameter table,
keyed by the table's name) are created eagerly, so a checkpoint restores them
before the first step.  `apply_gradients` takes `tf.IndexedSlices` gradients,
sums duplicate rows first (a user rated several items in the batch), then
updates only those rows: a step costs O(batch), not O(table), and rows the
batch did not touch keep their slots unchanged (for Adam this is the "lazy"
variant).  Rows are updated by gathering them, computing the new values and
`scatter_update`: on a CPU that is several times faster than `scatter_sub`
(measured on 8192 rows of 17 floats: 0.09 ms against 0.6 ms), and the rows
are unique after `combine_duplicates`, so the result is the same.

Create an optimiser inside the distribution strategy's scope and call
`apply_gradients` in replica context with all-reduced gradients: every
replica then computes the same update and `ONLY_FIRST_REPLICA` aggregation
applies it once.
"""

from __future__ import annotations

import tensorflow as tf

_AGGREGATION = tf.VariableAggregation.ONLY_FIRST_REPLICA


def _slot(variable: tf.Variable, initial: float, name: str) -> tf.Variable:
    return tf.Variable(
        tf.fill(variable.shape, tf.constant(initial, variable.dtype)),
        trainable=False, name=name, aggregation=_AGGREGATION)


def _subtract_rows(variable: tf.Variable, indices: tf.Tensor,
                   delta: tf.Tensor) -> None:
    """variable[indices] -= delta, for unique indices."""
    variable.scatter_update(tf.IndexedSlices(
        tf.gather(variable, indices) - delta, indices))


def combine_duplicates(gradient: tf.IndexedSlices) -> tuple[tf.Tensor, tf.Tensor]:
    """Sums the gradient rows that share an index.

    The sum is a product with the [unique, rows] 0/1 matrix that selects each
    row's unique index: `sparse_dense_matmul` adds the rows in batch order,
    like `unsorted_segment_sum`, and on a CPU takes 29 us where that takes
    42 (1,024 rows of 17 floats), about a tenth of a training step.

    Args:
      gradient: per-example gradient rows, indices possibly repeated.

    Returns:
      (unique indices, summed rows), in order of first occurrence.

    Raises:
      TypeError: if the gradient is dense (the parameters were not gathered).
    """
    if not isinstance(gradient, tf.IndexedSlices):
        raise TypeError(
            f'expected tf.IndexedSlices, got {type(gradient).__name__}; '
            'read parameters with tf.gather so gradients stay sparse')
    indices, positions = tf.unique(gradient.indices)
    rows = tf.size(positions, out_type=tf.int64)
    selection = tf.sparse.SparseTensor(
        tf.stack([tf.cast(positions, tf.int64), tf.range(rows)], axis=1),
        tf.ones([rows], gradient.values.dtype),
        tf.stack([tf.size(indices, out_type=tf.int64), rows]))
    return indices, tf.sparse.sparse_dense_matmul(selection, gradient.values)


class SparseOptimizer(tf.Module):
    """Base class: the step counter and the per-table loop."""

    def __init__(self, parameters: dict[str, tf.Variable],
                 learning_rate: float, name: str | None = None) -> None:
        """Creates the step counter and (in subclasses) the slots.

        Args:
          parameters: the tables to train, keyed by name.
          learning_rate: the step size, > 0.

        Raises:
          ValueError: if learning_rate is not positive.
        """
        super().__init__(name=name)
        if not learning_rate > 0:
            raise ValueError(f'learning_rate must be > 0, got {learning_rate!r}')
        # A variable, so the trainer can set each epoch's rate without a retrace.
        self.learning_rate = tf.Variable(
            float(learning_rate), dtype=tf.float32, trainable=False,
            name='learning_rate', aggregation=_AGGREGATION)
        self.iterations = tf.Variable(
            0, dtype=tf.int64, trainable=False, name='iterations',
            aggregation=_AGGREGATION)

    def apply_gradients(self, gradients: dict[str, tf.IndexedSlices],
                        parameters: dict[str, tf.Variable]) -> None:
        """Updates the touched rows of each table, then counts the step.

        Args:
          gradients: sparse gradients keyed like `parameters`.
          parameters: the tables the optimiser was built for.
        """
        step = tf.cast(self.iterations + 1, tf.float32)
        for name in sorted(gradients):
            indices, values = combine_duplicates(gradients[name])
            self._update_rows(name, parameters[name], indices, values, step)
        self.iterations.assign_add(1)

    def _update_rows(self, name: str, variable: tf.Variable, indices: tf.Tensor,
                     gradient: tf.Tensor, step: tf.Tensor) -> None:
        raise NotImplementedError


class SGD(SparseOptimizer):
    """Plain SGD: row -= learning_rate * gradient."""

    def _update_rows(self, name: str, variable: tf.Variable, indices: tf.Tensor,
                     gradient: tf.Tensor, step: tf.Tensor) -> None:
        _subtract_rows(variable, indices, self.learning_rate * gradient)


class Adagrad(SparseOptimizer):
    """Adagrad: per-coordinate steps shrink with the summed squared gradients."""

    def __init__(self, parameters: dict[str, tf.Variable], learning_rate: float,
                 initial_accumulator: float = 0.1, epsilon: float = 1e-7,
                 name: str | None = None) -> None:
        super().__init__(parameters, learning_rate, name=name)
        self.epsilon = epsilon
        self.accumulators = {
            key: _slot(variable, initial_accumulator, f'{key}_accumulator')
            for key, variable in parameters.items()}

    def _update_rows(self, name: str, variable: tf.Variable, indices: tf.Tensor,
                     gradient: tf.Tensor, step: tf.Tensor) -> None:
        accumulator = self.accumulators[name]
        summed = tf.gather(accumulator, indices) + tf.square(gradient)
        accumulator.scatter_update(tf.IndexedSlices(summed, indices))
        delta = self.learning_rate * gradient / (tf.sqrt(summed) + self.epsilon)
        _subtract_rows(variable, indices, delta)


class Adam(SparseOptimizer):
    """Lazy Adam: moments of the touched rows only, bias-corrected by the global step."""

    def __init__(self, parameters: dict[str, tf.Variable], learning_rate: float,
                 beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7, name: str | None = None) -> None:
        super().__init__(parameters, learning_rate, name=name)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.first_moments = {
            key: _slot(variable, 0.0, f'{key}_m')
            for key, variable in parameters.items()}
        self.second_moments = {
            key: _slot(variable, 0.0, f'{key}_v')
            for key, variable in parameters.items()}

    def _update_rows(self, name: str, variable: tf.Variable, indices: tf.Tensor,
                     gradient: tf.Tensor, step: tf.Tensor) -> None:
        first, second = self.first_moments[name], self.second_moments[name]
        m = (self.beta_1 * tf.gather(first, indices)
             + (1.0 - self.beta_1) * gradient)
        v = (self.beta_2 * tf.gather(second, indices)
             + (1.0 - self.beta_2) * tf.square(gradient))
        first.scatter_update(tf.IndexedSlices(m, indices))
        second.scatter_update(tf.IndexedSlices(v, indices))
        step_size = (self.learning_rate * tf.sqrt(1.0 - self.beta_2 ** step)
                     / (1.0 - self.beta_1 ** step))
        delta = step_size * m / (tf.sqrt(v) + self.epsilon)
        _subtract_rows(variable, indices, delta)


OPTIMIZERS: dict[str, type[SparseOptimizer]] = {
    'sgd': SGD, 'adagrad': Adagrad, 'adam': Adam}


def make_optimizer(name: str, parameters: dict[str, tf.Variable],
                   learning_rate: float) -> SparseOptimizer:
    """Builds the optimiser called `name` (a key of OPTIMIZERS).

    Raises:
      ValueError: if the name is unknown.
    """
    if name not in OPTIMIZERS:
        raise ValueError(
            f'unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}')
    return OPTIMIZERS[name](parameters, learning_rate)
