"""Preprocess staged MovieLens ratings with Apache Beam and TensorFlow Transform.

Owns: parse -> validate -> split -> TFT analyse (train only) -> transform ->
gzipped TFRecords, the transform graph, rejected rows and dataset_info.json.
Trains nothing.

    python preprocess.py --work-dir WORK_DIR [--eval-percent 20] [--seed 42]
        [--overwrite] [any Beam flag: --runner, --temp_location, --setup_file, ...]

Without --runner the pipeline runs on Beam's in-process FnApiRunner.  Beam's
DirectRunner would first hand the job to Prism, a binary it downloads at run
time; the in-process runner needs no network.  In the cloud pass
--runner DataflowRunner with --project, --region, --temp_location and
--setup_file ./setup.py, which installs `trainer` (and so trainer/features.py)
on the workers.

Rows are parsed in batches: a strict regular expression accepts the common
case column-wise with pyarrow; only lines that fail it go through the per-line
parser, which names the reason.  Rejected rows are counted and written with
that reason under transformed/rejected/, never dropped silently.  The
train/eval split is a keyed 64-bit hash of (seed, user, movie), so the same
input gives the same split on every run and every retry.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trainer import features, logs

logger = logging.getLogger(__name__)

DEFAULT_EVAL_PERCENT = 20.0
DEFAULT_SEED = 42
DEFAULT_RUNNER = 'FnApiRunner'

# Why a row was rejected: the key in dataset_info.json and the first column
# of the rejected-rows CSV.
BLANK_LINE = 'blank_line'
HEADER_LINE = 'header_line'
WRONG_FIELD_COUNT = 'wrong_field_count'
EMPTY_ID = 'empty_id'
NON_NUMERIC_ID = 'non_numeric_id'
NON_NUMERIC_RATING = 'non_numeric_rating'
RATING_NOT_FINITE = 'rating_not_finite'
RATING_OUT_OF_RANGE = 'rating_out_of_range'
RATING_OFF_STEP = 'rating_off_step'
BAD_TIMESTAMP = 'bad_timestamp'

_NUM_FIELDS = 4
# Ids are decimal integers in every MovieLens release; 18 digits keep them
# inside uint64 for the vectorised split hash.
_MAX_ID_DIGITS = 18
_STATS_FILE = 'stats.json'
_TMP_DIR = 'tmp'


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Our flags; Beam's own flags travel separately as a list."""
    work_dir: str
    eval_percent: float = DEFAULT_EVAL_PERCENT
    seed: int = DEFAULT_SEED
    overwrite: bool = False


# --- Parsing. --------------------------------------------------------------------
def parse_rating_line(
        line: str, layout: features.DatasetLayout) -> tuple[int, int, float, int]:
    """Parses one ratings line of the given layout.

    A UTF-8 byte-order mark, a trailing CR and spaces around fields are
    normalised away; ids are decimal integers, written back without leading
    zeros.

    Args:
      line: one line of the ratings file, without its newline.
      layout: the archive layout the line comes from.

    Returns:
      (user_id, movie_id, rating, timestamp).

    Raises:
      ValueError: with one of the reason constants of this module as message.
    """
    text = line.lstrip('\ufeff').rstrip('\r\n')
    if not text.strip():
        raise ValueError(BLANK_LINE)
    fields = [field.strip() for field in text.split(layout.ratings_separator)]
    if fields[0].lower() in ('userid', 'user_id', 'user'):
        raise ValueError(HEADER_LINE)
    if len(fields) != _NUM_FIELDS:
        raise ValueError(WRONG_FIELD_COUNT)
    user_text, movie_text, rating_text, timestamp_text = fields
    if not user_text or not movie_text:
        raise ValueError(EMPTY_ID)
    if not (_is_decimal(user_text) and _is_decimal(movie_text)):
        raise ValueError(NON_NUMERIC_ID)
    try:
        rating = float(rating_text)
    except ValueError:
        raise ValueError(NON_NUMERIC_RATING) from None
    check_rating(rating, layout)
    if not _is_decimal(timestamp_text):
        raise ValueError(BAD_TIMESTAMP)
    return int(user_text), int(movie_text), rating, int(timestamp_text)


def _is_decimal(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= _MAX_ID_DIGITS


def check_rating(rating: float, layout: features.DatasetLayout) -> None:
    """Raises ValueError with the reason when a rating is not on the layout's scale."""
    if not math.isfinite(rating):
        raise ValueError(RATING_NOT_FINITE)
    if not layout.rating_min <= rating <= layout.rating_max:
        raise ValueError(RATING_OUT_OF_RANGE)
    steps = (rating - layout.rating_min) / layout.rating_step
    if abs(steps - round(steps)) > 1e-6:
        raise ValueError(RATING_OFF_STEP)


def _strict_pattern(layout: features.DatasetLayout) -> str:
    """A regex that only clean lines of the layout match in full."""
    sep = re.escape(layout.ratings_separator)
    digits = r'\d{1,%d}' % _MAX_ID_DIGITS
    return f'^{digits}{sep}{digits}{sep}\\d{{1,2}}(\\.\\d+)?{sep}{digits}$'


@dataclasses.dataclass(frozen=True)
class ParsedBatch:
    """The outcome of parsing a batch of lines.

    Attributes:
      valid: a RecordBatch of the accepted rows (see `make_raw_record_batch`).
      rejected: (reason, line) for every rejected line, in input order.
    """
    valid: pa.RecordBatch
    rejected: list[tuple[str, str]]


def parse_rating_lines(
        lines: Sequence[str], layout: features.DatasetLayout) -> ParsedBatch:
    """Parses a batch of ratings lines, column-wise where the lines are clean.

    Lines that match the layout's strict pattern and whose rating is on the
    scale are converted with pyarrow in one go; every other line goes through
    `parse_rating_line`, which either accepts it (after normalising it) or
    names why it is rejected.
    """
    text = pa.array(lines, pa.large_string())
    clean = pc.fill_null(pc.match_substring_regex(text, _strict_pattern(layout)), False)
    columns = pc.split_pattern(pc.filter(text, clean), layout.ratings_separator)
    users = _column(columns, 0, pa.uint64())
    movies = _column(columns, 1, pa.uint64())
    ratings = _column(columns, 2, pa.float64())
    timestamps = _column(columns, 3, pa.int64())
    on_scale = _on_scale(ratings, layout)

    clean_mask = np.asarray(clean.to_numpy(zero_copy_only=False), dtype=bool)
    slow_mask = ~clean_mask
    slow_mask[np.flatnonzero(clean_mask)[~on_scale]] = True
    slow_rows, rejected = _parse_slowly(
        (lines[i] for i in np.flatnonzero(slow_mask)), layout)
    if slow_rows:
        extra = np.array(slow_rows, dtype=object).T
        users = np.concatenate([users[on_scale], extra[0].astype(np.uint64)])
        movies = np.concatenate([movies[on_scale], extra[1].astype(np.uint64)])
        ratings = np.concatenate([ratings[on_scale], extra[2].astype(np.float64)])
        timestamps = np.concatenate([timestamps[on_scale], extra[3].astype(np.int64)])
    else:
        users, movies = users[on_scale], movies[on_scale]
        ratings, timestamps = ratings[on_scale], timestamps[on_scale]
    return ParsedBatch(
        valid=make_raw_record_batch(users, movies, ratings, timestamps),
        rejected=rejected)


def _column(columns: pa.Array, index: int, dtype: pa.DataType) -> np.ndarray:
    values = pc.cast(pc.list_element(columns, index), dtype)
    return np.asarray(values.to_numpy(zero_copy_only=False))


def _on_scale(ratings: np.ndarray, layout: features.DatasetLayout) -> np.ndarray:
    steps = (ratings - layout.rating_min) / layout.rating_step
    return ((ratings >= layout.rating_min) & (ratings <= layout.rating_max)
            & (np.abs(steps - np.round(steps)) <= 1e-6))


def _parse_slowly(
        lines: Iterable[str], layout: features.DatasetLayout,
) -> tuple[list[tuple[int, int, float, int]], list[tuple[str, str]]]:
    """The per-line path for the few lines the strict pattern did not take."""
    rows, rejected = [], []
    for line in lines:
        try:
            rows.append(parse_rating_line(line, layout))
        except ValueError as error:
            rejected.append((str(error), line))
    return rows, rejected


def _as_list_array(values: pa.Array) -> pa.LargeListArray:
    """One value per row, as the list column TFXIO's dense tensors read."""
    offsets = pa.array(np.arange(len(values) + 1, dtype=np.int64))
    return pa.LargeListArray.from_arrays(offsets, values)


def make_raw_record_batch(users: np.ndarray, movies: np.ndarray,
                          ratings: np.ndarray, timestamps: np.ndarray) -> pa.RecordBatch:
    """Builds a RecordBatch in the shape of features.RAW_FEATURE_SPEC."""
    def ids(values: np.ndarray) -> pa.Array:
        return pc.cast(pc.cast(pa.array(values, pa.uint64()), pa.large_string()),
                       pa.large_binary())
    return pa.RecordBatch.from_arrays(
        [_as_list_array(ids(users)), _as_list_array(ids(movies)),
         _as_list_array(pa.array(ratings, pa.float32())),
         _as_list_array(pa.array(timestamps, pa.int64()))],
        list(features.RAW_COLUMNS))


# --- Split. ------------------------------------------------------------------------
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


def split_buckets(users: np.ndarray, movies: np.ndarray, seed: int) -> np.ndarray:
    """A per-rating bucket in [0, 10000) from a keyed hash of (seed, user, movie).

    The hash depends on nothing but its arguments, so a rating lands in the same
    split on every run, worker and retry (unlike `random` in `beam.Partition`).
    """
    with np.errstate(over='ignore'):
        key = _mix64(np.uint64(seed) * _GOLDEN + _GOLDEN)
        hashed = _mix64(_mix64(users.astype(np.uint64) ^ key) + movies.astype(np.uint64))
    return (hashed % np.uint64(10000)).astype(np.int64)


def assign_split(users: np.ndarray, movies: np.ndarray, seed: int,
                 eval_percent: float) -> np.ndarray:
    """True where a rating goes to the eval split."""
    return split_buckets(users, movies, seed) < round(eval_percent * 100)


def _ids_of(batch: pa.RecordBatch, column: str) -> np.ndarray:
    values = pc.cast(batch.column(column).flatten(), pa.large_string())
    return np.asarray(pc.cast(values, pa.uint64()).to_numpy(zero_copy_only=False))


# --- Beam. -----------------------------------------------------------------------------
class ParseRatings(beam.PTransform):
    """Lines -> RecordBatches of valid rows, (reason, line) rejects, and counts."""

    VALID, REJECTED, STATS = 'valid', 'rejected', 'stats'

    def __init__(self, layout: features.DatasetLayout,
                 min_batch_size: int = 1024, max_batch_size: int = 65536):
        super().__init__()
        self._layout = layout
        self._min_batch_size = min_batch_size
        self._max_batch_size = max_batch_size

    def expand(self, lines):
        return (
            lines
            | 'BatchLines' >> beam.BatchElements(
                min_batch_size=self._min_batch_size,
                max_batch_size=self._max_batch_size)
            | 'ParseBatches' >> beam.ParDo(_ParseBatchFn(self._layout)).with_outputs(
                self.REJECTED, self.STATS, main=self.VALID))


class _ParseBatchFn(beam.DoFn):
    def __init__(self, layout: features.DatasetLayout):
        super().__init__()
        self._layout = layout
        self._read = beam.metrics.Metrics.counter('preprocess', 'rows_read')
        self._accepted = beam.metrics.Metrics.counter('preprocess', 'rows_accepted')
        self._rejected = beam.metrics.Metrics.counter('preprocess', 'rows_rejected')

    def process(self, lines: list[str]) -> Iterator[Any]:
        parsed = parse_rating_lines(lines, self._layout)
        self._read.inc(len(lines))
        self._accepted.inc(parsed.valid.num_rows)
        self._rejected.inc(len(parsed.rejected))
        stats = {'rows_read': len(lines), 'rows_accepted': parsed.valid.num_rows}
        for reason, line in parsed.rejected:
            stats['rejected:' + reason] = stats.get('rejected:' + reason, 0) + 1
            yield beam.pvalue.TaggedOutput(ParseRatings.REJECTED, (reason, line))
        yield beam.pvalue.TaggedOutput(ParseRatings.STATS, stats)
        if parsed.valid.num_rows:
            yield parsed.valid


class SplitRatings(beam.PTransform):
    """RecordBatches -> train and eval RecordBatches, plus per-split sums."""

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
        is_eval = assign_split(_ids_of(batch, features.USER_ID),
                               _ids_of(batch, features.MOVIE_ID),
                               self._seed, self._eval_percent)
        ratings = np.asarray(batch.column(features.RATING).flatten(), np.float64)
        eval_ratings = ratings[is_eval]
        yield beam.pvalue.TaggedOutput(ParseRatings.STATS, {
            'train_ratings': int((~is_eval).sum()),
            'eval_ratings': int(is_eval.sum()),
            'train_rating_sum': float(ratings[~is_eval].sum()),
            'eval_rating_sum': float(eval_ratings.sum()),
            'eval_rating_square_sum': float(np.square(eval_ratings).sum()),
        })
        if (~is_eval).any():
            yield batch.filter(pa.array(~is_eval))
        if is_eval.any():
            yield beam.pvalue.TaggedOutput(features.EVAL, batch.filter(pa.array(is_eval)))


class _SumStatsFn(beam.CombineFn):
    """Adds up dicts of counts and sums key by key."""

    def create_accumulator(self) -> dict[str, float]:
        return {}

    def add_input(self, accumulator: dict[str, float], stats: dict[str, float]):
        for key, value in stats.items():
            accumulator[key] = accumulator.get(key, 0) + value
        return accumulator

    def merge_accumulators(self, accumulators):
        merged: dict[str, float] = {}
        for accumulator in accumulators:
            self.add_input(merged, accumulator)
        return merged

    def extract_output(self, accumulator):
        return accumulator


def preprocessing_fn(inputs: dict[str, Any]) -> dict[str, Any]:
    """TFT: raw ids -> vocabulary indices (analysed on train only); ratings pass.

    Ids unseen in training map to the one OOV bucket (index == vocabulary size).
    """
    import tensorflow_transform as tft  # pylint: disable=import-outside-toplevel
    return {
        features.USER: tft.compute_and_apply_vocabulary(
            inputs[features.USER_ID], num_oov_buckets=features.NUM_OOV_BUCKETS,
            vocab_filename=features.USER_VOCAB),
        features.ITEM: tft.compute_and_apply_vocabulary(
            inputs[features.MOVIE_ID], num_oov_buckets=features.NUM_OOV_BUCKETS,
            vocab_filename=features.MOVIE_VOCAB),
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
    """(train, eval) RecordBatches -> serialized tf.Examples per split + transform_fn."""

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
            features.TRAIN: train_out | 'EncodeTrain' >> beam.FlatMap(_encode_examples),
            features.EVAL: eval_out | 'EncodeEval' >> beam.FlatMap(_encode_examples),
            'transform_fn': transform_fn,
        }


def _encode_examples(batch_and_passthrough: tuple[pa.RecordBatch, Any]) -> list[bytes]:
    from tfx_bsl.coders import example_coder  # pylint: disable=import-outside-toplevel
    return example_coder.RecordBatchToExamples(batch_and_passthrough[0])


def _format_rejected(reason_and_line: tuple[str, str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator='').writerow(reason_and_line)
    return buffer.getvalue()


def build_pipeline(p: beam.Pipeline, lines, work_dir: str, layout: features.DatasetLayout,
                   seed: int, eval_percent: float) -> dict[str, Any]:
    """Adds every step after reading to `p`; returns the PCollections tests check.

    Args:
      p: the pipeline.
      lines: a PCollection of ratings lines (header already skipped).
      work_dir: the work dir whose transformed/ receives the outputs.
      layout: the layout of the lines.
      seed: the split seed.
      eval_percent: the share of ratings that go to eval, in percent.

    Returns:
      A dict with 'train' and 'eval' (serialized tf.Examples), 'rejected'
      ((reason, line) tuples) and 'stats' (one dict of summed counts).
    """
    import tensorflow_transform.beam as tft_beam  # pylint: disable=import-outside-toplevel
    out_dir = features.transformed_dir(work_dir)
    parsed = lines | 'ParseRatings' >> ParseRatings(layout)
    splits = parsed[ParseRatings.VALID] | 'SplitRatings' >> SplitRatings(seed, eval_percent)
    examples = ((splits[features.TRAIN], splits[features.EVAL])
                | 'TransformRatings' >> TransformRatings())
    _ = examples['transform_fn'] | 'WriteTransformFn' >> tft_beam.WriteTransformFn(out_dir)
    for split in features.SPLITS:
        _ = examples[split] | f'Write{split.capitalize()}Examples' >> beam.io.WriteToTFRecord(
            features.split_prefix(work_dir, split),
            file_name_suffix=features.TFRECORD_SUFFIX,
            compression_type=beam.io.filesystem.CompressionTypes.GZIP)
    rejected = parsed[ParseRatings.REJECTED]
    _ = (rejected
         | 'FormatRejected' >> beam.Map(_format_rejected)
         | 'WriteRejected' >> beam.io.WriteToText(
             features.join(out_dir, features.REJECTED_DIR, 'rejected'),
             file_name_suffix='.csv', header='reason,line'))
    stats = ((parsed[ParseRatings.STATS], splits[ParseRatings.STATS])
             | 'MergeStats' >> beam.Flatten()
             | 'SumStats' >> beam.CombineGlobally(_SumStatsFn()))
    _ = (stats
         | 'StatsToJson' >> beam.Map(lambda s: json.dumps(s, sort_keys=True))
         | 'WriteStats' >> beam.io.WriteToText(
             features.join(out_dir, _TMP_DIR, _STATS_FILE), shard_name_template=''))
    return {features.TRAIN: examples[features.TRAIN], features.EVAL: examples[features.EVAL],
            'rejected': rejected, 'stats': stats}


def read_lines(p: beam.Pipeline, path: str, layout: features.DatasetLayout):
    return p | 'ReadRatings' >> beam.io.ReadFromText(
        path, skip_header_lines=1 if layout.ratings_header else 0)


# --- Edges: flags, output dir, run, summary. ---------------------------------------------
def parse_args(argv: Sequence[str] | None) -> tuple[PreprocessConfig, list[str]]:
    """Parses our flags; returns them and the remaining (Beam) flags."""
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        epilog='Every other flag goes to Beam (--runner, --temp_location, ...).')
    parser.add_argument('--work-dir', required=True,
                        help='Local path or gs:// URL that data-extractor.py staged into.')
    parser.add_argument('--eval-percent', type=float, default=DEFAULT_EVAL_PERCENT,
                        help='Share of ratings held out for evaluation (default %(default)s).')
    parser.add_argument('--seed', type=int, default=DEFAULT_SEED,
                        help='Seed of the train/eval split (default %(default)s).')
    parser.add_argument('--overwrite', action='store_true',
                        help='Replace an existing transformed/ output.')
    args, beam_args = parser.parse_known_args(argv)
    if not 0 < args.eval_percent < 100:
        parser.error(f'--eval-percent {args.eval_percent:g} is outside (0, 100); '
                     'pass a share such as 20')
    if args.seed < 0:
        parser.error(f'--seed {args.seed} is negative; pass 0 or a positive integer')
    if any(arg.startswith('--work_dir') or arg.startswith('--eval_percent')
           for arg in beam_args):
        parser.error('our flags are spelled with dashes: use --work-dir and --eval-percent')
    config = PreprocessConfig(work_dir=args.work_dir.rstrip('/'),
                              eval_percent=args.eval_percent, seed=args.seed,
                              overwrite=args.overwrite)
    return config, beam_args


def pipeline_options(beam_args: Sequence[str]):
    """Beam options, with the in-process runner unless --runner says otherwise."""
    from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
    args = list(beam_args)
    if not any(arg == '--runner' or arg.startswith('--runner=') for arg in args):
        args.append(f'--runner={DEFAULT_RUNNER}')
    return PipelineOptions(args)


def prepare_output_dir(config: PreprocessConfig, source: features.SourceInfo
                       ) -> features.DatasetInfo | None:
    """Makes transformed/ ready for a new output, or finds it already done.

    Returns:
      The existing DatasetInfo when transformed/ holds a complete output of the
      same staged data with the same split settings (nothing to redo), else None
      after making sure the directory is empty.

    Raises:
      UserError: transformed/ holds some other output and --overwrite is not set.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    out_dir = features.transformed_dir(config.work_dir)
    if tf.io.gfile.exists(out_dir) and tf.io.gfile.listdir(out_dir):
        if not config.overwrite:
            done = _completed_output(config, source)
            if done:
                return done
            raise UserError(f'{out_dir} already holds a different or unfinished '
                            'preprocessing output; pass --overwrite to replace it')
        logger.info('--overwrite: removing the previous output in %s', out_dir)
        tf.io.gfile.rmtree(out_dir)
    tf.io.gfile.makedirs(out_dir)
    return None


def _completed_output(config: PreprocessConfig,
                      source: features.SourceInfo) -> features.DatasetInfo | None:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    path = features.join(features.transformed_dir(config.work_dir), features.DATASET_INFO_FILE)
    if not tf.io.gfile.exists(path):
        return None
    info = features.read_dataset_info(config.work_dir)
    same = (info.source_md5 == source.md5 and info.dataset == source.dataset
            and info.seed == config.seed and info.eval_percent == config.eval_percent)
    return info if same else None


class UserError(Exception):
    """A problem the user can fix; main prints it as one line."""


def check_sample(path: str, layout: features.DatasetLayout, sample_lines: int = 200) -> None:
    """Fails fast, before any pipeline starts, when no sampled line parses."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    with tf.io.gfile.GFile(path, 'rb') as f:
        head = [f.readline() for _ in range(sample_lines + 1)]
    lines = [raw.decode('utf-8', 'replace').rstrip('\n') for raw in head if raw]
    if layout.ratings_header:
        lines = lines[1:]
    parsed = parse_rating_lines(lines, layout)
    if lines and not parsed.valid.num_rows:
        reasons = sorted({reason for reason, _ in parsed.rejected})
        raise UserError(
            f'none of the first {len(lines)} lines of {path} is a valid {layout.name} '
            f'rating ({", ".join(reasons)}); check that --dataset matches the file')


def make_dataset_info(stats: dict[str, float], config: PreprocessConfig,
                      source: features.SourceInfo, layout: features.DatasetLayout,
                      users: int, movies: int, noise_floor: float | None) -> features.DatasetInfo:
    """Turns the pipeline's summed counts into the record the trainer reads."""
    train_n = int(stats.get('train_ratings', 0))
    eval_n = int(stats.get('eval_ratings', 0))
    mean = stats.get('train_rating_sum', 0.0) / max(train_n, 1)
    eval_mean = stats.get('eval_rating_sum', 0.0) / max(eval_n, 1)
    eval_square = stats.get('eval_rating_square_sum', 0.0) / max(eval_n, 1)
    baseline = math.sqrt(max(eval_square - 2 * mean * eval_mean + mean * mean, 0.0))
    rejected = {key.split(':', 1)[1]: int(value)
                for key, value in sorted(stats.items()) if key.startswith('rejected:')}
    return features.DatasetInfo(
        dataset=source.dataset, layout=layout.name, seed=config.seed,
        eval_percent=config.eval_percent, rows_read=int(stats.get('rows_read', 0)),
        rows_accepted=int(stats.get('rows_accepted', 0)),
        rows_rejected=sum(rejected.values()), rejected_by_reason=rejected,
        train_ratings=train_n, eval_ratings=eval_n, users=users, movies=movies,
        train_mean_rating=mean, global_mean_eval_rmse=baseline,
        rating_min=layout.rating_min, rating_max=layout.rating_max,
        train_pattern=features.split_pattern(config.work_dir, features.TRAIN),
        eval_pattern=features.split_pattern(config.work_dir, features.EVAL),
        noise_floor_rmse=noise_floor)


def read_noise_floor(work_dir: str) -> float | None:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    path = features.join(features.raw_dir(work_dir), features.TRUTH_FILE)
    if not tf.io.gfile.exists(path):
        return None
    return float(features.read_json(path)['noise_floor_rmse'])


def run(config: PreprocessConfig, beam_args: Sequence[str]) -> features.DatasetInfo:
    """Runs the pipeline and writes dataset_info.json last, as the completion marker."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import tensorflow_transform as tft  # pylint: disable=import-outside-toplevel
    import tensorflow_transform.beam as tft_beam  # pylint: disable=import-outside-toplevel
    source_path = features.join(features.raw_dir(config.work_dir), features.SOURCE_FILE)
    if not tf.io.gfile.exists(source_path):
        raise UserError(f'no staged ratings in {config.work_dir} ({source_path} is missing); '
                        f'run: python data-extractor.py --work-dir {config.work_dir}')
    source = features.read_source_info(config.work_dir)
    layout = features.DATASETS[source.layout]
    ratings_path = features.join(features.raw_dir(config.work_dir), layout.ratings_file)
    check_sample(ratings_path, layout)
    done = prepare_output_dir(config, source)
    if done:
        logger.info('%s already holds this output (same data, seed and eval share); '
                    'reusing it. Pass --overwrite to redo it.',
                    features.transformed_dir(config.work_dir))
        return done
    out_dir = features.transformed_dir(config.work_dir)
    options = pipeline_options(beam_args)
    temp_dir = options.get_all_options().get('temp_location') or tempfile.mkdtemp()
    logger.info('Preprocessing %s (%s layout) into %s', ratings_path, layout.name, out_dir)
    with beam.Pipeline(options=options) as p:
        with tft_beam.Context(temp_dir=temp_dir):
            build_pipeline(p, read_lines(p, ratings_path, layout), config.work_dir,
                           layout, config.seed, config.eval_percent)
    stats_path = features.join(out_dir, _TMP_DIR, _STATS_FILE)
    with tf.io.gfile.GFile(stats_path) as f:
        stats = json.loads(f.read() or '{}')
    tf.io.gfile.rmtree(features.join(out_dir, _TMP_DIR))
    if not stats.get('train_ratings'):
        raise UserError(f'no valid training ratings in {ratings_path} '
                        f'({int(stats.get("rows_read", 0))} rows read, all rejected: '
                        f'see {features.join(out_dir, features.REJECTED_DIR)})')
    tft_output = tft.TFTransformOutput(out_dir)
    info = make_dataset_info(
        stats, config, source, layout,
        users=tft_output.vocabulary_size_by_name(features.USER_VOCAB),
        movies=tft_output.vocabulary_size_by_name(features.MOVIE_VOCAB),
        noise_floor=read_noise_floor(config.work_dir))
    info = dataclasses.replace(info, source_md5=source.md5)
    features.write_json(features.join(out_dir, features.DATASET_INFO_FILE), info)
    return info


def summarize(info: features.DatasetInfo, work_dir: str, seconds: float) -> str:
    rejected = ', '.join(f'{reason} {count}' for reason, count in
                         info.rejected_by_reason.items()) or 'none'
    return '\n'.join([
        f'preprocess: {info.dataset} ({info.layout} layout) in {seconds:.1f} s',
        f'  rows read {info.rows_read}: accepted {info.rows_accepted}, '
        f'rejected {info.rows_rejected} ({rejected})',
        f'  train {info.train_ratings}, eval {info.eval_ratings} '
        f'({info.eval_percent:g}% by hash, seed {info.seed}); '
        f'{info.users} users, {info.movies} movies in train',
        f'  train mean rating {info.train_mean_rating:.4f}; '
        f'predicting it scores eval RMSE {info.global_mean_eval_rmse:.4f}',
        f'  wrote {features.transformed_dir(work_dir)}/'
        f'{{train,eval}}-*{features.TFRECORD_SUFFIX}, transform_fn/, '
        f'{features.REJECTED_DIR}/, {features.DATASET_INFO_FILE}',
    ])


def main(argv: Sequence[str] | None = None) -> int:
    config, beam_args = parse_args(argv)
    logs.setup_logging()
    started = time.monotonic()
    try:
        info = run(config, beam_args)
    except UserError as error:
        print(f'preprocess.py: error: {error}', file=sys.stderr)
        return 2
    print(summarize(info, config.work_dir, time.monotonic() - started))
    return 0


if __name__ == '__main__':
    sys.exit(main())
