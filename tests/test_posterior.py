"""Posterior averaging: the sampling op against its numpy form and exact
algebra, the low-rank average, and the chain on planted data."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import tensorflow as tf

from trainer import config, features, logs
from trainer.ops import kernels
from trainer.rating import posterior

USERS, ITEMS, WIDTH = 30, 20, 4  # 3 factors and the bias


def _side(seed: int = 0, ratings: int = 300) -> tuple[posterior.Side, np.ndarray]:
    """Users' ratings grouped by user (user 7 has none), and an item table."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, USERS, ratings)
    users[users == 7] = 8
    items = rng.integers(0, ITEMS, ratings)
    target = rng.normal(0, 1, ratings).astype(np.float32)
    table = rng.normal(0, 0.7, (ITEMS, WIDTH)).astype(np.float32)
    return posterior.Side.group(users, items, target, USERS), table


def _ops():
    try:
        return kernels.load()
    except kernels.KernelUnavailable as error:  # the suite's other tests say why
        pytest.skip(str(error))


PRIOR = np.array([2.0, 3.0, 4.0, 5.0], np.float32)
TAU = 1.7
# Per-row noise precisions and per-other-row weights: the user-movie noise model.
ROW_TAU = np.linspace(0.5, 3.0, USERS).astype(np.float32)
OTHER_WEIGHT = np.linspace(0.4, 2.5, ITEMS).astype(np.float32)[::-1].copy()


def _numpy_draw(side, table, noise, tau=None, weight=None):
    return posterior.sample_rows_numpy(
        side, table, PRIOR, np.full(USERS, TAU, np.float32) if tau is None else tau,
        np.ones(ITEMS, np.float32) if weight is None else weight, noise)


def _op_draw(side, table, noise, threads=2, tau=None, weight=None):
    sample, mean, squared = _ops().matrix_factorization_sample_rows(
        offsets=side.offsets, other=side.other, target=side.target, other_table=table,
        prior_precision=PRIOR,
        noise_precision=np.full(USERS, TAU, np.float32) if tau is None else tau,
        other_weight=np.ones(ITEMS, np.float32) if weight is None else weight,
        noise=noise, threads=threads)
    return sample.numpy(), mean.numpy(), squared.numpy()


@pytest.mark.parametrize('weighted', [False, True])
def test_conditional_mean_is_the_ridge_solution_of_each_row(weighted):
    side, table = _side()
    noise = np.zeros((USERS, WIDTH), np.float32)
    tau = ROW_TAU if weighted else np.full(USERS, TAU, np.float32)
    weight = OTHER_WEIGHT if weighted else np.ones(ITEMS, np.float32)
    sample, mean, squared = _numpy_draw(side, table, noise, tau, weight)
    for row in range(USERS):
        lo, hi = side.offsets[row], side.offsets[row + 1]
        z = np.hstack([table[side.other[lo:hi], :-1], np.ones((hi - lo, 1))]).astype(np.float64)
        y = side.target[lo:hi] - table[side.other[lo:hi], -1]
        w = weight[side.other[lo:hi]].astype(np.float64)  # each rating's noise precision / tau
        expected = np.linalg.solve(tau[row] * (z.T * w) @ z + np.diag(PRIOR),
                                   tau[row] * (z.T * w) @ y)
        np.testing.assert_allclose(mean[row], expected, rtol=1e-5, atol=1e-6)
        assert squared[row] == pytest.approx(float(np.sum(w * (y - z @ expected) ** 2)),
                                             rel=1e-5, abs=1e-9)
    np.testing.assert_array_equal(mean[7], 0.0)  # no ratings: the prior mean
    assert squared[7] == 0.0
    np.testing.assert_array_equal(sample, mean)  # zero noise: the draw is the mean


def test_draws_follow_the_conditional_posterior():
    side, table = _side()
    row = 3
    lo, hi = side.offsets[row], side.offsets[row + 1]
    z = np.hstack([table[side.other[lo:hi], :-1], np.ones((hi - lo, 1))]).astype(np.float64)
    w = OTHER_WEIGHT[side.other[lo:hi]].astype(np.float64)
    covariance = np.linalg.inv(ROW_TAU[row] * (z.T * w) @ z + np.diag(PRIOR))
    rng = np.random.default_rng(5)
    draws = np.array([
        _numpy_draw(side, table, rng.standard_normal((USERS, WIDTH), np.float32),
                    ROW_TAU, OTHER_WEIGHT)[0][row]
        for _ in range(3000)])
    mean = _numpy_draw(side, table, np.zeros((USERS, WIDTH), np.float32),
                       ROW_TAU, OTHER_WEIGHT)[1][row]
    np.testing.assert_allclose(draws.mean(0), mean, atol=4 * np.sqrt(covariance.diagonal() / 3000).max())
    np.testing.assert_allclose(np.cov(draws.T), covariance, rtol=0.15, atol=0.1 * covariance.diagonal().max())


@pytest.mark.parametrize('weighted', [False, True])
def test_op_matches_numpy_and_any_thread_count(weighted):
    side, table = _side()
    noise = np.random.default_rng(2).standard_normal((USERS, WIDTH)).astype(np.float32)
    precisions = dict(tau=ROW_TAU, weight=OTHER_WEIGHT) if weighted else {}
    expected = _numpy_draw(side, table, noise, **precisions)
    one = _op_draw(side, table, noise, threads=1, **precisions)
    three = _op_draw(side, table, noise, threads=3, **precisions)
    for actual, reference in zip(one, expected):
        np.testing.assert_allclose(actual, reference, rtol=1e-5, atol=1e-5)
    for a, b in zip(one, three):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('change, message', [
    (lambda side: dict(offsets=side.offsets[:-1]), 'offsets must start at 0'),
    (lambda side: dict(other=np.where(np.arange(len(side.other)) == 5, ITEMS, side.other)
                       .astype(np.int32)), r'other\[5\] = 20 is not a row'),
    (lambda side: dict(prior_precision=np.zeros(WIDTH, np.float32)), 'must be positive'),
    (lambda side: dict(noise_precision=np.float32(TAU)), 'one entry per row'),
    (lambda side: dict(noise_precision=-ROW_TAU), 'noise_precision must be positive'),
    (lambda side: dict(other_weight=np.ones(ITEMS - 1, np.float32)), 'one entry per other row'),
    (lambda side: dict(other_weight=np.zeros(ITEMS, np.float32)), 'other_weight must be positive'),
])
def test_op_rejects_bad_input_before_drawing(change, message):
    side, table = _side()
    inputs = dict(offsets=side.offsets, other=side.other, target=side.target,
                  other_table=table, prior_precision=PRIOR,
                  noise_precision=np.full(USERS, TAU, np.float32),
                  other_weight=np.ones(ITEMS, np.float32),
                  noise=np.zeros((USERS, WIDTH), np.float32), threads=2)
    inputs.update(change(side))
    if 'offsets' in change(side):
        inputs['noise'] = np.zeros((USERS - 1, WIDTH), np.float32)
        inputs['noise_precision'] = np.full(USERS - 1, TAU, np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        _ops().matrix_factorization_sample_rows(**inputs)


def test_low_rank_sum_is_exact_then_the_best_truncation():
    rng = np.random.default_rng(3)
    parts = [(rng.normal(size=(12, 2)), rng.normal(size=(9, 2))) for _ in range(5)]
    dense = sum(left @ right.T for left, right in parts)
    total = posterior.LowRankSum(max_width=6, keep_width=10)  # recompressed, nothing lost
    for left, right in parts:
        total.add(left, right)
    left, right = total.truncated(9)
    np.testing.assert_allclose(left @ right.T, dense, atol=1e-9)
    u, s, vt = np.linalg.svd(dense)
    left, right = total.truncated(3)
    np.testing.assert_allclose(left @ right.T, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-9)
    # The scale is split evenly between the sides.
    np.testing.assert_allclose(np.linalg.norm(left, axis=0), np.linalg.norm(right, axis=0))


def _planted(seed: int = 0, users: int = 120, items: int = 80, per_user: int = 12,
             factor_std: float = 0.8, noise_by_user: np.ndarray | None = None):
    """Rank-2 ratings with biases and noise (std 0.5, or noise_by_user[u] for
    user u's ratings); a held-out rating per user."""
    rng = np.random.default_rng(seed)
    p, q = rng.normal(0, factor_std, (users, 2)), rng.normal(0, factor_std, (items, 2))
    bu, bi = rng.normal(0, 0.3, users), rng.normal(0, 0.3, items)
    user = np.repeat(np.arange(users), per_user + 1)
    item = np.concatenate([rng.choice(items, per_user + 1, replace=False)
                           for _ in range(users)])
    signal = 3.5 + bu[user] + bi[item] + np.sum(p[user] * q[item], 1)
    noise_std = 0.5 if noise_by_user is None else noise_by_user[user]
    rating = (signal + noise_std * rng.normal(0, 1, len(user))).astype(np.float32)
    held = np.zeros(len(user), bool)
    held[::per_user + 1] = True
    return user, item, rating, held, signal


def _tables(users: int, items: int, factors: int, seed: int = 1):
    """Small random factors, zero biases and OOV rows: an untrained model's layout."""
    rng = np.random.default_rng(seed)
    tables = []
    for rows in (users, items):
        table = np.zeros((rows + features.NUM_OOV_BUCKETS, factors + 1), np.float32)
        table[:rows, :factors] = rng.normal(0, 0.1, (rows, factors))
        tables.append(table)
    return tables


def _predict(result, user, item, mu):
    k = result.user_table.shape[1] - 1
    return (mu + result.user_table[user, k] + result.item_table[item, k]
            + np.sum(result.user_table[user, :k] * result.item_table[item, :k], 1))


@pytest.mark.parametrize('kernel', ['auto', 'tf'])
def test_posterior_mean_recovers_the_planted_ratings(kernel):
    user, item, rating, held, signal = _planted()
    mu = float(rating[~held].mean())
    result = posterior.average(*_tables(120, 80, 4), mu, user[~held], item[~held],
                               rating[~held], samples=60, burn_in=20, seed=0, kernel=kernel)
    assert result.kernel == ('numpy' if kernel == 'tf' else 'op')
    predicted = _predict(result, user[held], item[held], mu)
    error = np.sqrt(np.mean((predicted - signal[held]) ** 2))
    spread = np.std(signal[held])
    # The planted signal varies by about 1.2 around its mean; the noise is 0.5.
    assert error < 0.5 * spread, (error, spread)
    assert 0.4 < result.noise_std < 0.6
    for table in (result.user_table, result.item_table):
        np.testing.assert_array_equal(table[-features.NUM_OOV_BUCKETS:], 0.0)


def test_same_seed_same_tables_and_both_kernels_agree():
    user, item, rating, held, _ = _planted(seed=1)
    tables = _tables(120, 80, 3)

    def run(kernel, seed=0):
        return posterior.average(*tables, 3.5, user, item, rating, samples=3,
                                 burn_in=1, seed=seed, kernel=kernel)
    first, second = run('auto'), run('auto')
    np.testing.assert_array_equal(first.user_table, second.user_table)
    np.testing.assert_array_equal(first.item_table, second.item_table)
    numpy_run = run('tf')
    # Two kernels compared, not numpy with itself: 'auto' ran the C++ op.
    assert (first.kernel, numpy_run.kernel) == ('op', 'numpy')
    # Same draws, float32 rounding apart.
    np.testing.assert_allclose(numpy_run.user_table, first.user_table, atol=1e-3)
    other_seed = run('auto', seed=1)
    assert np.abs(other_seed.user_table - first.user_table).max() > 1e-3


def test_average_rejects_no_samples():
    tables = _tables(3, 3, 2)
    with pytest.raises(ValueError, match='samples >= 1'):
        posterior.average(*tables, 3.0, np.array([0]), np.array([0]), np.array([3.0]),
                          samples=0, burn_in=0, seed=0)


def test_a_sum_of_lower_rank_than_asked_is_padded_with_zero_factors():
    total = posterior.LowRankSum(max_width=100, keep_width=100)
    rng = np.random.default_rng(4)
    left, right = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
    total.add(left, right)
    wide_left, wide_right = total.truncated(8)  # rank 3 at most: 3 users
    assert wide_left.shape == (3, 8) and wide_right.shape == (4, 8)
    np.testing.assert_allclose(wide_left @ wide_right.T, left @ right.T, atol=1e-9)


def test_a_prior_mean_centres_the_user_rows():
    """Users with 3 train ratings each: the prior decides much of their rows."""
    rng = np.random.default_rng(3)
    users, items, per_user = 200, 60, 4
    p, q = rng.normal(0, 1.0, (users, 2)), rng.normal(0, 1.0, (items, 2))
    user = np.repeat(np.arange(users), per_user)
    item = np.concatenate([rng.choice(items, per_user, replace=False) for _ in range(users)])
    signal = 3.5 + np.sum(p[user] * q[item], 1)
    rating = (signal + rng.normal(0, 0.5, len(user))).astype(np.float32)
    held = np.zeros(len(user), bool)
    held[::per_user] = True
    tables = _tables(users, items, 2)
    planted_mean = np.zeros_like(tables[0])
    planted_mean[:users, :2] = p

    def run(prior_mean, kernel='auto'):
        return posterior.average(*tables, 3.5, user[~held], item[~held], rating[~held],
                                 samples=40, burn_in=20, seed=0, kernel=kernel,
                                 user_prior_mean=prior_mean)

    def error(result):
        return np.sqrt(np.mean((_predict(result, user[held], item[held], 3.5)
                                - signal[held]) ** 2))
    zero, planted = run(None), run(planted_mean)
    assert error(planted) < 0.6 * error(zero), (error(planted), error(zero))
    # A zero prior mean is no prior mean; numpy draws the same chain as the op.
    np.testing.assert_array_equal(run(np.zeros_like(planted_mean)).user_table, zero.user_table)
    with_numpy = run(planted_mean, 'tf')
    assert (planted.kernel, with_numpy.kernel) == ('op', 'numpy')
    np.testing.assert_allclose(with_numpy.user_table, planted.user_table, atol=1e-3)


def _overfit_tables(user, item, rating, mu, users: int, items: int, factors: int):
    """Factors and biases fitted by alternating least squares with almost no ridge:
    an overfit mode, the kind a weakly regularised trainer can hand the chain."""
    rng = np.random.default_rng(1)
    sides = [rng.normal(0, 0.1, (users, factors + 1)), rng.normal(0, 0.1, (items, factors + 1))]
    for side in sides:
        side[:, factors] = 0.0
    rows, target = (user, item), rating - mu
    for _ in range(30):
        for solved in (0, 1):
            table, other = sides[solved], sides[1 - solved]
            for row in range(table.shape[0]):
                mine = rows[solved] == row
                design = np.c_[other[rows[1 - solved][mine], :factors], np.ones(mine.sum())]
                table[row] = np.linalg.solve(
                    design.T @ design + 0.01 * np.eye(factors + 1),
                    design.T @ (target[mine] - other[rows[1 - solved][mine], factors]))
    tables = []
    for side in sides:
        table = np.zeros((side.shape[0] + features.NUM_OOV_BUCKETS, factors + 1), np.float32)
        table[:side.shape[0]] = side
        tables.append(table)
    return tables


def test_a_chain_started_from_shrunk_factors_leaves_an_overfit_mode(monkeypatch):
    # Planted answer: the signal behind held-out ratings.  Started at the
    # overfit mode itself, the chain keeps much of the overfit; from the
    # mode's factors shrunk by START_FACTOR_SCALE it gets closer to the signal.
    user, item, rating, held, signal = _planted()
    mu = float(rating[~held].mean())
    tables = _overfit_tables(user[~held], item[~held], rating[~held], mu, 120, 80, 6)
    errors, shrink = {}, posterior.START_FACTOR_SCALE
    for scale in (1.0, shrink):
        monkeypatch.setattr(posterior, 'START_FACTOR_SCALE', scale)
        result = posterior.average(*tables, mu, user[~held], item[~held], rating[~held],
                                   samples=60, burn_in=20, seed=0, noise='shared')
        predicted = _predict(result, user[held], item[held], mu)
        errors[scale] = np.sqrt(np.mean((predicted - signal[held]) ** 2))
    # Measured: 0.430 from the mode, 0.347 from its factors times 0.3.
    assert shrink < 1 and errors[shrink] < 0.9 * errors[1.0], errors


def _heteroscedastic(noise_by_user: np.ndarray):
    """_planted's ratings for more users, each with their own noise std."""
    return _planted(users=len(noise_by_user), items=100, per_user=30, factor_std=0.7,
                    noise_by_user=noise_by_user)


def _held_out_error(data, noise: str) -> tuple[float, posterior.Result]:
    user, item, rating, held, signal = data
    users, items = int(user.max()) + 1, int(item.max()) + 1
    mu = float(rating[~held].mean())
    result = posterior.average(*_tables(users, items, 3), mu, user[~held], item[~held],
                               rating[~held], samples=60, burn_in=20, seed=0, noise=noise)
    predicted = _predict(result, user[held], item[held], mu)
    return float(np.sqrt(np.mean((predicted - signal[held]) ** 2))), result


def test_per_user_noise_finds_the_erratic_users_and_predicts_better():
    # Planted: a third of the users rate with noise std 1.5, the rest 0.3.
    # One noise level lets the erratic users' ratings pull the movies'
    # factors; per-user precisions weigh them down.
    noise_by_user = np.where(np.arange(240) % 3 == 0, 1.5, 0.3)
    data = _heteroscedastic(noise_by_user)
    shared, _ = _held_out_error(data, 'shared')
    per_row, result = _held_out_error(data, 'user-movie')
    assert result.noise == 'user-movie' and result.noise_shapes is not None
    # Measured: 0.264 against 0.418.
    assert per_row < 0.75 * shared, (per_row, shared)
    # The rms noise std over the ratings, sqrt(mean of 1.5^2 and 0.3^2 weighted 1:2) = 0.92.
    assert 0.75 < result.noise_std < 1.1, result.noise_std


def test_per_user_noise_costs_little_where_every_user_is_alike():
    data = _heteroscedastic(np.full(240, 0.6))
    shared, _ = _held_out_error(data, 'shared')
    per_row, result = _held_out_error(data, 'user-movie')
    # Measured: 0.241 against 0.245; the users' noise prior was drawn narrow
    # (shape 126: noise levels within about 10% of each other).
    assert per_row < 1.03 * shared, (per_row, shared)
    assert result.noise_shapes[0] > 20, result.noise_shapes


def test_average_rejects_an_unknown_noise_model():
    tables = _tables(3, 3, 2)
    with pytest.raises(ValueError, match='noise must be one of'):
        posterior.average(*tables, 3.0, np.array([0]), np.array([0]), np.array([3.0]),
                          samples=1, burn_in=0, seed=0, noise='per-rating')


def test_the_sweeps_log_their_progress_and_the_time_left(monkeypatch, caplog):
    monkeypatch.setattr(logs, 'PROGRESS_SECONDS', 0.0)  # a line every sweep
    caplog.set_level(logging.INFO, logger='trainer.progress')
    user, item, rating, _, _ = _planted(seed=1)
    posterior.average(*_tables(120, 80, 3), 3.5, user, item, rating, samples=3, burn_in=1,
                      seed=0)
    lines = [record.getMessage() for record in caplog.records if record.name == 'trainer.progress']
    assert [line.split(' (')[0] for line in lines] == [
        f'Posterior sweeps: {sweep} of 4' for sweep in range(1, 5)]
    assert lines[-1].startswith('Posterior sweeps: 4 of 4 (100%), ')
    assert lines[-1].endswith(', about 0 s left')


def test_batch_means_find_the_planted_variance_of_a_running_mean():
    # Planted: 2,000 ratings' predictions follow AR(1) chains with rho 0.6,
    # so the running mean of n sweeps has variance sigma^2 tau / n with the
    # integrated autocorrelation time tau = (1 + rho) / (1 - rho) = 4.
    rng = np.random.default_rng(0)
    rho, sigma, sweeps = 0.6, 0.5, 400
    batches = posterior.BatchMeans(2000)
    value = rng.normal(0, sigma, 2000)
    for _ in range(sweeps):
        batches.add(value)
        value = rho * value + np.sqrt(1 - rho ** 2) * rng.normal(0, sigma, 2000)
    assert posterior.MIN_BATCHES <= len(batches.whole) < 2 * posterior.MIN_BATCHES
    assert batches.size * len(batches.whole) + batches.in_current == sweeps
    # Batches of 32 sweeps against a memory of a few: within 15% of 4.
    assert 3.4 < batches.autocorrelation() < 4.6, batches.autocorrelation()
    expected = sigma ** 2 * 4 / sweeps
    assert batches.variance() == pytest.approx(expected, rel=0.15)
    # A chain still drifting (a trend of 0.5 over the sweeps, each rating its own
    # direction) has a running mean that is off by far more than its noise.
    drifting = posterior.BatchMeans(2000)
    direction = rng.choice([-1.0, 1.0], 2000)
    for sweep in range(sweeps):
        drifting.add(direction * 0.5 * sweep / sweeps + rng.normal(0, sigma, 2000))
    # Batch means alone would say sigma^2 / n (independent draws around the trend,
    # plus the trend's spread within the batches); half the halves' gap is 0.125.
    assert drifting.variance() > 10 * sigma ** 2 / sweeps
    assert drifting.variance() == pytest.approx(0.125 ** 2, rel=0.25)
    few = posterior.BatchMeans(3)
    for _ in range(posterior.MIN_BATCHES - 1):
        few.add(np.ones(3))
    assert few.variance() is None  # too few batches to say


def test_the_validation_sample_is_seeded_and_leaves_out_unknown_rows(monkeypatch):
    monkeypatch.setattr(posterior, 'VALIDATION_SAMPLE', 50)
    rng = np.random.default_rng(1)
    user, item = rng.integers(0, 12, 300), rng.integers(0, 9, 300)
    rating = rng.normal(3, 1, 300)
    sample = posterior.validation_sample(user, item, rating, 10, 8, seed=0)
    assert len(sample[0]) == 50
    assert sample[0].max() < 10 and sample[1].max() < 8
    again = posterior.validation_sample(user, item, rating, 10, 8, seed=0)
    other = posterior.validation_sample(user, item, rating, 10, 8, seed=1)
    for a, b in zip(sample, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(sample[2], other[2])


def _adaptive(samples: int = 60, **settings):
    """The planted chain with a validation slice (the held-out ratings) for the rule."""
    user, item, rating, held, _ = _planted(seed=2)
    mu = float(rating[~held].mean())
    tables = _tables(120, 80, 3)
    settings = {'burn_in': 5, 'seed': 0, **settings}
    return posterior.average(*tables, mu, user[~held], item[~held], rating[~held],
                             samples=samples,
                             validation=(user[held], item[held], rating[held]), **settings)


@functools.cache
def _statistics() -> dict[int, float | None]:
    """The rule's statistic after each kept sweep of a chain run to its cap,
    from the chain states the sweeps hand over."""
    user, item, rating, held, _ = _planted(seed=2)
    sample = posterior.validation_sample(user[held], item[held], rating[held], 120, 80, 0)
    target = sample[2] - float(np.float32(float(rating[~held].mean())))
    statistics = {}

    def after_sweep(sweep, chain, last):
        state = chain()
        batches = posterior.BatchMeans(len(target))
        batches.restore(state.batches)
        if sweep > 5:
            statistics[sweep - 5] = posterior.mc_error_share(batches, target)
    result = _adaptive(after_sweep=after_sweep, mc_error=0.0)
    assert result.stopped_by == 'cap' and result.mc_error_level == 0.0
    return statistics


def test_a_loose_level_stops_at_the_minimum_and_a_tight_one_runs_to_the_cap(caplog):
    caplog.set_level(logging.INFO, logger='trainer.rating.posterior')
    loose = _adaptive(mc_error=0.5, min_samples=12)
    assert (loose.samples, loose.stopped_by) == (12, 'mc_error')
    assert loose.mc_error <= 0.5 and loose.mc_error_level == 0.5
    assert 'Posterior chain stopped after 12 kept sweeps' in caplog.text
    tight = _adaptive(samples=30, mc_error=1e-9, min_samples=12)
    assert (tight.samples, tight.stopped_by) == (30, 'cap')
    assert tight.mc_error > 1e-9
    assert tight.validation_sample == 120  # a held-out rating per user


def test_the_chain_stops_at_the_first_sweep_the_rule_allows_and_equals_a_fixed_chain(caplog):
    statistics = _statistics()
    # From MIN_BATCHES kept sweeps on (batches of one sweep), the rule has a figure.
    assert [kept for kept, value in statistics.items() if value is None] == list(
        range(1, posterior.MIN_BATCHES))
    level = statistics[30] * 1.001
    expected = min(kept for kept, value in statistics.items()
                   if kept >= 20 and value is not None and value <= level)
    caplog.set_level(logging.INFO, logger='trainer.rating.posterior')
    stopped = _adaptive(mc_error=level, min_samples=20, progress_every=1)
    assert (stopped.samples, stopped.stopped_by) == (expected, 'mc_error')
    assert stopped.mc_error == pytest.approx(statistics[expected], rel=1e-9)
    # The logged error at the stop sweep is the rule's figure.
    line = next(record.getMessage() for record in caplog.records
                if record.getMessage().startswith(f'Posterior sweep {expected + 5}/65 '))
    assert f'Monte Carlo error {100 * statistics[expected]:.3g}% of the validation' in line
    # The rule draws nothing: the stopped chain is the fixed chain of that length.
    fixed = _adaptive(samples=expected)
    np.testing.assert_array_equal(stopped.user_table, fixed.user_table)
    np.testing.assert_array_equal(stopped.item_table, fixed.item_table)
    # And the same seed stops at the same sweep with the same tables.
    again = _adaptive(mc_error=level, min_samples=20)
    assert again.samples == stopped.samples
    np.testing.assert_array_equal(again.user_table, stopped.user_table)


@pytest.mark.parametrize('stop_after', ['burn-in', 'kept', 'last'])
def test_an_adaptive_chain_resumed_from_its_checkpoint_stops_at_the_same_sweep(
        stop_after, tmp_path):
    from trainer.rating import state
    settings = dict(mc_error=_statistics()[40] * 1.001, min_samples=18)
    uninterrupted = _adaptive(**settings)
    assert uninterrupted.stopped_by == 'mc_error' and 18 <= uninterrupted.samples <= 40
    stop_sweep = uninterrupted.samples + 5
    at = {'burn-in': 3, 'kept': stop_sweep - 4, 'last': stop_sweep}[stop_after]
    path = str(tmp_path / 'posterior' / 'chain.npz')
    lasts = []

    def save_at(sweep, chain, last):
        lasts.append(last)
        if sweep == at:
            state.save_chain(path, chain())
    _adaptive(after_sweep=save_at, **settings)
    assert lasts == [False] * (stop_sweep - 1) + [True]
    saved = state.load_chain(path)
    assert saved.sweep == at and saved.stopped == (stop_after == 'last')
    resumed = _adaptive(resume=saved, **settings)
    assert (resumed.samples, resumed.stopped_by) == (uninterrupted.samples, 'mc_error')
    assert resumed.mc_error == uninterrupted.mc_error
    np.testing.assert_array_equal(resumed.user_table, uninterrupted.user_table)
    np.testing.assert_array_equal(resumed.item_table, uninterrupted.item_table)
    # Another level is another chain: its checkpoint is not resumed.
    other = _adaptive(resume=saved, mc_error=0.5, min_samples=10)
    assert (other.samples, other.mc_error_level) == (10, 0.5)


def test_average_rejects_a_negative_level():
    tables = _tables(3, 3, 2)
    with pytest.raises(ValueError, match='mc_error >= 0'):
        posterior.average(*tables, 3.0, np.array([0]), np.array([0]), np.array([3.0]),
                          samples=1, burn_in=0, seed=0, mc_error=-0.1)


def test_the_start_scale_is_the_chains_start_and_part_of_its_settings(monkeypatch, tmp_path):
    from trainer.rating import state
    from_mode = _adaptive(samples=3, start_scale=1.0)
    monkeypatch.setattr(posterior, 'START_FACTOR_SCALE', 1.0)
    np.testing.assert_array_equal(_adaptive(samples=3).user_table, from_mode.user_table)
    monkeypatch.undo()
    shrunk = _adaptive(samples=3)
    assert np.abs(shrunk.user_table - from_mode.user_table).max() > 1e-3
    path = str(tmp_path / 'chain.npz')

    def save(sweep, chain, last):
        if last:
            state.save_chain(path, chain())
    _adaptive(samples=3, start_scale=1.0, after_sweep=save)
    # A checkpoint of a chain from the mode is not resumed by a chain from 0.3 of it.
    resumed = _adaptive(samples=3, resume=state.load_chain(path))
    np.testing.assert_array_equal(resumed.user_table, shrunk.user_table)
    with pytest.raises(ValueError, match='start_scale'):
        _adaptive(samples=3, start_scale=1.5)


@pytest.mark.parametrize('stopped_by, level, expected', [
    ('mc_error', 0.001, '(stopped at Monte Carlo error 0.0912% of the validation RMSE, '
                        'level 0.1%; 61.0 s)'),
    ('cap', 0.001, '(the cap, Monte Carlo error 0.213% of the validation RMSE against a level '
                   'of 0.1%; 61.0 s)'),
    ('cap', 0.0, '(Monte Carlo error 0.213% of the validation RMSE; 61.0 s)'),
])
def test_the_summary_line_says_why_the_chain_stopped(stopped_by, level, expected):
    from trainer import task
    posterior_metrics = {'samples': 37, 'burn_in': 20, 'noise': 'user-movie', 'seconds': 61.0,
                         'mc_error': 0.000912 if stopped_by == 'mc_error' else 0.00213,
                         'mc_error_level': level, 'stopped_by': stopped_by,
                         'max_samples': 100, 'before': {'eval_rmse': 0.8}}
    line = task._posterior_line(posterior_metrics)
    assert line.startswith('  then its posterior mean: 37 Gibbs sweeps after 20 burn-in, ')
    assert expected in line, line


def test_default_chain_starts_from_the_trained_model_and_stops_by_the_rule_on_large_data():
    small = posterior.default_chain(posterior.LARGE_CHAIN_RATINGS - 1)
    large = posterior.default_chain(posterior.LARGE_CHAIN_RATINGS)
    assert small == (posterior.START_FACTOR_SCALE, 0.0) and small[0] < 1
    assert large == (1.0, posterior.LARGE_CHAIN_MC_ERROR) and large[1] > 0
    # The flags' defaults leave the choice to the data; an explicit value wins.
    parsed = config.parse_args(['--work-dir', 'w'])
    assert parsed.posterior_start_scale is None and parsed.posterior_mc_error is None
    parsed = config.parse_args(['--work-dir', 'w', '--posterior-start-scale', '0.3',
                                '--posterior-mc-error', '0'])
    assert parsed.posterior_start_scale == 0.3 and parsed.posterior_mc_error == 0.0
