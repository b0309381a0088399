"""Tests of trainer/topn/ials.py: the conjugate-gradient half-step and the objective, on tiny data."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from trainer.topn import ials

USERS, ITEMS, FACTORS, L2, ALPHA0 = 7, 9, 4, 0.7, 0.3


@pytest.fixture
def tiny():
    rng = np.random.default_rng(0)
    users, items = np.nonzero(rng.random((USERS, ITEMS)) < 0.4)
    ratings = rng.integers(1, 6, users.size).astype(np.float32)
    return users, items, ratings, rng


def _penalties(rows, num_rows, other_side):
    return ials.row_penalties(np.bincount(rows, minlength=num_rows), L2, 1.0, ALPHA0,
                              other_side).astype(np.float64)


def _step(solved, fixed, rows, columns, weight, target, cg_steps):
    """One half-step, on float64 tensors."""
    l2 = _penalties(rows, solved.shape[0], fixed.shape[0])
    return ials.half_step(tf.constant(solved), tf.constant(fixed), tf.constant(rows),
                          tf.constant(columns), tf.constant(weight), tf.constant(target),
                          tf.constant(l2), ALPHA0, cg_steps).numpy()


def _exact(fixed, rows, columns, weight, target, num_rows):
    """Each row's normal equations, built densely from the module doc's L and solved."""
    l2 = _penalties(rows, num_rows, fixed.shape[0])
    solved = np.zeros((num_rows, fixed.shape[1]))
    for row in range(num_rows):
        mine = rows == row
        y = fixed[columns[mine]]
        system = (ALPHA0 * fixed.T @ fixed + (y.T * weight[mine]) @ y
                  + l2[row] * np.eye(fixed.shape[1]))
        solved[row] = np.linalg.solve(system, y.T @ (weight[mine] * target[mine]))
    return solved


def _objective(p, q, users, items, weight, target):
    return ials.objective(p, q, users, items, weight, target,
                          _penalties(users, USERS, ITEMS), _penalties(items, ITEMS, USERS),
                          ALPHA0)


def _dense_objective(p, q, users, items, weight, target):
    """L summed over every (user, movie) cell of a dense matrix."""
    scores = p @ q.T
    rated = np.zeros((USERS, ITEMS), bool)
    rated[users, items] = True
    fit = np.sum(weight * (target - scores[users, items]) ** 2)
    user_l2 = L2 * (np.bincount(users, minlength=USERS) + ALPHA0 * ITEMS)
    item_l2 = L2 * (np.bincount(items, minlength=ITEMS) + ALPHA0 * USERS)
    return float(fit + ALPHA0 * np.sum(scores ** 2) + np.sum(user_l2 * np.sum(p * p, 1))
                 + np.sum(item_l2 * np.sum(q * q, 1)))


def test_confidences_and_targets_follow_the_rating():
    ratings = np.array([1, 2, 3, 4, 5, 0.5, 3.5], np.float32)
    np.testing.assert_allclose(ials.preference(ratings), [0.2, 0.2, 1, 2, 3, 0.2, 1.5])
    np.testing.assert_allclose(ials.confidences(ratings, 2.0),
                               [0.04, 0.04, 1, 4, 9, 0.04, 2.25], rtol=1e-6)
    np.testing.assert_allclose(ials.confidences(ratings, 0.0), np.ones(7))
    np.testing.assert_allclose(ials.row_penalties(np.array([0, 3]), 0.5, 1.0, 0.1, 20),
                               [1.0, 2.5])
    np.testing.assert_allclose(ials.targets(ratings, 'watched'), np.ones(7))
    np.testing.assert_allclose(ials.targets(ratings, 'rating'), ials.preference(ratings))
    with pytest.raises(ValueError, match='unknown target'):
        ials.targets(ratings, 'liked')


@pytest.mark.parametrize('confidence', [0.0, 1.0])
def test_weighted_targets_are_hu_et_al_s_loss_up_to_a_constant(confidence):
    # Every rated pair towards 1 with weight alpha0 (1 + g^a), every other pair
    # towards 0 with weight alpha0: the same loss, for any score s, as
    # c (t - s)^2 + alpha0 s^2 with pair_weights' c and t, plus a constant.
    ratings = np.array([1, 2, 3, 4, 5, 3.5], np.float32)
    weight, target = ials.pair_weights(ratings, confidence, 'weighted', ALPHA0)
    worth = ials.preference(ratings).astype(np.float64) ** confidence
    differences = []
    for s in (-1.0, 0.0, 0.3, 2.0):
        ours = weight * (target - s) ** 2 + ALPHA0 * s ** 2
        hu = ALPHA0 * (1.0 + worth) * (1.0 - s) ** 2
        differences.append(ours - hu)
    np.testing.assert_allclose(differences, [differences[0]] * 4, rtol=1e-5, atol=1e-5)
    # Other kinds: the confidences and targets as they are.
    weight, target = ials.pair_weights(ratings, 2.0, 'rating', ALPHA0)
    np.testing.assert_allclose(weight, ials.confidences(ratings, 2.0))
    np.testing.assert_allclose(target, ials.preference(ratings))


@pytest.mark.parametrize('kind', ['rating', 'watched'])
def test_as_many_cg_steps_as_factors_solve_both_sides_exactly(tiny, kind):
    users, items, ratings, rng = tiny
    weight = ials.confidences(ratings, 1.5).astype(np.float64)
    target = ials.targets(ratings, kind).astype(np.float64)
    q = rng.normal(size=(ITEMS, FACTORS))
    p = _step(rng.normal(size=(USERS, FACTORS)), q, users, items, weight, target, FACTORS)
    np.testing.assert_allclose(p, _exact(q, users, items, weight, target, USERS), atol=1e-9)
    q_new = _step(q, p, items, users, weight, target, FACTORS)
    np.testing.assert_allclose(q_new, _exact(p, items, users, weight, target, ITEMS),
                               atol=1e-9)


def test_few_cg_steps_from_a_warm_start_still_lower_the_objective(tiny):
    users, items, ratings, rng = tiny
    weight = ials.confidences(ratings, 1.0).astype(np.float64)
    target = ials.targets(ratings, 'rating').astype(np.float64)
    p, q = rng.normal(size=(USERS, FACTORS)), rng.normal(size=(ITEMS, FACTORS))
    values = [_objective(p, q, users, items, weight, target)]
    for _ in range(5):
        p = _step(p, q, users, items, weight, target, 2)
        q = _step(q, p, items, users, weight, target, 2)
        values.append(_objective(p, q, users, items, weight, target))
    assert all(later < earlier for earlier, later in zip(values, values[1:])), values


def test_a_row_without_rated_pairs_solves_to_zero(tiny):
    users, items, ratings, rng = tiny
    keep = users != 3
    weight = ials.confidences(ratings[keep], 1.0).astype(np.float64)
    p = _step(rng.normal(size=(USERS, FACTORS)), rng.normal(size=(ITEMS, FACTORS)),
              users[keep], items[keep], weight, np.ones_like(weight), FACTORS)
    np.testing.assert_allclose(p[3], 0.0, atol=1e-9)


def test_the_objective_matches_the_dense_sum_over_every_pair(tiny):
    users, items, ratings, rng = tiny
    weight = ials.confidences(ratings, 0.5).astype(np.float64)
    target = ials.targets(ratings, 'rating').astype(np.float64)
    p, q = rng.normal(size=(USERS, FACTORS)), rng.normal(size=(ITEMS, FACTORS))
    assert _objective(p, q, users, items, weight, target) == pytest.approx(
        _dense_objective(p, q, users, items, weight, target), rel=1e-6)


def test_initial_factors_are_seeded_and_scaled():
    first = ials.initial_factors(2000, 16, seed=3, stream=1, stddev=0.1)
    assert first.dtype == np.float32
    np.testing.assert_array_equal(first, ials.initial_factors(2000, 16, 3, 1, 0.1))
    assert not np.array_equal(first, ials.initial_factors(2000, 16, 3, 2, 0.1))
    assert np.std(first) == pytest.approx(0.1 / 4, rel=0.05)


@pytest.mark.parametrize('factors', [16, 7])  # an unrolled width, and the generic one
def test_the_cpp_op_solves_as_the_tensorflow_half_step(factors):
    from trainer.ops import kernels
    from trainer.topn import train as topn_train  # pylint: disable=import-outside-toplevel
    try:
        ops = kernels.load()
    except kernels.KernelUnavailable as error:
        pytest.skip(f'no C++ ops here: {error}')
    rng = np.random.default_rng(1)
    users, items = np.nonzero(rng.random((60, 40)) < 0.2)
    ratings = rng.integers(1, 6, users.size).astype(np.float32)
    weight, target = ials.confidences(ratings, 1.0), ials.targets(ratings, 'watched')
    fixed = rng.normal(size=(40, factors)).astype(np.float32)
    start = rng.normal(size=(60, factors)).astype(np.float32)
    l2 = ials.row_penalties(np.bincount(users, minlength=60), 0.03, 1.0, ALPHA0, 40)
    expected = ials.half_step(tf.constant(start), tf.constant(fixed), tf.constant(users),
                              tf.constant(items), tf.constant(weight), tf.constant(target),
                              tf.constant(l2), ALPHA0, 3).numpy()
    side = topn_train._Side.group(users, items, weight, target, 60)
    gram = (ALPHA0 * fixed.T.astype(np.float64) @ fixed).astype(np.float32)
    outputs = [ops.implicit_als_solve_rows(
        offsets=side.offsets, other=side.other, weight=side.weight, target=side.target,
        other_table=fixed, gram=gram, l2=l2, start=start, cg_steps=3, threads=threads,
        with_loss=False)[0].numpy() for threads in (1, 3)]
    np.testing.assert_array_equal(outputs[0], outputs[1])  # whatever the threads
    np.testing.assert_allclose(outputs[0], expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(outputs[0], start, atol=1e-2)  # it did move
