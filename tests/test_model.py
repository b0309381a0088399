"""Tests of trainer/model.py: prediction rule, OOV rows, objective, sparse gradients."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from trainer import features
from trainer.model import MatrixFactorization, l2_penalties, per_example_loss

OOV = features.NUM_OOV_BUCKETS


def _hand_set_model() -> MatrixFactorization:
    """2 users, 3 items, 2 factors, every weight chosen by hand."""
    model = MatrixFactorization(user_vocab_size=2, item_vocab_size=3,
                                num_factors=2, global_mean=3.5,
                                init_stddev=0.1, seed=0)
    model.user_bias.assign([0.5, -0.25] + [0.0] * OOV)
    model.item_bias.assign([0.1, 0.2, -0.3] + [0.0] * OOV)
    model.user_factors.assign([[1.0, 2.0], [0.5, -1.0]] + [[0.0, 0.0]] * OOV)
    model.item_factors.assign(
        [[0.2, 0.1], [-1.0, 0.5], [0.0, 3.0]] + [[0.0, 0.0]] * OOV)
    return model


def _ids(*values: int) -> tf.Tensor:
    return tf.constant(values, tf.int64)


def test_hand_set_weights_give_exact_predictions():
    model = _hand_set_model()
    prediction = model(_ids(0, 0, 1, 1), _ids(0, 2, 1, 2))
    expected = [3.5 + 0.5 + 0.1 + (1.0 * 0.2 + 2.0 * 0.1),
                3.5 + 0.5 - 0.3 + (2.0 * 3.0),
                3.5 - 0.25 + 0.2 + (0.5 * -1.0 + -1.0 * 0.5),
                3.5 - 0.25 - 0.3 + (-1.0 * 3.0)]
    np.testing.assert_allclose(prediction.numpy(), expected, rtol=1e-6)


def test_oov_rows_start_at_zero_so_unknown_ids_get_mean_plus_bias():
    fresh = MatrixFactorization(4, 5, num_factors=3, global_mean=3.0,
                                init_stddev=0.5, seed=1)
    assert fresh.user_factors.shape == (4 + OOV, 3)
    assert fresh.item_factors.shape == (5 + OOV, 3)
    np.testing.assert_array_equal(fresh.user_factors.numpy()[4:], 0.0)
    np.testing.assert_array_equal(fresh.item_factors.numpy()[5:], 0.0)
    assert np.all(fresh.user_factors.numpy()[:4] != 0.0)

    model = _hand_set_model()
    unknown_user, unknown_item = 2, 3  # index == vocabulary size
    prediction = model(_ids(unknown_user, 1), _ids(1, unknown_item))
    np.testing.assert_allclose(prediction.numpy(), [3.5 + 0.2, 3.5 - 0.25],
                               rtol=1e-6)


def test_per_example_loss_is_squared_error_plus_l2_on_touched_rows():
    model = _hand_set_model()
    user, item, rating = _ids(0, 1), _ids(2, 0), tf.constant([4.0, 2.0])
    losses = per_example_loss(model, user, item, rating, l2=0.1, l2_bias=0.01)
    # Example 0: user 0, item 2: prediction 9.7, error -5.7.
    # Example 1: user 1, item 0: prediction 3.5 - 0.25 + 0.1 + (0.1 - 0.1) = 3.35.
    expected = [
        5.7 ** 2 + 0.1 * ((1 + 4) + (0 + 9)) + 0.01 * (0.25 + 0.09),
        1.35 ** 2 + 0.1 * ((0.25 + 1) + (0.04 + 0.01)) + 0.01 * (0.0625 + 0.01),
    ]
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-6)


def test_penalty_counts_a_row_once_per_example_that_touches_it():
    model = _hand_set_model()
    rows = model.gather(_ids(0, 0, 0), _ids(0, 0, 0))
    penalties = l2_penalties(rows, l2=1.0, l2_bias=0.0)
    np.testing.assert_allclose(penalties.numpy(), [5.05] * 3, rtol=1e-6)


def test_gradients_are_sparse_over_the_touched_rows():
    model = _hand_set_model()
    parameters = model.parameters()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(per_example_loss(
            model, _ids(1, 1), _ids(2, 0), tf.constant([3.0, 4.0]), 0.1, 0.1))
    gradients = tape.gradient(loss, parameters)
    for name, gradient in gradients.items():
        assert isinstance(gradient, tf.IndexedSlices), name
    assert sorted(set(gradients['user_factors'].indices.numpy())) == [1]
    assert sorted(set(gradients['item_bias'].indices.numpy())) == [0, 2]


def test_initialisation_is_seeded():
    first, again, other = (
        MatrixFactorization(6, 7, 4, 3.0, 0.1, seed=seed) for seed in (5, 5, 6))
    np.testing.assert_array_equal(first.item_factors.numpy(),
                                  again.item_factors.numpy())
    assert not np.allclose(first.item_factors.numpy(), other.item_factors.numpy())
    np.testing.assert_array_equal(first.user_bias.numpy(), 0.0)
    assert first.global_mean.trainable is False
    assert {v.name.split(':')[0] for v in first.trainable_variables} == {
        'user_bias', 'item_bias', 'user_factors', 'item_factors'}


@pytest.mark.parametrize('sizes', [(0, 3, 2), (3, 0, 2), (3, 3, 0)])
def test_empty_tables_are_refused(sizes):
    with pytest.raises(ValueError, match='must be >= 1'):
        MatrixFactorization(*sizes, global_mean=3.0, init_stddev=0.1, seed=0)
