"""The TFT step: raw train/eval RecordBatches -> serialized tf.Examples and the transform graph.

Owns the RecordBatches TFT reads (`make_raw_record_batch`, in the shape of
features.RAW_FEATURE_SPEC, and `raw_tensor_adapter_config`, their TFXIO
description), the TFT `preprocessing_fn` (id vocabularies learnt on train
only; ids unseen in training go to one OOV bucket) and `TransformRatings`,
which analyses train, transforms both splits and encodes each transformed
RecordBatch as one list of tf.Examples in C++ (tfx_bsl): no element is made
per example.  TensorFlow, TFT and tfx_bsl are imported where they are used.
This module lives in `trainer` so that Dataflow workers, which install the
package, can import it.
"""

from __future__ import annotations

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
    """(train, eval) RecordBatches -> lists of serialized tf.Examples per split + transform_fn.

    One list per transformed RecordBatch, encoded in C++ (tfx_bsl), so no
    element per example is ever made.
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


def _encode_examples(batch_and_passthrough: tuple[pa.RecordBatch, Any]) -> list[bytes]:
    from tfx_bsl.coders import example_coder  # pylint: disable=import-outside-toplevel
    return example_coder.RecordBatchToExamples(batch_and_passthrough[0])
