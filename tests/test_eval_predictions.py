"""Tests of trainer/rating/eval_predictions.py: counts of clipped predictions per true rating."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from trainer import data, features
from trainer.rating import eval_predictions
from trainer.rating.model import MatrixFactorization


def test_counts_put_each_clipped_prediction_in_its_bin():
    model = MatrixFactorization(2, 3, num_factors=1, global_mean=3.0, init_stddev=0.0, seed=0)
    model.set_weights(item_bias=[-2.5, 0.25, 1.99, 0.0])  # predictions 0.5 -> 1, 3.25, 4.99
    ratings = data.Ratings(tf.constant([0, 1, 0, 1], tf.int32),
                           tf.constant([0, 1, 2, 2], tf.int32),
                           tf.constant([1.0, 3.0, 5.0, 4.0]))
    counts = eval_predictions.count_predictions(model, ratings, 1.0, 5.0, 1.0,
                                                bin_width=0.5, chunk_size=3)
    expected = np.zeros((5, 8), np.int64)
    expected[0, 0] = 1  # true 1, predicted 0.5 clipped to 1.0: bin [1, 1.5)
    expected[2, 4] = 1  # true 3, predicted 3.25: bin [3, 3.5)
    expected[4, 7] = 1  # true 5, predicted 4.99: the last bin, [4.5, 5]
    expected[3, 7] = 1  # true 4, predicted 4.99
    np.testing.assert_array_equal(counts, expected)
    text = eval_predictions.format_counts(counts, 1.0, 1.0, bin_width=0.5).splitlines()
    assert text[0] == ','.join(features.EVAL_PREDICTIONS_COLUMNS)
    assert len(text) == 1 + 5 * 8
    assert '5,4.5,5,1' in text and '1,1,1.5,1' in text


def test_half_star_scales_get_a_row_per_half_star():
    model = MatrixFactorization(1, 1, num_factors=1, global_mean=2.2, init_stddev=0.0, seed=0)
    ratings = data.Ratings(tf.constant([0], tf.int32), tf.constant([0], tf.int32),
                           tf.constant([2.5]))
    counts = eval_predictions.count_predictions(model, ratings, 0.5, 5.0, 0.5)
    assert counts.shape == (10, 45)
    assert counts[4, 17] == 1 and counts.sum() == 1  # true 2.5; 2.2 in [2.2, 2.3)
