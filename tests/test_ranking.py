"""Tests of trainer/topn/ranking.py: hand-made cases whose top-k lists and metrics are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from trainer import logs
from trainer.rating.model import MatrixFactorization
from trainer.topn import catalog as catalog_lib
from trainer.topn import ranking

LOG2_3 = math.log2(3)


def _model(num_users: int, num_items: int, num_factors: int = 2) -> MatrixFactorization:
    return MatrixFactorization(num_users, num_items, num_factors, global_mean=3.0,
                               init_stddev=0.5, seed=3)


def test_ranking_metrics_of_hand_made_lists():
    # k = 3 over 6 items. User 0 finds 1 of 2 relevant at rank 2; user 1 finds
    # its only relevant one at rank 1 (its list is padded); user 2 has none
    # relevant: skipped for precision/recall/NDCG, counted for coverage.
    top = np.array([[0, 1, 2], [3, 4, -1], [0, 3, 1]])
    rows = np.array([0, 0, 1])
    items = np.array([1, 5, 3])
    metrics = ranking.ranking_metrics(top, rows, items, num_items=6, k=3)
    ndcg_user0 = (1 / LOG2_3) / (1 + 1 / LOG2_3)
    assert metrics['precision'] == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert metrics['recall'] == pytest.approx((1 / 2 + 1) / 2)
    assert metrics['ndcg'] == pytest.approx((ndcg_user0 + 1.0) / 2)
    assert metrics['coverage'] == pytest.approx(5 / 6)  # items 0..4 shown


def test_ranking_metrics_without_relevant_items_are_nan_but_coverage_is_not():
    metrics = ranking.ranking_metrics(np.array([[0, 1]]), np.zeros(0, np.int64),
                                      np.zeros(0, np.int64), num_items=4, k=2)
    assert all(math.isnan(metrics[name]) for name in ('precision', 'recall', 'ndcg'))
    assert metrics['coverage'] == pytest.approx(0.5)


def test_perfect_lists_score_one():
    top = np.array([[2, 0], [1, 3]])
    metrics = ranking.ranking_metrics(top, np.array([0, 0, 1]), np.array([0, 2, 1]),
                                      num_items=4, k=2)
    assert metrics == pytest.approx({'precision': 0.75, 'recall': 1.0, 'ndcg': 1.0,
                                     'coverage': 1.0})


def test_top_k_unseen_skips_seen_items_and_marks_padding():
    scores = tf.constant([[5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    seen = tf.ragged.constant([[0, 2], [0, 1, 2]], dtype=tf.int32)
    values, indices, valid = ranking.top_k_unseen(scores, seen, 2)
    np.testing.assert_array_equal(indices.numpy(), [[1, 3], [3, 0]])
    np.testing.assert_array_equal(valid.numpy(), [[True, True], [True, False]])
    np.testing.assert_allclose(values.numpy()[0], [4.0, 2.0])


@pytest.mark.parametrize('num_items', [5000, 5121, 7 * 128])
@pytest.mark.parametrize('k', [1, 10])
def test_top_k_rows_equals_tf_top_k_with_ties_and_masked_items(num_items, k):
    # Integer scores tie often; -inf entries are masked (seen) items. Row 1
    # has fewer than k unmasked items, row 2 its best ones in the partial
    # last chunk, row 3 all ties.
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 40, (6, num_items)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.3] = -np.inf
    scores[1] = -np.inf
    scores[1, [3, num_items - 1]] = 1.0
    scores[2, -3:] = 100.0
    scores[3] = 7.0
    expected_values, expected_indices = tf.math.top_k(scores, k)
    # As in the `recommend` signature: shapes and k unknown when traced.
    traced = tf.function(ranking.top_k_rows, input_signature=[
        tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([], tf.int32)])
    for values, indices in (ranking.top_k_rows(tf.constant(scores), k),
                            ranking.top_k_rows(tf.constant(scores), tf.constant(k)),
                            traced(tf.constant(scores), tf.constant(k))):
        np.testing.assert_array_equal(values.numpy(), expected_values.numpy())
        finite = np.isfinite(expected_values.numpy())
        np.testing.assert_array_equal(indices.numpy()[finite],
                                      expected_indices.numpy()[finite])


def test_score_items_matches_the_model_pair_by_pair():
    model = _model(num_users=3, num_items=4)
    model.set_weights(user_bias=[0.5, -0.2, 0.1, 0.0])
    model.set_weights(item_bias=[0.3, -0.4, 0.2, 0.9, 0.0])
    users = tf.constant([0, 2, 3], tf.int64)  # 3 is the OOV user
    scores = ranking.score_items(model, users, 4).numpy()
    assert scores.shape == (3, 4)
    for row, user in enumerate(users.numpy()):
        expected = model(tf.fill([4], user), tf.range(4, dtype=tf.int64)).numpy()
        np.testing.assert_allclose(scores[row], expected, rtol=1e-6)
    # The OOV user has zero factors and bias: the mean plus each item bias.
    np.testing.assert_allclose(scores[2], 3.0 + np.array([0.3, -0.4, 0.2, 0.9]), rtol=1e-6)


def test_topn_scores_add_the_rating_model_s_chance_of_a_like():
    model = _model(num_users=3, num_items=4)
    model.set_weights(item_bias=[0.9, -1.2, 0.2, 0.4, 0.0])
    rng = np.random.default_rng(0)
    user_factors = tf.constant(rng.uniform(-0.1, 0.6, (4, 2)), tf.float32)
    item_factors = tf.constant(rng.uniform(-0.1, 0.6, (5, 2)), tf.float32)
    users = tf.constant([0, 2], tf.int64)
    plain = user_factors.numpy()[[0, 2]] @ item_factors.numpy()[:4].T
    np.testing.assert_allclose(
        ranking.topn_scores(user_factors, item_factors, users, 4).numpy(), plain, rtol=1e-6)
    like = ranking.LikeTerm(weight=0.5, cut=3.5, noise=0.9)
    rating = ranking.score_items(model, users, 4).numpy()
    liked = np.array([[0.5 * math.erfc(-(r - 3.5) / (0.9 * math.sqrt(2))) for r in row]
                      for row in rating])
    expected = np.log(np.maximum(plain, ranking.TOPN_SCORE_FLOOR)) + 0.5 * np.log(liked)
    got = ranking.topn_scores(user_factors, item_factors, users, 4, model, like).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # A movie the rating model expects the user to dislike (movie 1, bias -1.2)
    # drops below one it expects them to like (movie 0, bias 0.9), at the same
    # top-N score.
    twins = tf.concat([item_factors[:1], item_factors[:1], item_factors[2:]], axis=0)
    tied = ranking.topn_scores(user_factors, twins, users, 4).numpy()
    assert tied[0, 0] == tied[0, 1]
    liked_scores = ranking.topn_scores(user_factors, twins, users, 4, model, like).numpy()
    assert liked_scores[0, 1] < liked_scores[0, 0] - 0.5
    # Weight 0 is the top-N score alone.
    np.testing.assert_allclose(ranking.topn_scores(
        user_factors, item_factors, users, 4, model, ranking.LikeTerm(0.0, 3.5, 0.9)).numpy(),
        plain, rtol=1e-6)


def test_fallback_shrinks_the_bias_of_rarely_rated_movies():
    model = _model(num_users=1, num_items=3)
    # Movie 0: bias 1.0 from 1 rating; movie 1: 0.5 from 100; movie 2: 0 from 500.
    model.set_weights(item_bias=[1.0, 0.5, 0.0, 0.0])
    scores = ranking.fallback_scores(model, tf.constant([1, 100, 500]), 10.0).numpy()
    np.testing.assert_allclose(scores, [3.0 + 1.0 / 11, 3.0 + 0.5 * 100 / 110, 3.0],
                               rtol=1e-6)
    assert list(np.argsort(-scores)) == [1, 0, 2]  # unshrunk bias would put 0 first


def _catalog(num_users: int, movie_ids: list[str], train: list[tuple[int, int]]
             ) -> catalog_lib.Catalog:
    users, items = (np.array(column) for column in zip(*train))
    return catalog_lib.build_catalog(movie_ids, {}, num_users, users, items)


def test_evaluate_lists_on_a_hand_made_case(monkeypatch, caplog):
    monkeypatch.setattr(logs, 'PROGRESS_SECONDS', 0.0)  # a progress line every block
    caplog.set_level('INFO', logger='trainer.progress')
    # 2 users x 4 items. Model scores are item biases [0.1, 0.4, 0.3, 0.2] for
    # everyone (zero factors), so its order is 1, 2, 3, 0; popularity by train
    # count is item 0 (2 ratings), 3 (1), 2 (1), then 1.
    model = _model(num_users=2, num_items=4)
    model.set_weights(user_factors=tf.zeros_like(model.user_factors))
    model.set_weights(item_bias=[0.1, 0.4, 0.3, 0.2, 0.0])
    catalog = _catalog(2, ['a', 'b', 'c', 'd'], [(0, 0), (1, 0), (1, 3), (0, 2)])
    np.testing.assert_array_equal(catalog.item_counts, [2, 0, 1, 1])
    # Eval: user 0 liked 1 and disliked 3; user 1 liked 2; an OOV user (2)
    # and an OOV item (4) are ignored.
    eval_users = np.array([0, 0, 1, 2, 1])
    eval_items = np.array([1, 3, 2, 0, 4])
    eval_ratings = np.array([5.0, 2.0, 4.0, 5.0, 5.0])
    num_items = catalog.num_items
    popularity = tf.constant(catalog.item_counts, tf.float32)[None, :]
    record = ranking.evaluate_lists(
        {'model': lambda user: ranking.score_items(model, user, num_items),
         'most_popular': lambda user: tf.repeat(popularity, tf.shape(user)[0], axis=0)},
        catalog, eval_users, eval_items, eval_ratings, k=2)
    assert record['users'] == 2 and record['users_with_relevant'] == 2
    # Both rankers' lists counted toward the progress line's total.
    assert 'Ranking@2 on eval: user lists: 4 of 4 (100%)' in caplog.text
    # Model, unseen only: user 0 -> [1, 3] (hit at 1), user 1 -> [1, 2] (hit at 2).
    assert record['model'] == pytest.approx({
        'precision': 0.5, 'recall': 1.0, 'ndcg': (1 + 1 / LOG2_3) / 2,
        'coverage': 3 / 4})
    # Popularity, unseen only: user 0 -> [3, 1] (hit at 2), user 1 -> [2, 1] (hit at 1).
    assert record['most_popular'] == pytest.approx({
        'precision': 0.5, 'recall': 1.0, 'ndcg': (1 / LOG2_3 + 1) / 2,
        'coverage': 3 / 4})


def test_rank_users_in_blocks_equals_one_block(monkeypatch):
    model = _model(num_users=7, num_items=5)
    catalog = _catalog(7, list('abcde'), [(0, 1), (3, 4), (3, 0), (6, 2)])
    users = np.arange(7)

    def rank() -> np.ndarray:
        return ranking.rank_users(lambda user: ranking.score_items(model, user, 5),
                                  users, catalog.seen(), 5, k=3)

    whole = rank()
    monkeypatch.setattr(ranking, '_BLOCK_FLOATS', 10)  # 2 users per block
    np.testing.assert_array_equal(rank(), whole)
    assert 1 not in whole[0] and 4 not in whole[3] and 0 not in whole[3]


def test_one_order_ranking_equals_scoring_every_user():
    rng = np.random.default_rng(5)
    num_users, num_items = 30, 12
    # Ties (integer scores) and heavy users (one has seen all but 2) included.
    scores = rng.integers(0, 4, num_items).astype(np.float64)
    pairs = {(int(u), int(i)) for u, i in zip(rng.integers(0, num_users, 150),
                                              rng.integers(0, num_items, 150))}
    pairs |= {(7, i) for i in range(num_items - 2)}
    catalog = _catalog(num_users, [str(i) for i in range(num_items)], sorted(pairs))
    users = np.array([7, 0, 29, 30, 3, 3])  # 30 is the OOV user: nothing seen
    row = tf.constant(scores, tf.float32)[None, :]
    for k in (1, 5, 12):
        expected = ranking.rank_users(lambda user: tf.repeat(row, tf.shape(user)[0], axis=0),
                                      users, catalog.seen(), num_items, k)
        got = ranking.rank_users_by_one_order(scores, users, catalog.seen(), k)
        np.testing.assert_array_equal(got, expected)
    assert (got[0] == -1).sum() == num_items - 2  # user 7 has two unseen items


def test_a_user_sample_is_seeded_and_ranks_only_those_users():
    # 6 users, each liked one movie in eval; a sample of 3 is the same for a
    # seed and for every ranker, and rows of the other users are left out.
    model = _model(num_users=6, num_items=4)
    catalog = _catalog(6, ['a', 'b', 'c', 'd'], [(user, 0) for user in range(6)])
    eval_users = np.repeat(np.arange(6), 2)
    eval_items = np.tile([1, 2], 6)
    eval_ratings = np.tile([5.0, 1.0], 6)
    num_items = catalog.num_items

    def run(max_users, seed):
        return ranking.evaluate_lists(
            {'model': lambda user: ranking.score_items(model, user, num_items),
             'by_index': -np.arange(num_items, dtype=np.float64)},
            catalog, eval_users, eval_items, eval_ratings, k=1,
            max_users=max_users, seed=seed)

    everyone = run(0, 0)
    assert everyone['users'] == everyone['users_in_eval'] == 6
    sample = ranking.sample_users(eval_users, 3, seed=7)
    assert sample.size == 3 and np.all(np.diff(sample) > 0)
    np.testing.assert_array_equal(sample, ranking.sample_users(eval_users, 3, seed=7))
    assert ranking.sample_users(eval_users, 6, seed=7) is None
    sampled = run(3, 7)
    assert sampled['users'] == sampled['users_with_relevant'] == 3
    assert sampled['users_in_eval'] == 6
    # Ranking by index puts unseen movie 1 first for everyone: a hit each.
    assert sampled['by_index']['recall'] == 1.0
    assert 'a seeded sample of 3 of 6 eval users' in ranking.summary_line(
        {**sampled, 'most_popular': sampled['by_index']})
