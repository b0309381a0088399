"""The TFT step: raw train/eval RecordBatches -> serialized tf.Examples and the transform graph.

Owns the RecordBatches TFT reads (`make_raw_record_batch`, in the shape of
features.RAW_FEATURE_SPEC, and `raw_tensor_adapter_config`, their TFXIO
description), the TFT `preprocessing_fn` (id vocabularies learnt on train
only; ids unseen in training go to one OOV bucket) and `TransformRatings`,
which analyses train, transforms both splits and encodes each transformed
RecordBatch as one Arrow array of serialized tf.Examples (`encode_examples`:
column-wise with numpy and one Arrow gather, instead of tfx_bsl's
per-example encoder, which it falls back to for shapes it does not handle): no element and no Python object is made per example.  TensorFlow,
TFT and tfx_bsl are imported where they are used.
This module lives in `trainer` so that Dataflow workers, which install the
package, can import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trainer import features


def _as_list_array(values: pa.Array) -> pa.ListArray:
    """One value per row, as the list column TFXIO's dense tensors read.

    32-bit offsets (list, binary), not 64-bit (large_list, large_binary):
    the runner holds these batches in memory for TFT, 24 bytes a row fewer.
    """
    offsets = pa.array(np.arange(len(values) + 1, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values)


def make_raw_record_batch(users: np.ndarray, movies: np.ndarray,
                          ratings: np.ndarray, timestamps: np.ndarray) -> pa.RecordBatch:
    """Builds a RecordBatch in the shape of features.RAW_FEATURE_SPEC."""
    def ids(values: np.ndarray) -> pa.Array:
        return pc.cast(pc.cast(pa.array(values, pa.uint64()), pa.string()), pa.binary())
    return pa.RecordBatch.from_arrays(
        [_as_list_array(ids(users)), _as_list_array(ids(movies)),
         _as_list_array(pa.array(ratings, pa.float32())),
         _as_list_array(pa.array(timestamps, pa.int64()))],
        list(features.RAW_COLUMNS))


def preprocessing_fn(inputs: dict[str, Any]) -> dict[str, Any]:
    """TFT: raw ids -> vocabulary indices (analysed on train only); ratings pass.

    Ids unseen in training map to the one OOV bucket (index == vocabulary size).

    Each id has weight 1, which gives the same vocabulary (ordered by
    count, then id) by a cheaper road: without weights TFT hands every id
    of every row to Python (`tolist()`) and counts them there one element
    at a time; with weights the TF graph first reduces each batch to its
    distinct ids and their summed weights (`tf.unique_with_counts`).
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import tensorflow_transform as tft  # pylint: disable=import-outside-toplevel
    ones = tf.ones_like(inputs[features.RATING], dtype=tf.float32)
    return {
        features.USER: tft.compute_and_apply_vocabulary(
            inputs[features.USER_ID], num_oov_buckets=features.NUM_OOV_BUCKETS,
            vocab_filename=features.USER_VOCAB, weights=ones),
        features.ITEM: tft.compute_and_apply_vocabulary(
            inputs[features.MOVIE_ID], num_oov_buckets=features.NUM_OOV_BUCKETS,
            vocab_filename=features.MOVIE_VOCAB, weights=ones),
        features.RATING: inputs[features.RATING],
        features.USER_ID: inputs[features.USER_ID],
        features.MOVIE_ID: inputs[features.MOVIE_ID],
    }


def raw_tensor_adapter_config():
    """The TFXIO description of the RecordBatches `make_raw_record_batch` builds."""
    from tensorflow_transform.tf_metadata import schema_utils  # pylint: disable=import-outside-toplevel
    from tfx_bsl.public import tfxio  # pylint: disable=import-outside-toplevel
    from tfx_bsl.tfxio import tensor_representation_util  # pylint: disable=import-outside-toplevel
    schema = schema_utils.schema_from_feature_spec(features.RAW_FEATURE_SPEC)
    empty = np.zeros(0)
    arrow_schema = make_raw_record_batch(empty, empty, empty, empty).schema
    return tfxio.TensorAdapterConfig(
        arrow_schema,
        tensor_representation_util.InferTensorRepresentationsFromSchema(schema))


class TransformRatings(beam.PTransform):
    """(train, eval) RecordBatches -> Arrow arrays of serialized tf.Examples per split
    + transform_fn.

    One array per transformed RecordBatch (`encode_examples`), so no element
    per example is ever made.
    """

    def expand(self, splits):
        import tensorflow_transform.beam as tft_beam  # pylint: disable=import-outside-toplevel
        train, eval_ = splits
        config = raw_tensor_adapter_config()
        (train_out, _), transform_fn = (
            (train, config)
            | 'AnalyzeAndTransformTrain' >> tft_beam.AnalyzeAndTransformDataset(
                preprocessing_fn, output_record_batches=True))
        eval_out, _ = (
            ((eval_, config), transform_fn)
            | 'TransformEval' >> tft_beam.TransformDataset(output_record_batches=True))
        return {
            features.TRAIN: train_out | 'EncodeTrain' >> beam.Map(_encode_examples),
            features.EVAL: eval_out | 'EncodeEval' >> beam.Map(_encode_examples),
            'transform_fn': transform_fn,
        }


def _encode_examples(batch_and_passthrough: tuple[pa.RecordBatch, Any]) -> pa.LargeBinaryArray:
    return encode_examples(batch_and_passthrough[0])


# --- Encoding: serialized tf.train.Examples, built column-wise. ------------------------
# An Example is `0a <size> Features`; Features is one `0a <size> entry` per feature,
# each entry `0a <len(name)> name 12 <size> Feature`, and a Feature
# `<kind> <size> 0a <size> payload` (protobuf tags of field 1, 2 and 3, length-delimited):
# kind 0a bytes_list, 12 float_list, 1a int64_list; the payload is one bytes value, one
# little-endian float or one varint (packed lists of one value).
_KIND_TAGS = {'bytes': 0x0A, 'float': 0x12, 'int64': 0x1A}
# int64 columns whose values all lie in [0, this) are encoded once per value and taken.
_MAX_DICTIONARY_VALUES = 1 << 22


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _varints(values: np.ndarray) -> tuple[pa.LargeBinaryArray, np.ndarray]:
    """Protobuf varints of int64 or uint64 values, one array value each, and their sizes."""
    values = np.asarray(values).astype(np.uint64)
    sizes = np.ones(len(values), dtype=np.int64)
    rest = values >> np.uint64(7)
    while rest.any():
        sizes += rest != 0
        rest >>= np.uint64(7)
    width = int(sizes.max()) if len(sizes) else 1
    groups = np.empty((len(values), width), dtype=np.uint8)
    for i in range(width):
        low = ((values >> np.uint64(7 * i)) & np.uint64(0x7F)).astype(np.uint8)
        groups[:, i] = low | ((sizes > i + 1).astype(np.uint8) << np.uint8(7))
    data = groups[np.arange(width) < sizes[:, None]]
    return _binary_array(data.tobytes(), sizes), sizes


def _binary_array(data: bytes, lengths: np.ndarray) -> pa.LargeBinaryArray:
    """Consecutive values of the given lengths, cut from `data`."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(lengths), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


# A piece of every row: (values, index of each row's value); index None is row i -> value i.
_Piece = tuple[pa.LargeBinaryArray, 'np.ndarray | None']


def interleave(pieces: Sequence[_Piece], num_rows: int) -> pa.LargeBinaryArray:
    """Row i -> the concatenation of each piece's value for row i, in one gather.

    The pieces' values are put end to end, and one `take` over them, row by
    row and piece by piece, lays every row's bytes out in order.
    """
    if not num_rows:
        return pa.array([], pa.large_binary())
    indices = np.empty((num_rows, len(pieces)), dtype=np.int64)
    base = 0
    for column, (values, index) in enumerate(pieces):
        indices[:, column] = base + (np.arange(num_rows) if index is None else index)
        base += len(values)
    taken = pa.concat_arrays([values for values, _ in pieces]).take(pa.array(indices.ravel()))
    offsets = np.frombuffer(taken.buffers()[1], dtype=np.int64, count=len(taken) + 1,
                            offset=taken.offset * 8)
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), num_rows,
        [None, pa.py_buffer(np.ascontiguousarray(offsets[::len(pieces)] - offsets[0])),
         taken.buffers()[2].slice(int(offsets[0]))])


def _by_size(sizes: np.ndarray, encode) -> _Piece:
    """A piece that depends on a row's size only: encoded once per size that occurs."""
    distinct, index = np.unique(sizes, return_inverse=True)
    return pa.array([encode(int(size)) for size in distinct], pa.large_binary()), index


def _entry_head(name: bytes, kind: str, payload_size: int) -> bytes:
    """A map entry's bytes before a payload of the given size."""
    list_size = 1 + len(_varint_bytes(payload_size)) + payload_size
    feature = (bytes([_KIND_TAGS[kind]]) + _varint_bytes(list_size) + b'\x0a'
               + _varint_bytes(payload_size))
    feature_size = len(feature) + payload_size
    body = b'\x0a' + _varint_bytes(len(name)) + name + b'\x12' + _varint_bytes(feature_size)
    return b'\x0a' + _varint_bytes(len(body) + feature_size) + body + feature


def _feature_pieces(name: str, values: pa.Array) -> tuple[list[_Piece], np.ndarray] | None:
    """One feature's map entry in every row, as pieces, and its size per row; None
    for a type `encode_examples` leaves to tfx_bsl."""
    key = name.encode()
    if pa.types.is_int64(values.type):
        numbers = np.asarray(values.to_numpy(zero_copy_only=False))
        if len(numbers) and 0 <= numbers.min() and numbers.max() < _MAX_DICTIONARY_VALUES:
            # Vocabulary indices: each value's entry is encoded once, then taken.
            entries, sizes = _feature_pieces_of_varints(key, np.arange(numbers.max() + 1))
            dictionary = interleave(entries, len(sizes))
            return [(dictionary, numbers)], sizes[numbers]
        return _feature_pieces_of_varints(key, numbers)
    if pa.types.is_float32(values.type):
        floats = np.asarray(values.to_numpy(zero_copy_only=False), dtype='<f4')
        payload = _binary_array(floats.tobytes(), np.full(len(floats), 4, dtype=np.int64))
        head = _entry_head(key, 'float', 4)
        return ([(pa.array([head], pa.large_binary()), np.zeros(len(floats), dtype=np.int64)),
                 (payload, None)], np.full(len(floats), len(head) + 4, dtype=np.int64))
    if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
        payload = values.cast(pa.large_binary())
        payload_sizes = np.asarray(pc.binary_length(payload).to_numpy(zero_copy_only=False),
                                   dtype=np.int64)
        return _with_heads(key, 'bytes', payload, payload_sizes)
    return None


def _feature_pieces_of_varints(key: bytes, numbers: np.ndarray):
    payload, payload_sizes = _varints(numbers)
    return _with_heads(key, 'int64', payload, payload_sizes)


def _with_heads(key: bytes, kind: str, payload: pa.LargeBinaryArray,
                payload_sizes: np.ndarray) -> tuple[list[_Piece], np.ndarray]:
    heads = _by_size(payload_sizes, lambda size: _entry_head(key, kind, size))
    head_sizes = np.asarray(pc.binary_length(heads[0]).to_numpy(zero_copy_only=False),
                            dtype=np.int64)[heads[1]]
    return [heads, (payload, None)], head_sizes + payload_sizes


def _single_values(column: pa.Array) -> pa.Array | None:
    """The values of a list column with exactly one non-null value per row, else None."""
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        return None
    if column.null_count:
        return None
    offsets = np.asarray(column.offsets.to_numpy(zero_copy_only=False))
    if np.any(np.diff(offsets) != 1):
        return None
    values = column.values.slice(int(offsets[0]), len(column))
    return None if values.null_count else values


def encode_examples(batch: pa.RecordBatch) -> pa.LargeBinaryArray:
    """A RecordBatch of list columns -> one serialized tf.train.Example per row.

    Column-wise, with no Python object per row: each column is a feature of
    every row's Example, in column order.  Columns of int64, float32 or
    binary lists with one value in every row are encoded here (an int64
    column of small non-negative values, such as vocabulary indices, once
    per distinct value); a batch with any other column goes to tfx_bsl's
    encoder, which handles every shape.  Either way TensorFlow parses the
    same Example from each row.
    """
    pieces: list[_Piece] = []
    sizes = np.zeros(batch.num_rows, dtype=np.int64)
    for name, column in zip(batch.schema.names, batch.columns):
        values = _single_values(column)
        feature = None if values is None else _feature_pieces(name, values)
        if feature is None:
            from tfx_bsl.coders import example_coder  # pylint: disable=import-outside-toplevel
            return pa.array(example_coder.RecordBatchToExamples(batch), pa.large_binary())
        pieces += feature[0]
        sizes += feature[1]
    head = _by_size(sizes, lambda size: b'\x0a' + _varint_bytes(size))
    return interleave([head, *pieces], batch.num_rows)
