"""Quality regression: the trainer's defaults come close to a planted noise floor.

The data are synthetic with a known answer (trainer/synthetic.py): biases and
rank-3 factors plus Gaussian noise, rounded to the rating scale.  The noise
floor is the RMSE of the noiseless planted value; no model can beat it by
more than rounding allows.  How close a fitted model can come depends on the
ratings per parameter: estimating b_u and p_u (and b_i, q_i) from n noisy
ratings leaves about sigma^2 * (rank + 1) / n of excess squared error, which
on ml-100k-shaped data (943 users, 1,682 movies, 80k train ratings) is about
6% of RMSE even for an exact-rank model.  So this test uses denser data
(500 users, 400 movies, 100k ratings: about 2% for an exact-rank model) where
"within 5% of the floor" separates a good fit from a poor one, with room to
spare for float noise.  The benchmark (bench/quality.py) holds the tighter
comparisons.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from trainer import config, features, synthetic, train

DENSE = synthetic.SyntheticConfig(num_users=500, num_movies=400, num_ratings=100_000,
                                  seed=11, user_activity_sigma=0.3,
                                  movie_popularity_sigma=0.3)


def _write_split(path: str, users: np.ndarray, items: np.ndarray,
                 ratings: np.ndarray) -> None:
    with tf.io.TFRecordWriter(path, options='GZIP') as writer:
        for user, item, rating in zip(users.tolist(), items.tolist(), ratings.tolist()):
            writer.write(tf.train.Example(features=tf.train.Features(feature={
                features.USER: tf.train.Feature(int64_list=tf.train.Int64List(value=[user])),
                features.ITEM: tf.train.Feature(int64_list=tf.train.Int64List(value=[item])),
                features.RATING: tf.train.Feature(
                    float_list=tf.train.FloatList(value=[rating]))})).SerializeToString())


@pytest.fixture(scope='module')
def dense(tmp_path_factory) -> tuple[features.DatasetInfo, float]:
    """DENSE as transformed TFRecords (80/20 split by a seeded draw) and its floor."""
    work_dir = str(tmp_path_factory.mktemp('dense'))
    data = synthetic.generate(DENSE)
    is_eval = np.random.default_rng(3).random(data.ratings.size) < 0.2
    users, items = data.user_ids - 1, data.movie_ids - 1
    os.makedirs(features.transformed_dir(work_dir))
    for split, mask in ((features.TRAIN, ~is_eval), (features.EVAL, is_eval)):
        _write_split(features.split_prefix(work_dir, split) + '-00000-of-00001'
                     + features.TFRECORD_SUFFIX, users[mask], items[mask],
                     data.ratings[mask])
    train_mean = float(data.ratings[~is_eval].mean())
    eval_ratings = data.ratings[is_eval].astype(np.float64)
    info = features.DatasetInfo(
        dataset='synthetic', layout=DENSE.layout, seed=0, eval_percent=20.0,
        rows_read=data.ratings.size, rows_accepted=data.ratings.size, rows_rejected=0,
        rejected_by_reason={}, train_ratings=int((~is_eval).sum()),
        eval_ratings=int(is_eval.sum()), users=DENSE.num_users, movies=DENSE.num_movies,
        train_mean_rating=train_mean,
        global_mean_eval_rmse=float(np.sqrt(np.mean((eval_ratings - train_mean) ** 2))),
        rating_min=1.0, rating_max=5.0,
        train_pattern=features.split_pattern(work_dir, features.TRAIN),
        eval_pattern=features.split_pattern(work_dir, features.EVAL))
    oracle = data.oracle[is_eval].astype(np.float64)
    floor = float(np.sqrt(np.mean((oracle - eval_ratings) ** 2)))
    return info, floor


def test_the_default_trainer_gets_within_5_percent_of_the_noise_floor(dense, tmp_path):
    info, floor = dense
    defaults = config.make_config(work_dir='unused', model_dir=str(tmp_path / 'model'))
    result = train.train(defaults, info, DENSE.num_users, DENSE.num_movies)
    print(f"eval RMSE {result.final.eval_rmse:.4f}, floor {floor:.4f}, "
          f"{result.final.eval_rmse / floor:.3f}x")
    assert result.final.eval_rmse <= 1.05 * floor, (result.final.eval_rmse, floor)
    # And far from the global mean: the factors, not the biases alone, did it.
    assert result.final.eval_rmse < 0.85 * info.global_mean_eval_rmse
    # The posterior mean (on by default) improved on the trained model it started from.
    assert result.posterior is not None
    assert result.final.eval_rmse < result.posterior['before']['eval_rmse'] - 0.002


def test_the_posterior_mean_pays_on_held_out_ratings_it_never_saw(dense, tmp_path):
    """With --final-model best the validation slice stays out of every fit:
    the posterior mean must beat the trained model there too, not only on eval."""
    info, _ = dense
    best = config.make_config(work_dir='unused', model_dir=str(tmp_path / 'model'),
                              final_model='best', posterior_samples=40)
    result = train.train(best, info, DENSE.num_users, DENSE.num_movies)
    before = result.posterior['before']
    assert result.final.validation_rmse < before['validation_rmse'] - 0.002, (
        result.final.validation_rmse, before['validation_rmse'])
    assert result.final.eval_rmse < before['eval_rmse']
