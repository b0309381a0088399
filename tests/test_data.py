"""Tests of trainer/data.py: shard listing, batch parsing, seeded shuffles."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import tensorflow as tf

from trainer import data, features


def _example(user: int, item: int, rating: float) -> bytes:
    feature = {
        features.USER: tf.train.Feature(int64_list=tf.train.Int64List(value=[user])),
        features.ITEM: tf.train.Feature(int64_list=tf.train.Int64List(value=[item])),
        features.RATING: tf.train.Feature(float_list=tf.train.FloatList(value=[rating])),
        features.USER_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b'u%d' % user])),
        features.MOVIE_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b'm%d' % item])),
    }
    return tf.train.Example(
        features=tf.train.Features(feature=feature)).SerializeToString()


def _write_shard(path: str, rows: list[tuple[int, int, float]]) -> None:
    with tf.io.TFRecordWriter(path, options='GZIP') as writer:
        for row in rows:
            writer.write(_example(*row))


ROWS = [(user, item, float(1 + (user + item) % 5))
        for user in range(7) for item in range(5)]  # 35 ratings


@pytest.fixture
def pattern(work_dir: str) -> str:
    """ROWS in two shards, written in reverse name order."""
    prefix = features.split_prefix(work_dir, features.TRAIN)
    os.makedirs(os.path.dirname(prefix))
    _write_shard(f'{prefix}-00001-of-00002{features.TFRECORD_SUFFIX}', ROWS[20:])
    _write_shard(f'{prefix}-00000-of-00002{features.TFRECORD_SUFFIX}', ROWS[:20])
    return features.split_pattern(work_dir, features.TRAIN)


def _rows(dataset: tf.data.Dataset) -> list[tuple[int, int, float]]:
    rows = []
    for batch in dataset.as_numpy_iterator():
        rows += zip(batch[features.USER].tolist(), batch[features.ITEM].tolist(),
                    batch[features.RATING].tolist())
    return rows


def test_batches_parse_to_model_keys_with_their_dtypes(pattern):
    batches = list(data.make_dataset(pattern, batch_size=8))
    assert [len(batch[features.RATING]) for batch in batches] == [8, 8, 8, 8, 3]
    first = batches[0]
    assert set(first) == {features.USER, features.ITEM, features.RATING}
    assert first[features.USER].dtype == tf.int64
    assert first[features.ITEM].dtype == tf.int64
    assert first[features.RATING].dtype == tf.float32


def test_unshuffled_batches_follow_the_sorted_shards(pattern):
    assert _rows(data.make_dataset(pattern, batch_size=6)) == ROWS


def test_a_shuffled_epoch_sees_every_row_once(pattern):
    rows = _rows(data.make_dataset(pattern, batch_size=4, shuffle_seed=3,
                                   shuffle_buffer=100))
    assert Counter(rows) == Counter(ROWS)
    assert rows != ROWS


def test_shuffles_repeat_with_the_seed_and_change_with_it(pattern):
    records = data.read_records(pattern)

    def order(seed: int) -> list:
        return _rows(data.make_batches(records, 5, shuffle_seed=seed,
                                       shuffle_buffer=100))

    assert order(11) == order(11)
    assert order(11) != order(12)


def test_epoch_seeds_are_stable_and_distinct():
    seeds = [data.epoch_seed(0, epoch) for epoch in range(1, 6)]
    assert seeds == [data.epoch_seed(0, epoch) for epoch in range(1, 6)]
    assert len(set(seeds)) == 5
    assert data.epoch_seed(1, 1) not in seeds


def test_missing_shards_say_to_run_preprocess(work_dir):
    with pytest.raises(FileNotFoundError, match='run preprocess.py first'):
        data.read_records(features.split_pattern(work_dir, features.EVAL))


@pytest.mark.parametrize('kwargs', [
    {'batch_size': 0}, {'batch_size': 4, 'shuffle_seed': 1, 'shuffle_buffer': 0}])
def test_bad_sizes_are_refused(pattern, kwargs):
    with pytest.raises(ValueError, match='must be >= 1'):
        data.make_dataset(pattern, **kwargs)


def test_the_model_reads_a_subset_of_the_shared_spec():
    assert all(features.TRANSFORMED_FEATURE_SPEC[key] == spec
               for key, spec in data.MODEL_FEATURE_SPEC.items())
