"""Beam file IO in blocks: text files read as blocks of lines, TFRecords written in blocks.

Beam's ReadFromText and WriteToTFRecord move one element per line or record;
on the in-process runner that per-element cost outweighs the work done on each
rating.  These transforms move one element per block of lines or records:

- `ReadLineBlocks` splits a file into byte ranges sized from its length, and
  emits each range's lines as one Arrow array.  A range owns the lines that
  start inside it (it skips a partial first line unless it starts the file,
  and reads past its end to finish its last line), so every line is read once
  whatever the ranges.  Lines end at '\\n'; a '\\r' just before it is dropped,
  as ReadFromText does.
- `WriteTFRecordBlocks` writes elements that each hold many serialized
  records, framed as TFRecords in one go (`frame_tfrecords`), through Beam's
  FileBasedSink (temp files, then -SSSSS-of-NNNNN names on finalize), gzipped
  at a level chosen for speed.

Both go through `apache_beam.io.filesystems.FileSystems`, so paths may be
local or gs://, on the in-process runner or on Dataflow.  This module lives in
`trainer` so that Dataflow workers, which install the package, can import it.
"""

from __future__ import annotations

import math
import posixpath
import queue
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io import filebasedsink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from trainer import logs

MIB = 1 << 20
# Ranges per file: enough for two local workers (or many Dataflow workers) to
# share the work, few enough that each range is a large block.
DEFAULT_TARGET_BLOCKS = 16
DEFAULT_MIN_BLOCK_BYTES = 1 * MIB
# At most 24 MiB a range: a block's arrays then stay near glibc's largest heap
# allocation (32 MB), where freed memory is reused; larger ones are mapped afresh
# and every page faults (at 25M, 13.6M faults with 42 MiB blocks, 7.9M with 24).
DEFAULT_MAX_BLOCK_BYTES = 24 * MIB
# zlib level of the gzipped TFRecords: level 1 compresses TFRecords of
# tf.Examples ~3x faster than the default 6, for files ~20% larger.
DEFAULT_GZIP_LEVEL = 1
_READ_AHEAD_BYTES = 64 * 1024
# Blocks handed to the gzip thread that may wait for it, and the slice it compresses at a time.
_PENDING_WRITES = 1
_COMPRESS_CHUNK_BYTES = 16 * MIB
_NEWLINE, _CR = 10, 13
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header and trailer around the deflate stream
_TFRECORD_HEADER = np.dtype([('length', '<u8'), ('length_crc', '<u4')])


# --- Reading. --------------------------------------------------------------------------
def file_size(path: str) -> int:
    """The size in bytes of one file, local or remote."""
    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


def plan_ranges(begin: int, size: int, target_blocks: int = DEFAULT_TARGET_BLOCKS,
                min_block_bytes: int = DEFAULT_MIN_BLOCK_BYTES,
                max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES) -> list[tuple[int, int]]:
    """Byte ranges [start, end) that cover bytes [begin, size) of a file.

    About `target_blocks` ranges, each between min_block_bytes and
    max_block_bytes long (the last may be shorter); none when begin >= size.
    """
    span = max(size - begin, 0)
    block = min(max(math.ceil(span / target_blocks), min_block_bytes), max_block_bytes)
    return [(start, min(start + block, size)) for start in range(begin, size, block)]


def skip_lines(path: str, count: int) -> int:
    """The byte offset just after the first `count` lines of a file."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return sum(len(f.readline()) for _ in range(count))


def read_range(handle, start: int, end: int) -> tuple[bytes, bool]:
    """The bytes of the lines that start in [start, end) of an open file.

    Returns:
      (data, at_eof): the lines with their line ends, beginning at the first
      line that starts at or after `start`; at_eof when the data reaches the
      end of the file.
    """
    first = max(start - 1, 0)  # the byte before `start` tells whether a line starts there
    handle.seek(first)
    data = handle.read(end - first)
    at_eof = len(data) < end - first
    pieces = [data]
    while not at_eof and not pieces[-1].endswith(b'\n'):
        more = handle.read(_READ_AHEAD_BYTES)
        at_eof = len(more) < _READ_AHEAD_BYTES
        cut = more.find(b'\n')
        pieces.append(more if cut < 0 else more[:cut + 1])
        if cut >= 0:
            break
    data = b''.join(pieces)
    if start > 0:
        cut = data.find(b'\n')
        # A line starts in the range only if a newline comes before `end`.
        data = data[cut + 1:] if 0 <= cut < end - first else b''
    return data, at_eof


def split_lines(data: bytes, at_eof: bool) -> pa.LargeBinaryArray:
    """The lines of `data` as an Arrow array, without '\\n' or a '\\r' before it.

    Vectorised: newline positions come from numpy and the lines are copied
    once into one buffer.  A last line without newline is kept when `at_eof`
    (the end of the file ends it); an empty piece after the last newline is
    no line.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(raw == _NEWLINE)
    starts = np.concatenate([[0], newlines + 1])
    ends = np.concatenate([newlines, [len(raw)]])
    if not at_eof or starts[-1] == len(raw):
        starts, ends = starts[:-1], ends[:-1]
    # A CR just before a line's newline (and inside that line) ends the line too.
    terminated = np.arange(len(ends)) < len(newlines)
    before = np.maximum(ends - 1, 0)
    has_cr = terminated & (ends > starts) & (raw[before] == _CR)
    ends = ends - has_cr
    separators = np.concatenate([newlines, before[has_cr]])
    return _lines_array(raw, starts, ends, separators)


def _lines_array(raw: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                 separators: np.ndarray) -> pa.LargeBinaryArray:
    """raw[starts[i]:ends[i]] for consecutive lines, copied once into one Arrow array.

    Between two consecutive lines lie only separator bytes, so the values are
    the span of the lines less the separators inside it.
    """
    offsets = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum(ends - starts, out=offsets[1:])
    values = raw[:0]
    if len(starts):
        low, high = int(starts[0]), int(ends[-1])
        keep = np.ones(high - low, dtype=bool)
        inside = separators[(separators >= low) & (separators < high)]
        keep[inside - low] = False
        values = raw[low:high][keep]
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(starts),
        [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(values))])


class PlanLineRanges(beam.PTransform):
    """A text file -> its byte ranges (start, end), for `ReadLineRanges`.

    Planned from the file's size when the pipeline is built, after the first
    `header_lines` lines, and reshuffled so that a distributed runner spreads
    them over its workers.
    """

    def __init__(self, path: str, header_lines: int = 0,
                 target_blocks: int = DEFAULT_TARGET_BLOCKS,
                 max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES):
        super().__init__()
        self._path = path
        self._header_lines = header_lines
        self._target_blocks = target_blocks
        self._max_block_bytes = max_block_bytes

    def expand(self, pbegin):
        ranges = plan_ranges(skip_lines(self._path, self._header_lines), file_size(self._path),
                             self._target_blocks, max_block_bytes=self._max_block_bytes)
        return (pbegin
                | 'CreateRanges' >> beam.Create(ranges)
                | 'SpreadRanges' >> beam.Reshuffle())


class ReadLineRanges(beam.PTransform):
    """Byte ranges of a text file -> Arrow arrays of their lines (bytes), one per range."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def expand(self, ranges):
        return ranges | 'ReadRanges' >> beam.ParDo(_ReadRangeFn(self._path))


class ReadLineBlocks(beam.PTransform):
    """A text file -> Arrow arrays of its lines (bytes), one array per byte range.

    Each range is read with one seek.  The first `header_lines` lines of the
    file are not read.
    """

    def __init__(self, path: str, header_lines: int = 0,
                 target_blocks: int = DEFAULT_TARGET_BLOCKS,
                 max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES):
        super().__init__()
        self._plan = PlanLineRanges(path, header_lines, target_blocks, max_block_bytes)
        self._read = ReadLineRanges(path)

    def expand(self, pbegin):
        return pbegin | 'PlanLineRanges' >> self._plan | 'ReadLineRanges' >> self._read


class _ReadRangeFn(beam.DoFn):
    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def process(self, byte_range: tuple[int, int]) -> Iterator[pa.LargeBinaryArray]:
        start, end = byte_range
        with FileSystems.open(self._path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            data, at_eof = read_range(f, start, end)
        lines = split_lines(data, at_eof)
        if len(lines):
            yield lines


# --- Writing. --------------------------------------------------------------------------
def masked_crc32c(values: np.ndarray) -> np.ndarray:
    """TFRecord's masked CRC-32C of uint32 checksums, vectorised."""
    values = values.astype(np.uint64)
    return ((((values >> np.uint64(15)) | (values << np.uint64(17))) + np.uint64(0xA282EAD8))
            & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def frame_tfrecords(records: Sequence[bytes] | pa.Array) -> bytes:
    """Serialized records framed as a TFRecord file body, byte for byte as TensorFlow does.

    Each record becomes: length (uint64 LE), masked CRC-32C of those 8 bytes,
    the record, masked CRC-32C of the record.  The checksums are one C call
    per record; lengths, masks and the interleaving are vectorised.  Records
    come as Python bytes or as an Arrow binary array (`examples.encode_examples`),
    whose bytes are framed where they lie.
    """
    import google_crc32c  # pylint: disable=import-outside-toplevel
    count = len(records)
    if not count:
        return b''
    if isinstance(records, pa.Array):
        array = records.cast(pa.large_binary())
        offsets = np.frombuffer(array.buffers()[1], dtype=np.int64, count=count + 1,
                                offset=array.offset * 8)
        lengths = np.diff(offsets)
        body = array.buffers()[2][int(offsets[0]):int(offsets[-1])]
        records = array.to_pylist()
    else:
        lengths = np.fromiter(map(len, records), dtype=np.int64, count=count)
        body = b''.join(records)
    record_crcs = np.fromiter(map(google_crc32c.value, records), dtype=np.uint64, count=count)
    unique_lengths, which = np.unique(lengths, return_inverse=True)
    length_crcs = np.array([google_crc32c.value(struct.pack('<Q', int(length)))
                            for length in unique_lengths], dtype=np.uint64)
    headers = np.empty(count, dtype=_TFRECORD_HEADER)
    headers['length'] = lengths
    headers['length_crc'] = masked_crc32c(length_crcs)[which.reshape(-1)]
    footers = masked_crc32c(record_crcs).astype('<u4')
    framed = pc.binary_join_element_wise(
        _fixed_width_binary(headers.tobytes(), _TFRECORD_HEADER.itemsize, count),
        _binary_array(body, lengths),
        _fixed_width_binary(footers.tobytes(), 4, count), pa.scalar(b'', pa.large_binary()))
    offsets = np.frombuffer(framed.buffers()[1], dtype=np.int64, count=count + 1,
                            offset=framed.offset * 8)
    return framed.buffers()[2][int(offsets[0]):int(offsets[-1])].to_pybytes()  # one copy


def _fixed_width_binary(data: bytes, width: int, count: int) -> pa.LargeBinaryArray:
    """`count` values of `width` bytes each, cut from `data`."""
    return _binary_array(data, np.full(count, width, dtype=np.int64))


def _binary_array(data: bytes, lengths: np.ndarray) -> pa.LargeBinaryArray:
    """Consecutive values of the given lengths, cut from `data` without a copy."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(lengths), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


class _GzipWriter:
    """A write-only gzip stream at a chosen level over a Beam file handle.

    Compression and the file writes run on a thread of their own: zlib and
    file IO release the GIL, so on a machine with a spare core they overlap
    with the encoding of the next block instead of adding to it.  At most
    `_PENDING_WRITES` blocks wait for the thread; a failure there is raised
    by the next write or by close.
    """

    def __init__(self, handle, level: int):
        self._handle = handle
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, _GZIP_WBITS)
        self._pending: queue.Queue = queue.Queue(maxsize=_PENDING_WRITES)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name='gzip-writer', daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (data := self._pending.get()) is not None:
            if self._error is not None:
                continue  # keep taking blocks so that write() never waits forever
            try:
                view = memoryview(data)
                for start in range(0, len(view), _COMPRESS_CHUNK_BYTES):
                    compressed = self._compressor.compress(
                        view[start:start + _COMPRESS_CHUNK_BYTES])
                    if compressed:
                        self._handle.write(compressed)
            except BaseException as error:  # pylint: disable=broad-except  # re-raised below
                self._error = error

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, data: bytes) -> None:
        self._raise_if_failed()
        self._pending.put(data)

    def close(self) -> None:
        self._pending.put(None)
        self._thread.join()
        self._raise_if_failed()
        self._handle.write(self._compressor.flush())
        self._handle.close()


class _FramedTFRecordSink(filebasedsink.FileBasedSink):
    """A FileBasedSink whose elements are already framed TFRecord bytes, gzipped."""

    def __init__(self, file_path_prefix: str, file_name_suffix: str, num_shards: int,
                 gzip_level: int):
        super().__init__(file_path_prefix, coder=beam.coders.BytesCoder(),
                         file_name_suffix=file_name_suffix, num_shards=num_shards,
                         shard_name_template=None, mime_type='application/octet-stream',
                         compression_type=CompressionTypes.UNCOMPRESSED)
        self._gzip_level = gzip_level

    def open(self, temp_path):
        handle = FileSystems.create(temp_path, self.mime_type, CompressionTypes.UNCOMPRESSED)
        return _GzipWriter(handle, self._gzip_level)

    def write_encoded_record(self, file_handle, encoded_value: bytes) -> None:
        file_handle.write(encoded_value)


class WriteTFRecordBlocks(beam.PTransform):
    """Lists of serialized records -> gzipped TFRecord files PREFIX-SSSSS-of-NNNNN SUFFIX.

    Each element is framed in one go and written as one block.  num_shards 0
    lets the runner choose (one file per bundle, no extra shuffle).
    """

    def __init__(self, file_path_prefix: str, file_name_suffix: str = '',
                 num_shards: int = 0, gzip_level: int = DEFAULT_GZIP_LEVEL):
        super().__init__()
        self._sink = _FramedTFRecordSink(file_path_prefix, file_name_suffix, num_shards,
                                         gzip_level)

    def expand(self, record_lists):
        name = posixpath.basename(self._sink.file_path_prefix.get())
        return (record_lists
                | 'FrameRecords' >> beam.ParDo(_FrameFn(f'{name} records written'))
                | 'WriteFiles' >> beam.io.Write(self._sink))


class _FrameFn(beam.DoFn):
    """frame_tfrecords, logging how many records went by every so often."""

    def __init__(self, what: str):
        super().__init__()
        self._progress = logs.ProgressLog(what)

    def process(self, records: Sequence[bytes]) -> Iterator[bytes]:
        self._progress.add(len(records))
        yield frame_tfrecords(records)
