"""The default generator ranks the top-N rivals as real MovieLens 100k does.

On real ml-100k (one 80/20 split, each rival tuned on a validation slice of
train, `bench/ranking.py`): graded EASE 0.386 > rating-weighted iALS 0.371 >
EASE 0/1 0.361 and iALS 0/1 0.349 > item kNN 0.339 > most popular 0.172, so
graded EASE is about 2.2x most popular.  A generator whose item-item structure
is too weak ranks them otherwise (before franchises: weighted iALS and graded
EASE tied at 1.1x most popular).  Here the default 100k data, split 80/20 by a
seeded draw, go through `bench/ranking.py`'s own rivals and its protocol
(refit on all of train, NDCG@10 on eval).  Each rival is fitted once, at the
point this split's validation slice chose from a small grid (EASE lambda in
{200, 800, 3200}; iALS (factors, regularisation) in {(32, 5), (128, 20)}): the
grid's other points cost two thirds of the test's time and moved no eval
figure.  BPR is left to `bench/ranking.py`: its 100 epochs cost more than the
rest together.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from conftest import load_script
from trainer import data
from trainer.pipeline import synthetic

bench = load_script('bench/ranking.py')

# Validation NDCG@10 of the grid (seed 0): EASE 0/1 0.1773 / 0.1604 / 0.1344,
# graded 0.2166 / 0.2155 / 0.1894; iALS 0/1 0.1538 / 0.1313, weighted 0.1860 / 0.2050.
EASE_01, EASE_GRADED = {'lam': 200.0}, {'lam': 200.0}
ALS_01, ALS_WEIGHTED = ({'factors': 32, 'regularization': 5.0},
                        {'factors': 128, 'regularization': 20.0})
SEED = 0


def _ratings(users: np.ndarray, items: np.ndarray, ratings: np.ndarray) -> data.Ratings:
    order = np.lexsort((items, users))
    return data.Ratings(tf.constant(users[order], tf.int32), tf.constant(items[order], tf.int32),
                        tf.constant(ratings[order], tf.float32))


@pytest.fixture(scope='module')
def scored(default_synthetic) -> dict[str, dict]:
    config, generated = synthetic.SyntheticConfig(), default_synthetic
    users, items = generated.user_ids - 1, generated.movie_ids - 1
    is_eval = np.random.default_rng(SEED).random(users.size) < 0.2
    train = _ratings(users[~is_eval], items[~is_eval], generated.ratings[~is_eval])

    def problem(ratings: data.Ratings, target: data.Ratings) -> bench.Problem:
        return bench.Problem(ratings.user.numpy().astype(np.int64),
                             ratings.item.numpy().astype(np.int64),
                             ratings.rating.numpy().astype(np.float64), target,
                             config.num_users, config.num_movies)
    evaluation = _ratings(users[is_eval], items[is_eval], generated.ratings[is_eval])
    final = problem(train, evaluation)
    rivals = [
        bench.Rival('most popular', ({},), lambda p, s: np.bincount(
            p.items, minlength=p.num_items).astype(np.float64)),
        bench.Rival('item kNN', ({'neighbours': 200},),
                    lambda p, s: bench.item_knn(p, s['neighbours'])),
        bench.Rival('EASE, 0/1', (EASE_01,), lambda p, s: bench.ease(p, None, s['lam'])),
        bench.Rival('EASE, graded', (EASE_GRADED,),
                    lambda p, s: bench.ease(p, bench.graded(p.ratings), s['lam'])),
        bench.Rival('iALS, 0/1', (ALS_01,), lambda p, s: bench.implicit_model(
            p, 'als', np.ones(p.ratings.size), SEED, **s)),
        bench.Rival('iALS, weighted', (ALS_WEIGHTED,), lambda p, s: bench.implicit_model(
            p, 'als', 1.0 + bench.graded(p.ratings), SEED, **s))]
    rows = {rival.name: final.ndcg_etc(rival.build(final, rival.grid[0]), 0, SEED)
            for rival in rivals}
    print({name: round(row['ndcg'], 4) for name, row in rows.items()})
    return rows


def test_rivals_fall_in_real_movielens_order(scored: dict[str, dict]) -> None:
    ndcg = {name: row['ndcg'] for name, row in scored.items()}
    # Measured (seed 0): graded EASE 0.4017, weighted iALS 0.3754, EASE 0/1
    # 0.3371, iALS 0/1 0.3016, item kNN 0.3010, most popular 0.1749 (2.30x).
    # iALS 0/1 ties item kNN here, where real data put it by EASE 0/1.
    assert ndcg['EASE, graded'] > ndcg['iALS, weighted'] > ndcg['EASE, 0/1']
    assert ndcg['EASE, 0/1'] > ndcg['item kNN'] > ndcg['most popular']
    assert ndcg['iALS, 0/1'] > 1.5 * ndcg['most popular']
    # About 2.2x most popular, as on real ml-100k (0.386 / 0.172 = 2.24).
    assert 1.9 < ndcg['EASE, graded'] / ndcg['most popular'] < 2.8
    # The grades carry what exposure alone does not, for both model families.
    assert ndcg['EASE, graded'] > 1.05 * ndcg['EASE, 0/1']
    assert ndcg['iALS, weighted'] > 1.05 * ndcg['iALS, 0/1']
