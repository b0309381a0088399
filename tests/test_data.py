"""Tests of trainer/data.py: shard listing, batch parsing, seeded shuffles."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
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


def test_load_ratings_puts_rows_in_one_order_whatever_the_shards(work_dir):
    prefix = features.split_prefix(work_dir, features.TRAIN)
    os.makedirs(os.path.dirname(prefix))
    shuffled = [ROWS[i] for i in np.random.default_rng(0).permutation(len(ROWS))]
    _write_shard(f'{prefix}-00000-of-00003{features.TFRECORD_SUFFIX}', shuffled[:9])
    _write_shard(f'{prefix}-00001-of-00003{features.TFRECORD_SUFFIX}', shuffled[9:30])
    _write_shard(f'{prefix}-00002-of-00003{features.TFRECORD_SUFFIX}', shuffled[30:])
    ratings = data.load_ratings(features.split_pattern(work_dir, features.TRAIN))
    assert _triples(ratings) == sorted(ROWS)


def test_load_ratings_reads_every_row_sorted_by_user_and_item(pattern):
    ratings = data.load_ratings(pattern)
    assert len(ratings) == len(ROWS)
    assert ratings.user.dtype == tf.int32 and ratings.rating.dtype == tf.float32
    assert list(zip(ratings.user.numpy().tolist(), ratings.item.numpy().tolist(),
                    ratings.rating.numpy().tolist())) == ROWS


def _triples(ratings: data.Ratings) -> list[tuple[int, int, float]]:
    return list(zip(ratings.user.numpy().tolist(), ratings.item.numpy().tolist(),
                    ratings.rating.numpy().tolist()))


def test_a_shuffle_is_a_seeded_permutation(pattern):
    ratings = data.load_ratings(pattern)
    first = _triples(data.shuffle(ratings, 11))
    assert Counter(first) == Counter(ROWS) and first != ROWS
    assert _triples(data.shuffle(ratings, 11)) == first
    assert _triples(data.shuffle(ratings, 12)) != first


def test_the_validation_slice_is_seeded_disjoint_and_in_file_order(pattern):
    ratings = data.load_ratings(pattern)
    fit, validation = data.split_validation(ratings, 20.0, seed=42)
    assert (len(fit), len(validation)) == (28, 7)
    assert Counter(_triples(fit) + _triples(validation)) == Counter(ROWS)
    assert _triples(fit) == [row for row in ROWS if row in set(_triples(fit))]
    again = data.split_validation(ratings, 20.0, seed=42)[1]
    other = data.split_validation(ratings, 20.0, seed=43)[1]
    assert _triples(again) == _triples(validation) != _triples(other)
    fit, validation = data.split_validation(ratings, 0.0, seed=42)
    assert (len(fit), len(validation)) == (35, 0)
    with pytest.raises(ValueError, match='validation percent'):
        data.split_validation(ratings, 100.0, seed=42)


def test_frequency_weights_are_n_to_the_minus_alpha_with_mean_one():
    ratings = data.Ratings(tf.constant([0, 0, 0, 1], tf.int32),
                           tf.constant([0, 1, 1, 1], tf.int32),
                           tf.constant([1.0, 2.0, 3.0, 4.0]))
    user, item = data.frequency_weights(ratings, user_rows=3, item_rows=2, exponent=1.0)
    # counts: users 3, 1, 0 -> raw 1/3, 1, 1 (empty rows count as 1); mean over
    # the four ratings (3 * 1/3 + 1) / 4 = 0.5.
    np.testing.assert_allclose(user.numpy(), [2 / 3, 2.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(item.numpy(), [2.0, 2 / 3], rtol=1e-6)
    ones = data.frequency_weights(ratings, 3, 2, exponent=0.0)
    np.testing.assert_allclose(ones[0].numpy(), 1.0)


def test_epoch_seeds_are_stable_and_distinct():
    seeds = [data.epoch_seed(0, epoch) for epoch in range(1, 6)]
    assert seeds == [data.epoch_seed(0, epoch) for epoch in range(1, 6)]
    assert len(set(seeds)) == 5
    assert data.epoch_seed(1, 1) not in seeds


def test_missing_shards_say_to_run_preprocess(work_dir):
    with pytest.raises(FileNotFoundError, match='run preprocess.py first'):
        data.load_ratings(features.split_pattern(work_dir, features.EVAL))


def test_the_model_reads_indices_and_rating_from_a_preprocessed_example():
    # An example as preprocess.py writes it: indices, rating and the raw ids.
    example = tf.train.Example(features=tf.train.Features(feature={
        features.USER: tf.train.Feature(int64_list=tf.train.Int64List(value=[7])),
        features.ITEM: tf.train.Feature(int64_list=tf.train.Int64List(value=[3])),
        features.RATING: tf.train.Feature(float_list=tf.train.FloatList(value=[4.5])),
        features.USER_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b'196'])),
        features.MOVIE_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b'242'])),
    })).SerializeToString()

    parsed = data.parse_batch(tf.constant([example, example]))

    # The raw ids stay out of training; the rest is read with the shared spec's types.
    assert set(parsed) == {features.USER, features.ITEM, features.RATING}
    assert parsed[features.USER].dtype == tf.int64 and parsed[features.RATING].dtype == tf.float32
    np.testing.assert_array_equal(parsed[features.USER].numpy(), [7, 7])
    np.testing.assert_array_equal(parsed[features.ITEM].numpy(), [3, 3])
    np.testing.assert_allclose(parsed[features.RATING].numpy(), [4.5, 4.5])
    for key, spec in data.MODEL_FEATURE_SPEC.items():
        assert spec.dtype == features.TRANSFORMED_FEATURE_SPEC[key].dtype


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7f, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _unpacked_example(user: int, item: int, rating: float) -> bytes:
    """An Example whose lists are not packed (as older writers emit them)."""
    def entry(key: str, feature: bytes) -> bytes:
        return _field(1, _field(1, key.encode()) + _field(2, feature))
    int64 = lambda value: _field(3, _varint(1 << 3 | 0) + _varint(value))  # noqa: E731
    rating_list = _field(2, _varint(1 << 3 | 5) + np.float32(rating).tobytes())
    return _field(1, entry('movie_id', _field(1, _field(1, b'm1'))) + entry('user', int64(user))
                  + entry('item', int64(item)) + entry('rating', rating_list))


def test_the_shard_reader_matches_tf_data_and_reads_unpacked_lists(pattern, monkeypatch):
    ops = data.kernels.load()
    with_op = data.load_ratings(pattern)
    monkeypatch.setattr(data.kernels, 'load', _unavailable)
    with_tf_data = data.load_ratings(pattern)
    assert _triples(with_op) == _triples(with_tf_data) == ROWS
    parsed = tf.io.parse_single_example(_unpacked_example(3, 2, 4.5), data.MODEL_FEATURE_SPEC)
    assert [int(parsed['user']), int(parsed['item']), float(parsed['rating'])] == [3, 2, 4.5]
    path = os.path.join(os.path.dirname(pattern), 'unpacked.tfrecord.gz')
    with tf.io.TFRecordWriter(path, options='GZIP') as writer:
        writer.write(_unpacked_example(3, 2, 4.5))
        writer.write(_example(1, 70000, 0.5))
    user, item, rating = ops.read_rating_shard(path)
    assert (user.numpy().tolist(), item.numpy().tolist(), rating.numpy().tolist()) == (
        [3, 1], [2, 70000], [4.5, 0.5])


def _unavailable():
    raise data.kernels.KernelUnavailable('no C++ compiler')


@pytest.mark.parametrize('record, problem', [
    (tf.train.Example().SerializeToString(), 'empty Example'),
    (b'\x0a\x05garbage', 'not a protobuf'),
    (tf.train.Example(features=tf.train.Features(feature={
        features.USER: tf.train.Feature(int64_list=tf.train.Int64List(value=[1, 2])),
        features.ITEM: tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
        features.RATING: tf.train.Feature(float_list=tf.train.FloatList(value=[3.0])),
    })).SerializeToString(), 'two users'),
    (tf.train.Example(features=tf.train.Features(feature={
        features.USER: tf.train.Feature(float_list=tf.train.FloatList(value=[1.0])),
        features.ITEM: tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
        features.RATING: tf.train.Feature(float_list=tf.train.FloatList(value=[3.0])),
    })).SerializeToString(), 'a float user'),
    (_example(2**31, 1, 3.0), 'beyond int32'),
])
def test_the_shard_reader_names_a_bad_record(work_dir, record, problem):
    path = os.path.join(work_dir, 'bad.tfrecord.gz')
    with tf.io.TFRecordWriter(path, options='GZIP') as writer:
        writer.write(_example(0, 0, 1.0))
        writer.write(record)
    with pytest.raises(tf.errors.InvalidArgumentError, match=f'{path}: record 1 '):
        data.kernels.load().read_rating_shard(path)
