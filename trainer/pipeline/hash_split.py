"""The train/eval split: a keyed 64-bit hash of (seed, user, movie) per rating.

Owns the hash (`pair_hash`: SplitMix64's finaliser over the pair and a key,
vectorised with numpy), the split it decides (`assign_split`: eval when the
pair's bucket in [0, 10000) falls below the eval share) and `SplitRatings`,
the Beam step that cuts parsed RecordBatches into the train and eval
RecordBatches TFT reads and sums each split's ratings.  The hash depends on
nothing but its arguments, so the same input gives the same split on every
run, worker and retry; the duplicate check (trainer/pipeline/deduplication.py) buckets
pairs with it under a key of its own.  This module lives in `trainer` so that
Dataflow workers, which install the package, can import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa

from trainer import features
from trainer.pipeline.examples import make_raw_record_batch
from trainer.pipeline.rating_reader import ParseRatings

_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection on uint64 that scatters every bit."""
    values = values ^ (values >> np.uint64(30))
    values = values * _MIX_1
    values = values ^ (values >> np.uint64(27))
    values = values * _MIX_2
    return values ^ (values >> np.uint64(31))


def pair_hash(users: np.ndarray, movies: np.ndarray, key: int) -> np.ndarray:
    """A keyed 64-bit hash of each (user, movie) pair, vectorised."""
    with np.errstate(over='ignore'):
        mixed_key = _mix64(np.uint64(key) * _GOLDEN + _GOLDEN)
        return _mix64(_mix64(users.astype(np.uint64) ^ mixed_key) + movies.astype(np.uint64))


def split_buckets(users: np.ndarray, movies: np.ndarray, seed: int) -> np.ndarray:
    """A per-rating bucket in [0, 10000) from a keyed hash of (seed, user, movie).

    The hash depends on nothing but its arguments, so a rating lands in the same
    split on every run, worker and retry (unlike `random` in `beam.Partition`).
    """
    return (pair_hash(users, movies, seed) % np.uint64(10000)).astype(np.int64)


def assign_split(users: np.ndarray, movies: np.ndarray, seed: int,
                 eval_percent: float) -> np.ndarray:
    """True where a rating goes to the eval split."""
    return split_buckets(users, movies, seed) < round(eval_percent * 100)


class SplitRatings(beam.PTransform):
    """Parsed RecordBatches -> train and eval RecordBatches (RAW_FEATURE_SPEC
    shape, see `make_raw_record_batch`), plus per-split sums."""

    def __init__(self, seed: int, eval_percent: float):
        super().__init__()
        self._seed = seed
        self._eval_percent = eval_percent

    def expand(self, batches):
        return batches | 'AssignSplit' >> beam.ParDo(
            _SplitBatchFn(self._seed, self._eval_percent)).with_outputs(
                features.EVAL, ParseRatings.STATS, main=features.TRAIN)


class _SplitBatchFn(beam.DoFn):
    def __init__(self, seed: int, eval_percent: float):
        super().__init__()
        self._seed = seed
        self._eval_percent = eval_percent

    def process(self, batch: pa.RecordBatch) -> Iterator[Any]:
        users = batch.column(features.USER_ID).to_numpy()
        movies = batch.column(features.MOVIE_ID).to_numpy()
        ratings = batch.column(features.RATING).to_numpy()
        timestamps = batch.column(features.TIMESTAMP).to_numpy()
        is_eval = assign_split(users, movies, self._seed, self._eval_percent)
        eval_ratings = ratings[is_eval]
        yield beam.pvalue.TaggedOutput(ParseRatings.STATS, {
            'train_ratings': int((~is_eval).sum()),
            'eval_ratings': int(is_eval.sum()),
            'train_rating_sum': float(ratings[~is_eval].sum()),
            'eval_rating_sum': float(eval_ratings.sum()),
            'eval_rating_square_sum': float(np.square(eval_ratings).sum()),
        })
        for tag, rows in ((None, ~is_eval), (features.EVAL, is_eval)):
            if rows.any():
                raw = make_raw_record_batch(users[rows], movies[rows], ratings[rows],
                                            timestamps[rows])
                yield raw if tag is None else beam.pvalue.TaggedOutput(tag, raw)
