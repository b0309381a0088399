"""Tests of the column-wise tf.Example encoder and the threaded gzip writer of the pipeline.

The encoder (trainer/pipeline/examples.py `encode_examples`) replaced tfx_bsl's
per-example encoder: every record must parse to the Example tfx_bsl writes, on
edge values and on a real run of preprocess.py.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf
from tfx_bsl.coders import example_coder

import preprocess
from trainer import features
from trainer.pipeline import blockio, examples
from test_preprocess import _ratings, _stage  # pylint: disable=wrong-import-order


def _list_column(values: pa.Array) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(np.arange(len(values) + 1, dtype=np.int32)), values)


def _parsed(records) -> list[tf.train.Example]:
    return [tf.train.Example.FromString(record) for record in records]


def _edge_batch() -> pa.RecordBatch:
    """Values at the edges of each varint size, floats of every kind, odd bytes."""
    rng = np.random.default_rng(0)
    small = np.array([0, 1, 127, 128, 16383, 16384, 2_097_151, 2_097_152, 5, 3])
    wide = np.array([-1, -(1 << 63), (1 << 63) - 1, 1 << 35, 0, 300, -128, 7, 1 << 21, 2])
    floats = np.array([0.0, -0.0, 0.5, 5.0, np.inf, -np.inf, 1e-40, 3.5, np.nan, -1.25],
                      dtype=np.float32)
    ids = [b'', b'1', b'x' * 127, b'y' * 128, b'\xff\xfe\x00', b'42', b'z' * 300, b'\n',
           '\u00e9'.encode(), b'0']
    return pa.RecordBatch.from_arrays(
        [_list_column(pa.array(small, pa.int64())), _list_column(pa.array(wide, pa.int64())),
         _list_column(pa.array(floats, pa.float32())), _list_column(pa.array(ids, pa.binary())),
         _list_column(pa.array(rng.permutation(ids), pa.large_binary()))],
        [features.USER, features.ITEM, features.RATING, features.USER_ID, features.MOVIE_ID])


def test_encode_examples_parses_as_tfx_bsl_encodes():
    batch = _edge_batch()
    encoded = examples.encode_examples(batch)
    assert isinstance(encoded, pa.LargeBinaryArray) and len(encoded) == batch.num_rows
    # NaN != NaN in proto comparisons: compare the float bits instead.
    mine, theirs = _parsed(encoded.to_pylist()), _parsed(example_coder.RecordBatchToExamples(batch))
    for row, (got, want) in enumerate(zip(mine, theirs)):
        assert got.features.feature.keys() == want.features.feature.keys(), row
        for name in want.features.feature:
            got_value, want_value = got.features.feature[name], want.features.feature[name]
            if got_value.HasField('float_list'):
                assert (np.array(got_value.float_list.value, np.float32).tobytes()
                        == np.array(want_value.float_list.value, np.float32).tobytes()), name
            else:
                assert got_value == want_value, (row, name)


def test_encode_examples_of_a_slice_encodes_only_its_rows():
    batch = _edge_batch()
    part = batch.slice(3, 4)
    assert (_parsed(examples.encode_examples(part).to_pylist())
            == _parsed(example_coder.RecordBatchToExamples(part)))


@pytest.mark.parametrize('column', [
    pa.array([[1, 2], [3], []], pa.list_(pa.int64())),        # not one value a row
    pa.array([[1], None, [3]], pa.list_(pa.int64())),         # a null row
    pa.array([[b'a', b'b'], [b'c'], [b'd']], pa.large_list(pa.binary())),
    pa.array([[b'a'], [None], [b'c']], pa.list_(pa.binary())),  # a null value
])
def test_encode_examples_leaves_other_shapes_to_tfx_bsl(column):
    batch = pa.RecordBatch.from_arrays(
        [column, _list_column(pa.array([1, 2, 3], pa.int64()))], ['odd', 'plain'])
    assert (_parsed(examples.encode_examples(batch).to_pylist())
            == _parsed(example_coder.RecordBatchToExamples(batch)))


def test_encode_examples_of_no_rows_is_empty():
    assert len(examples.encode_examples(_edge_batch().slice(0, 0))) == 0


def test_frame_tfrecords_frames_an_arrow_array_as_its_bytes():
    records = [b'', b'a', b'bc' * 100, b'\x00\xff']
    array = pa.array([b'zz'] + records, pa.large_binary()).slice(1)
    assert blockio.frame_tfrecords(array) == blockio.frame_tfrecords(records)
    assert blockio.frame_tfrecords(pa.array([], pa.large_binary())) == b''


class _FailingHandle:
    def __init__(self):
        self.closed = False

    def write(self, data):
        raise OSError('disk full')

    def close(self):
        self.closed = True


def test_gzip_writer_raises_what_its_thread_hit():
    writer = blockio._GzipWriter(_FailingHandle(), 1)  # pylint: disable=protected-access
    writer.write(os.urandom(1 << 16))
    with pytest.raises(OSError, match='disk full'):
        writer.write(b'more')
        writer.close()


def _records(work_dir: str) -> list[bytes]:
    files = sorted(glob.glob(features.split_pattern(work_dir, features.TRAIN))
                   + glob.glob(features.split_pattern(work_dir, features.EVAL)))
    return [record.numpy() for record in tf.data.TFRecordDataset(files, compression_type='GZIP')]


def test_main_writes_the_examples_tfx_bsl_wrote(tmp_path, monkeypatch):
    """The same run with tfx_bsl's encoder and with ours: the same Examples."""
    lines = _ratings(n_users=30, n_movies=25, seed=4)
    ours, theirs = str(tmp_path / 'ours'), str(tmp_path / 'theirs')
    for work_dir in (ours, theirs):
        _stage(work_dir, lines)
    assert preprocess.main(['--work-dir', ours, '--seed', '5']) == 0
    monkeypatch.setattr(examples, 'encode_examples', lambda batch: pa.array(
        example_coder.RecordBatchToExamples(batch), pa.large_binary()))
    assert preprocess.main(['--work-dir', theirs, '--seed', '5']) == 0

    def key(example):
        return example.SerializeToString(deterministic=True)
    got, want = _parsed(_records(ours)), _parsed(_records(theirs))
    assert len(got) == len(lines)
    assert sorted(map(key, got)) == sorted(map(key, want))
