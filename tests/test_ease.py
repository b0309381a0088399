"""Tests of EASE (trainer/topn/ease.py): the closed form, the Gram matrix, the stored neighbours.

Planted answers: each column of B is the ridge regression of that movie's
column on the others (solved directly here, one movie at a time); on data
where movies come in franchises of four watched together, the stored
neighbours of each movie are its franchise and reproduce the dense model's
top-k lists.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from trainer.topn import catalog as catalog_lib
from trainer.topn import ease


def _ratings(seed: int, users: int, movies: int, density: float):
    rng = np.random.default_rng(seed)
    rated = rng.random((users, movies)) < density
    user, item = np.nonzero(rated)
    rating = rng.integers(1, 6, user.size).astype(np.float32)
    return user, item, rating


def _dense(user, item, rating, users, movies, target='rating'):
    x = np.zeros((users, movies))
    x[user, item] = ease.pair_values(rating, target)
    return x


@pytest.mark.parametrize('dropout', [0.0, 0.4])
def test_closed_form_equals_each_movie_s_ridge_regression_on_the_others(dropout):
    # min |X - XB|^2 + sum_k Lambda_kk |B_k|^2, diag(B) = 0, column by column: movie j's
    # column regressed on the others, weight k penalised by lam + p / (1 - p) G_kk.
    user, item, rating = _ratings(0, 50, 12, 0.35)
    x = _dense(user, item, rating, 50, 12)
    lam = 3.0
    weights = ease.weights_from_gram(x.T @ x, lam, dropout)
    penalty = lam + dropout / (1 - dropout) * np.sum(x * x, axis=0)
    for j in range(12):
        others = [k for k in range(12) if k != j]
        a = x[:, others]
        direct = np.linalg.solve(a.T @ a + np.diag(penalty[others]), a.T @ x[:, j])
        np.testing.assert_allclose(weights[others, j], direct, rtol=1e-8, atol=1e-10)
        assert weights[j, j] == 0.0


@pytest.mark.parametrize('dropout', [0.0, 0.4])
def test_the_dlae_form_is_each_movie_s_ridge_regression_on_all_movies(dropout):
    # Without diag(B) = 0: min |X - XB|^2 + sum_k Lambda_kk |B_k|^2, column j regressed on
    # every movie, itself included (the stacked least-squares problem [X; Lambda^1/2]).
    # The stored B drops the diagonal (it scores only rated movies, never recommended).
    user, item, rating = _ratings(3, 50, 12, 0.35)
    x = _dense(user, item, rating, 50, 12)
    lam = 3.0
    weights = ease.weights_from_gram(x.T @ x, lam, dropout, 'dlae')
    penalty = lam + dropout / (1 - dropout) * np.sum(x * x, axis=0)
    stacked = np.vstack([x, np.diag(np.sqrt(penalty))])
    direct = np.linalg.lstsq(stacked, np.vstack([x, np.zeros((12, 12))]), rcond=None)[0]
    np.fill_diagonal(direct, 0.0)
    np.testing.assert_allclose(weights, direct, rtol=1e-7, atol=1e-10)
    # The two forms differ by a scale per column k: Lambda_kk against 1 / P_kk.
    inverse, diagonal = ease.penalised_inverse(x.T @ x, lam, dropout)
    np.testing.assert_allclose(
        weights, ease.weights_from_gram(x.T @ x, lam, dropout) * (diagonal * np.diag(inverse)),
        rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match='form'):
        ease.weights_from_inverse(inverse, diagonal, 'slim')


def test_no_dropout_is_ease_and_dropout_shrinks_popular_movies_weights_more():
    user, item, rating = _ratings(2, 60, 10, 0.4)
    x = _dense(user, item, rating, 60, 10)
    gram = x.T @ x
    np.testing.assert_array_equal(ease.weights_from_gram(gram, 5.0, 0.0),
                                  ease.weights_from_gram(gram, 5.0))
    # p = 0.5 adds each movie's Gram diagonal to its penalty: the most-rated movie's
    # outgoing weights shrink by more than the least-rated one's.
    plain, dropped = ease.weights_from_gram(gram, 5.0), ease.weights_from_gram(gram, 5.0, 0.5)
    shrink = np.abs(dropped).sum(axis=1) / np.abs(plain).sum(axis=1)
    diagonal = np.diag(gram)
    assert shrink[np.argmax(diagonal)] < shrink[np.argmin(diagonal)]
    with pytest.raises(ValueError, match='dropout'):
        ease.weights_from_gram(gram, 5.0, 1.0)


def test_user_weights_make_each_user_s_total_weight_their_count_to_the_power_1_minus_a(
        monkeypatch):
    user, item, rating = _ratings(4, 45, 20, 0.3)
    user = np.concatenate([user, np.full(15, 7)])  # one heavy user...
    item = np.concatenate([item, np.arange(15)])
    keep = np.unique(np.stack([user, item], 1), axis=0, return_index=True)[1]
    user, item = user[keep], item[keep]
    rating = np.resize(rating, user.size)
    user[user == 44] = 43  # ... and user 44 with none
    counts = np.bincount(user, minlength=45).astype(float)
    assert ease.user_scale(user, 45, 0.0).tolist() == [1.0] * 45
    scale = ease.user_scale(user, 45, 1.0)
    rated = counts > 0
    # a = 1: scale^2 x n_u is the mean count for every user (each weighs alike in total).
    np.testing.assert_allclose(scale[rated] ** 2 * counts[rated], counts[rated].mean())
    assert scale[44] == 1.0
    # The Gram matrix of the scaled rows, summed block by block (blocks of 4 users here).
    monkeypatch.setattr(ease, '_GRAM_BLOCK_CELLS', 4 * 20)
    x = _dense(user, item, rating, 45, 20) * scale[:, None]
    np.testing.assert_allclose(ease.gram(user, item, ease.pair_values(rating), 45,
                                         np.arange(20), 20, scale), x.T @ x,
                               rtol=1e-5, atol=1e-5)
    # With weights, each column of B is the weighted ridge regression on the others.
    lam = 2.0
    weights = ease.weights_from_gram(x.T @ x, lam, 0.25)
    penalty = lam + 0.25 / 0.75 * np.sum(x * x, axis=0)
    for j in (0, 7, 19):
        others = [k for k in range(20) if k != j]
        direct = np.linalg.solve(x[:, others].T @ x[:, others] + np.diag(penalty[others]),
                                 x[:, others].T @ x[:, j])
        np.testing.assert_allclose(weights[others, j], direct, rtol=1e-7, atol=1e-10)


def test_graded_values_and_the_gram_matrix_of_the_most_rated_movies():
    user, item, rating = _ratings(1, 40, 30, 0.3)
    assert ease.pair_values(np.array([1.0, 2.0, 3.0, 4.0, 5.0])).tolist() == pytest.approx(
        [0.2, 0.2, 1.0, 2.0, 3.0])
    x = _dense(user, item, rating, 40, 30)
    np.testing.assert_allclose(ease.gram(user, item, ease.pair_values(rating), 40,
                                         np.arange(30), 30), x.T @ x, rtol=1e-5, atol=1e-5)
    counts = np.bincount(item, minlength=30)
    subset = ease.movie_subset(counts, 10)
    assert subset.size == 10 and np.all(np.diff(subset) > 0)
    assert counts[subset].min() >= np.sort(counts)[-10]
    np.testing.assert_allclose(ease.gram(user, item, ease.pair_values(rating), 40, subset, 30),
                               x[:, subset].T @ x[:, subset], rtol=1e-5, atol=1e-5)


def _franchise_ratings(seed: int, users: int = 300, franchises: int = 30, size: int = 4):
    """Each user watches a few whole franchises (and a few stray movies)."""
    rng = np.random.default_rng(seed)
    movies = franchises * size
    rated = np.zeros((users, movies), bool)
    for u in range(users):
        for f in rng.choice(franchises, 3, replace=False):
            members = np.arange(f * size, (f + 1) * size)
            rated[u, members[rng.random(size) < 0.8]] = True
        rated[u, rng.choice(movies, 2, replace=False)] = True
    user, item = np.nonzero(rated)
    return user, item, rng.integers(1, 6, user.size).astype(np.float32), users, movies


def test_stored_neighbours_reproduce_the_dense_top_k():
    user, item, rating, users, movies = _franchise_ratings(2)
    stored = ease.fit(user, item, rating, users, movies, lam=100.0, count=16)
    x = _dense(user, item, rating, users, movies)
    weights = ease.weights_from_gram(x.T @ x, 100.0)
    assert stored.index.shape == (movies, 16)
    # A movie's two strongest neighbours are mostly its franchise (chance: 2 in 119).
    franchise_mates = (stored.index // 4) == (np.arange(movies)[:, None] // 4)
    strongest = np.argsort(-stored.weight, axis=1)[:, :2]
    assert np.take_along_axis(franchise_mates, strongest, axis=1).mean() > 0.85
    # More neighbours reproduce more of the dense top 10 (on generated 100k,
    # 200 of 1,621 movies give 0.94), and all of them give it exactly.
    recalls = [ease.neighbour_recall(x, weights, ease.neighbours(
        weights, np.arange(movies), movies, count, 100.0), 10) for count in (16, 32, 64)]
    assert recalls[0] == ease.neighbour_recall(x, weights, stored, 10)
    assert recalls[0] < recalls[1] < recalls[2] and recalls[2] >= 0.9
    # All neighbours: exactly the dense scores.
    full = ease.neighbours(weights, np.arange(movies), movies, movies - 1, 100.0)
    assert ease.neighbour_recall(x, weights, full, 10) == 1.0


def test_tensorflow_scores_equal_x_times_b_and_unknown_users_get_nothing():
    user, item, rating, users, movies = _franchise_ratings(3, users=60, franchises=8)
    x = _dense(user, item, rating, users, movies)
    weights = ease.weights_from_gram(x.T @ x, 5.0)
    full = ease.neighbours(weights, np.arange(movies), movies, movies - 1, 5.0)
    seen_items, row_splits = catalog_lib.group_by_user(user, item, users + 1)
    seen = tf.RaggedTensor.from_row_splits(seen_items, row_splits)
    values = tf.RaggedTensor.from_row_splits(ease.user_values(user, item, rating), row_splits)
    got = ease.scores(*ease.sparse_weights(full), seen, values, tf.range(users + 1),
                      movies).numpy()
    np.testing.assert_allclose(got[:users], x @ weights, rtol=1e-4, atol=1e-4)
    assert not got[users].any()  # the OOV row has no train movies


def test_by_default_b_is_stored_whole_and_scores_exactly_x_times_b(monkeypatch):
    user, item, rating, users, movies = _franchise_ratings(5, users=60, franchises=8)
    x = _dense(user, item, rating, users, movies)
    weights = ease.weights_from_gram(x.T @ x, 5.0)
    stored = ease.fit(user, item, rating, users, movies, lam=5.0,
                      count=ease.stored_count(0, movies))
    assert stored.dense is not None and stored.count == movies - 1
    np.testing.assert_allclose(stored.dense, weights, rtol=1e-5, atol=1e-6)
    seen_items, row_splits = catalog_lib.group_by_user(user, item, users + 1)
    seen = tf.RaggedTensor.from_row_splits(seen_items, row_splits)
    values = tf.RaggedTensor.from_row_splits(ease.user_values(user, item, rating), row_splits)
    got = ease.dense_matrix_scores(tf.constant(stored.dense), seen, values,
                                   tf.range(users + 1), movies + 1).numpy()
    assert got.shape == (users + 1, movies + 1)
    np.testing.assert_allclose(got[:users, :movies], x @ weights, rtol=1e-4, atol=1e-4)
    assert not got[users].any() and not got[:, movies].any()  # OOV row and column
    # The sparse form of the same B scores the same.
    sparse = ease.scores(*ease.sparse_weights(stored), seen, values, tf.range(users + 1),
                         movies).numpy()
    np.testing.assert_allclose(sparse, got[:, :movies], rtol=1e-4, atol=1e-4)
    # Past DENSE_MAX_MOVIES catalogue movies the default stores DEFAULT_NEIGHBOURS each;
    # an explicit count is kept as given.
    monkeypatch.setattr(ease, 'DENSE_MAX_MOVIES', movies - 1)
    assert ease.stored_count(0, movies) == ease.DEFAULT_NEIGHBOURS
    assert ease.stored_count(7, movies) == 7
    cut = ease.fit(user, item, rating, users, movies, lam=5.0, count=movies - 1)
    assert cut.dense is None and cut.index.shape == (movies, movies - 1)


def test_movies_outside_the_kept_subset_have_no_neighbours():
    user, item, rating, users, movies = _franchise_ratings(4, users=80, franchises=10)
    stored = ease.fit(user, item, rating, users, movies, lam=5.0, max_movies=20, count=8)
    kept = ease.movie_subset(np.bincount(item, minlength=movies), 20)
    assert stored.movies == 20
    outside = np.setdiff1d(np.arange(movies), kept)
    assert not stored.weight[outside].any()
    assert np.isin(stored.index[kept], kept).all()
