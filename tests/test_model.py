"""Tests of trainer/rating/model.py: prediction rule, OOV rows, objective, sparse gradients."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from trainer import features
from trainer.rating.model import (MatrixFactorization, folded, implicit_gradient,
                           loss_and_gradients, penalty_weights, per_example_loss)

OOV = features.NUM_OOV_BUCKETS


def _hand_set_model() -> MatrixFactorization:
    """2 users, 3 items, 2 factors, every weight chosen by hand."""
    model = MatrixFactorization(user_vocab_size=2, item_vocab_size=3,
                                num_factors=2, global_mean=3.5,
                                init_stddev=0.1, seed=0)
    model.set_weights(
        user_factors=[[1.0, 2.0], [0.5, -1.0]] + [[0.0, 0.0]] * OOV,
        user_bias=[0.5, -0.25] + [0.0] * OOV,
        item_factors=[[0.2, 0.1], [-1.0, 0.5], [0.0, 3.0]] + [[0.0, 0.0]] * OOV,
        item_bias=[0.1, 0.2, -0.3] + [0.0] * OOV)
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
    losses = per_example_loss(model, _ids(0, 0, 0), _ids(0, 0, 0),
                              tf.constant([4.0] * 3), l2=1.0, l2_bias=0.0)
    error = 3.5 + 0.5 + 0.1 + 0.4 - 4.0
    np.testing.assert_allclose(losses.numpy(), [error ** 2 + 5.05] * 3, rtol=1e-6)


@pytest.mark.parametrize('weighted', [False, True])
def test_hand_written_gradients_match_the_tape(weighted):
    model = _hand_set_model()
    user, item = _ids(1, 1, 0), _ids(2, 0, 2)
    rating = tf.constant([3.0, 4.0, 1.5])
    penalty = penalty_weights(model.num_factors, l2=0.1, l2_bias=0.03)
    user_weight = tf.constant([0.5, 0.5, 2.0]) if weighted else 1.0
    item_weight = tf.constant([1.5, 0.25, 1.5]) if weighted else 1.0
    with tf.GradientTape() as tape:
        user_rows, item_rows = model.gather(user, item)
        loss, _, user_gradient, item_gradient = loss_and_gradients(
            model, user_rows, item_rows, rating, penalty, user_weight, item_weight)
        total = tf.reduce_sum(loss)
    expected = tape.gradient(total, model.parameters())
    for name, rows, indices in (('user_embedding', user_gradient, user),
                                ('item_embedding', item_gradient, item)):
        assert isinstance(expected[name], tf.IndexedSlices), name
        dense = tf.math.unsorted_segment_sum(rows, indices, model.parameters()[name].shape[0])
        np.testing.assert_allclose(dense.numpy(), tf.convert_to_tensor(expected[name]).numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_embedding_rows_are_factors_then_bias():
    model = _hand_set_model()
    np.testing.assert_allclose(model.user_embedding.numpy()[0], [1.0, 2.0, 0.5])
    np.testing.assert_allclose(model.item_bias.numpy(), [0.1, 0.2, -0.3, 0.0])
    np.testing.assert_allclose(model.item_factors.numpy()[2], [0.0, 3.0])


def test_initialisation_is_seeded():
    first, again, other = (
        MatrixFactorization(6, 7, 4, 3.0, 0.1, seed=seed) for seed in (5, 5, 6))
    np.testing.assert_array_equal(first.item_factors.numpy(),
                                  again.item_factors.numpy())
    assert not np.allclose(first.item_factors.numpy(), other.item_factors.numpy())
    np.testing.assert_array_equal(first.user_bias.numpy(), 0.0)
    assert first.global_mean.trainable is False
    assert {v.name.split(':')[0] for v in first.trainable_variables} == {
        'user_embedding', 'item_embedding'}


@pytest.mark.parametrize('sizes', [(0, 3, 2), (3, 0, 2), (3, 3, 0)])
def test_empty_tables_are_refused(sizes):
    with pytest.raises(ValueError, match='must be >= 1'):
        MatrixFactorization(*sizes, global_mean=3.0, init_stddev=0.1, seed=0)


def _implicit_model() -> MatrixFactorization:
    """The hand-set model plus hand-set y rows; user 0 rated items 0 and 2, user 1 item 1."""
    plain = _hand_set_model()
    model = MatrixFactorization(2, 3, 2, 3.5, 0.1, seed=0, implicit_feedback=True)
    model.user_embedding.assign(plain.user_embedding)
    model.item_embedding.assign(plain.item_embedding)
    model.implicit_embedding.assign([[0.4, -0.2], [1.0, 1.0], [0.2, 0.6]] + [[0.0, 0.0]] * OOV)
    model.set_implicit_ratings(_ids(1, 0, 0), _ids(1, 2, 0))
    return model


def test_implicit_sums_join_the_user_factors():
    model = _implicit_model()
    # user 0: p + (y_0 + y_2) / sqrt(2); user 1: p + y_1; the OOV user: nothing.
    offset_0 = np.array([0.6, 0.4]) / np.sqrt(2.0)
    user_0 = np.array([1.0, 2.0]) + offset_0
    user_1 = np.array([0.5, -1.0]) + np.array([1.0, 1.0])
    prediction = model(_ids(0, 1, 2), _ids(2, 0, 1))
    expected = [3.5 + 0.5 - 0.3 + user_0 @ [0.0, 3.0],
                3.5 - 0.25 + 0.1 + user_1 @ [0.2, 0.1],
                3.5 + 0.2]
    np.testing.assert_allclose(prediction.numpy(), expected, rtol=1e-6)
    table = model.effective_user_embedding().numpy()
    np.testing.assert_allclose(table[0, :2], user_0, rtol=1e-6)
    np.testing.assert_allclose(table[:, 2], [0.5, -0.25, 0.0])


def test_folded_model_is_plain_and_predicts_the_same():
    model = _implicit_model()
    plain = folded(model)
    assert not plain.implicit_feedback and set(plain.parameters()) == {
        'user_embedding', 'item_embedding'}
    user, item = _ids(0, 0, 1, 1, 2), _ids(0, 2, 1, 0, 3)
    np.testing.assert_allclose(plain(user, item).numpy(), model(user, item).numpy(),
                               rtol=1e-6)
    assert folded(plain) is plain


def test_implicit_model_needs_its_ratings():
    model = MatrixFactorization(2, 3, 2, 3.5, 0.1, seed=0, implicit_feedback=True)
    with pytest.raises(ValueError, match='set_implicit_ratings'):
        model(_ids(0), _ids(0))


def test_implicit_gradients_match_the_tape():
    model = _implicit_model()
    user, item = _ids(1, 0, 0, 1), _ids(2, 0, 1, 1)
    rating = tf.constant([3.0, 4.0, 1.5, 2.0])
    penalty = penalty_weights(model.num_factors, l2=0.1, l2_bias=0.03)
    with tf.GradientTape() as tape:
        distinct, position = tf.unique(user, out_idx=tf.int64)
        terms = model.implicit_terms(distinct)
        offset = tf.gather(terms['offset'], position)
        user_rows, item_rows = model.gather(user, item)
        loss, prediction, user_gradient, item_gradient = loss_and_gradients(
            model, user_rows, item_rows, rating, penalty, user_offset=offset)
        implicit_penalty, implicit = implicit_gradient(
            model, terms, position,
            2.0 * (prediction - rating)[:, None] * item_rows[:, :2], l2=0.3)
        total = tf.reduce_sum(loss + implicit_penalty)
    expected = tape.gradient(total, model.parameters())
    # Example 0 (user 1): l2 * |y_1|^2; examples 1, 2 (user 0): l2 * (|y_0|^2 + |y_2|^2) / 2.
    np.testing.assert_allclose(implicit_penalty.numpy(),
                               0.3 * np.array([2.0, 0.3, 0.3, 2.0]), rtol=1e-6)
    for name, rows, indices in (('user_embedding', user_gradient, user),
                                ('item_embedding', item_gradient, item),
                                ('implicit_embedding', implicit.values, implicit.indices)):
        size = model.parameters()[name].shape[0]
        dense = tf.math.unsorted_segment_sum(rows, indices, size)
        np.testing.assert_allclose(dense.numpy(), tf.convert_to_tensor(expected[name]).numpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
