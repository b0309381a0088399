"""Tests of trainer/pipeline/blockio.py: block reads agree with ReadFromText, block writes with TensorFlow."""

from __future__ import annotations

import glob
import io
import os
import random

import apache_beam as beam
import pytest
import tensorflow as tf
from apache_beam import coders
from apache_beam.io import textio, tfrecordio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from trainer.pipeline import blockio

RUNNER = 'FnApiRunner'


def _beam_lines(path: str, header_lines: int) -> list[bytes]:
    """What ReadFromText reads from a file, as bytes."""
    source = textio._TextSource(  # pylint: disable=protected-access
        path, 0, CompressionTypes.UNCOMPRESSED, True, coders.BytesCoder(),
        skip_header_lines=header_lines)
    return list(source.read(source.get_range_tracker(None, None)))


def _block_lines(path: str, header_lines: int, block_bytes: int) -> list[bytes]:
    """What ReadLineBlocks reads, ranges of `block_bytes` read one after another."""
    size = os.path.getsize(path)
    ranges = blockio.plan_ranges(blockio.skip_lines(path, header_lines), size,
                                 target_blocks=size + 1, min_block_bytes=block_bytes,
                                 max_block_bytes=block_bytes)
    lines = []
    with open(path, 'rb') as f:
        for start, end in ranges:
            data, at_eof = blockio.read_range(f, start, end)
            lines += blockio.split_lines(data, at_eof).to_pylist()
    return lines


@pytest.mark.parametrize('seed', range(4))
def test_block_reads_match_read_from_text_on_random_bytes(tmp_path, seed):
    """Every line once, whatever the ranges: LF, CRLF, bare CR, blank lines, no final newline."""
    rng = random.Random(seed)
    pieces = [b'1', b'a', b',', b' ', b'\n', b'\r', b'\r\n', b'\xe9', b'12,3,4.5,6\n']
    path = str(tmp_path / 'lines.txt')
    for _ in range(300):
        data = b''.join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        with open(path, 'wb') as f:
            f.write(data)
        header_lines = rng.randint(0, 1)
        block_bytes = rng.randint(1, 16)
        assert _block_lines(path, header_lines, block_bytes) == _beam_lines(path, header_lines), (
            data, header_lines, block_bytes)


def test_plan_ranges_cover_the_file_in_blocks_sized_from_it():
    ranges = blockio.plan_ranges(10, 1000, target_blocks=4, min_block_bytes=1,
                                 max_block_bytes=1000)
    assert ranges == [(10, 258), (258, 506), (506, 754), (754, 1000)]
    assert blockio.plan_ranges(0, 100, min_block_bytes=64) == [(0, 64), (64, 100)]
    assert blockio.plan_ranges(5, 5) == []


def test_read_line_blocks_in_a_pipeline_skips_the_header(tmp_path):
    path = str(tmp_path / 'ratings.csv')
    lines = [b'userId,movieId'] + [f'{i},{i * 7}'.encode() for i in range(5000)]
    with open(path, 'wb') as f:
        f.write(b'\r\n'.join(lines))
    with BeamTestPipeline(runner=RUNNER) as p:
        read = (p | blockio.ReadLineBlocks(path, header_lines=1, max_block_bytes=4096)
                | beam.FlatMap(lambda block: block.to_pylist()))
        assert_that(read, equal_to(lines[1:]))


def test_frame_tfrecords_writes_what_tensorflow_writes():
    rng = random.Random(0)
    records = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))) for _ in range(500)]
    expected = io.BytesIO()
    for record in records:
        tfrecordio._TFRecordUtil.write_record(expected, record)  # pylint: disable=protected-access
    assert blockio.frame_tfrecords(records) == expected.getvalue()
    assert blockio.frame_tfrecords([]) == b''


def test_write_tfrecord_blocks_writes_complete_gzipped_shards(tmp_path):
    blocks = [[f'{block}-{i}'.encode() for i in range(100 * block)] for block in range(1, 6)]
    prefix = str(tmp_path / 'out' / 'train')
    with BeamTestPipeline(runner=RUNNER) as p:
        _ = p | beam.Create(blocks) | blockio.WriteTFRecordBlocks(
            prefix, file_name_suffix='.tfrecord.gz', num_shards=2)
    files = sorted(glob.glob(prefix + '-*'))
    assert [os.path.basename(f) for f in files] == [
        'train-00000-of-00002.tfrecord.gz', 'train-00001-of-00002.tfrecord.gz']
    read = [record.numpy() for record in tf.data.TFRecordDataset(files, compression_type='GZIP')]
    assert sorted(read) == sorted(record for block in blocks for record in block)
