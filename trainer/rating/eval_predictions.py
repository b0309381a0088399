"""How the model's eval predictions spread for each true rating: a small count table.

Owns MODEL_DIR/eval_predictions.csv (`features.EVAL_PREDICTIONS_FILE`), which
plot.py draws.  Each row counts the eval ratings with one true rating whose
prediction, clipped to the scale as served, fell in [predicted_low,
predicted_high); the last bin also holds the scale's maximum.  Bins are
BIN_WIDTH stars wide, so the file has (ratings on the scale) x (bins) rows
(200 on ml-100k's 1-5 whole stars) however large the eval split: a plot
of 5M eval ratings needs no 5M-row file.  Counting is one
`tf.math.bincount` per batch inside `Dataset.reduce`.
"""

from __future__ import annotations

import csv
import io
import logging

import numpy as np
import tensorflow as tf

from trainer import data
from trainer import features
from trainer import fileio
from trainer.rating.model import MatrixFactorization

logger = logging.getLogger(__name__)

BIN_WIDTH = 0.1


def count_predictions(model: MatrixFactorization, ratings: data.Ratings,
                      rating_min: float, rating_max: float, rating_step: float,
                      bin_width: float = BIN_WIDTH,
                      chunk_size: int = 65536) -> np.ndarray:
    """Counts of (true rating, clipped prediction bin) over ratings in memory.

    Args:
      model: the trained model.
      ratings: the split to count (`data.load_ratings`; the trainer's copy).
      chunk_size: ratings predicted at a time.
      rating_min, rating_max, rating_step: the rating scale.
      bin_width: width of a prediction bin, in stars.

    Returns:
      int64 [ratings on the scale, bins]; row t is rating_min + t * step,
      column b predictions in [rating_min + b * width, ... + width).
    """
    num_ratings = int(round((rating_max - rating_min) / rating_step)) + 1
    num_bins = int(round((rating_max - rating_min) / bin_width))

    cells = num_ratings * num_bins

    @tf.function
    def count(user: tf.Tensor, item: tf.Tensor, rating: tf.Tensor) -> tf.Tensor:
        size = tf.size(rating)
        totals = tf.zeros([cells], tf.int64)
        for start in tf.range(0, size, chunk_size):
            end = tf.minimum(start + chunk_size, size)
            prediction = tf.clip_by_value(
                model(user[start:end], item[start:end]), rating_min, rating_max)
            true_row = tf.cast(tf.round((rating[start:end] - rating_min) / rating_step),
                               tf.int32)
            true_row = tf.clip_by_value(true_row, 0, num_ratings - 1)
            column = tf.cast(tf.floor((prediction - rating_min) / bin_width), tf.int32)
            column = tf.clip_by_value(column, 0, num_bins - 1)
            totals += tf.math.bincount(true_row * num_bins + column, minlength=cells,
                                       maxlength=cells, dtype=tf.int64)
        return totals

    totals = count(ratings.user, ratings.item, ratings.rating)
    return totals.numpy().reshape(num_ratings, num_bins)


def format_counts(counts: np.ndarray, rating_min: float, rating_step: float,
                  bin_width: float = BIN_WIDTH) -> str:
    """The CSV text (features.EVAL_PREDICTIONS_COLUMNS) of a count table."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator='\n')
    writer.writerow(features.EVAL_PREDICTIONS_COLUMNS)
    for (true_row, column), count in np.ndenumerate(counts):
        low = rating_min + column * bin_width
        writer.writerow([f'{rating_min + true_row * rating_step:g}', f'{low:.6g}',
                         f'{low + bin_width:.6g}', int(count)])
    return text.getvalue()


def write_eval_predictions(model: MatrixFactorization, info: features.DatasetInfo,
                           model_dir: str, eval_split: data.Ratings,
                           batch_size: int) -> str:
    """Writes MODEL_DIR/eval_predictions.csv (via a temp file); returns its path."""
    layout = features.DATASETS[info.layout]
    counts = count_predictions(model, eval_split, info.rating_min, info.rating_max,
                               layout.rating_step, chunk_size=batch_size)
    path = features.join(model_dir, features.EVAL_PREDICTIONS_FILE)
    fileio.write_text(path, format_counts(counts, info.rating_min, layout.rating_step))
    logger.info('Wrote %d eval prediction counts to %s', int(counts.sum()), path)
    return path
