"""The duplicate check: one rating per (user, movie), the latest.

Owns the rule (`keep_latest_ratings`: the latest timestamp wins; on equal
timestamps the higher rating, then the line that sorts last, so the result
never depends on the order rows arrive in) and the Beam steps that apply it
without an element per rating:

- `FindRepeatedPairs`: a light pass that keeps 8 bytes a row (a 64-bit hash
  of the pair) and finds the hashes seen more than once.
- `SeparateRepeatedPairs`: rows of those pairs go on to the check; every
  other row is accepted as it is and drops its line.
- `DeduplicateRatings`: cuts parsed RecordBatches into buckets by a hash of
  the pair (`hash_split.pair_hash` under a fixed key of its own), groups each
  bucket's Arrow IPC chunks, keeps the latest rating of every pair and
  rejects the others as `rating_parser.DUPLICATE_RATING`.

The outputs use the tags of `rating_reader.ParseRatings`.  This module lives
in `trainer` so that Dataflow workers, which install the package, can import
it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa

from trainer import features
from trainer.pipeline import rating_parser
from trainer.pipeline.hash_split import pair_hash
from trainer.pipeline.rating_reader import DEFAULT_MAX_BATCH_SIZE, ParseRatings

# Duplicates are found per bucket of (user, movie) pairs; more buckets spread
# the work over more workers, each bucket holds rows / buckets rows.
DEFAULT_DEDUPE_BUCKETS = 64
# Any fixed key: the bucket only has to put equal pairs together.
_BUCKET_KEY = 0x5EED


def dedupe_buckets(users: np.ndarray, movies: np.ndarray, num_buckets: int) -> np.ndarray:
    """The bucket in [0, num_buckets) of each pair; equal pairs share a bucket."""
    return (pair_hash(users, movies, _BUCKET_KEY) % np.uint64(num_buckets)).astype(np.int64)


def partition_by_bucket(batch: pa.RecordBatch,
                        num_buckets: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Splits parsed rows into one slice per non-empty bucket (a loop over buckets)."""
    buckets = dedupe_buckets(batch.column(features.USER_ID).to_numpy(),
                             batch.column(features.MOVIE_ID).to_numpy(), num_buckets)
    ordered = batch.take(pa.array(np.argsort(buckets, kind='stable')))
    counts = np.bincount(buckets, minlength=num_buckets)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for bucket in np.flatnonzero(counts):
        yield int(bucket), ordered.slice(starts[bucket], counts[bucket])


def keep_latest_ratings(rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Keeps one rating per (user, movie): the latest, deterministically.

    Rows are sorted by (user, movie, timestamp, rating, line) and the last of
    each pair is kept: the latest timestamp wins; on equal timestamps the
    higher rating, then the line that sorts last.  The result depends only on
    the rows, never on the order they arrive in.

    Args:
      rows: parsed rows in rating_parser.PARSED_SCHEMA.

    Returns:
      (kept, duplicates), both in that schema, sorted by pair.
    """
    ordered = rows.sort_by([(features.USER_ID, 'ascending'), (features.MOVIE_ID, 'ascending'),
                            (features.TIMESTAMP, 'ascending'), (features.RATING, 'ascending'),
                            (rating_parser.LINE, 'ascending')]).combine_chunks()
    users = ordered.column(features.USER_ID).to_numpy()
    movies = ordered.column(features.MOVIE_ID).to_numpy()
    last = np.ones(ordered.num_rows, dtype=bool)
    last[:-1] = (users[1:] != users[:-1]) | (movies[1:] != movies[:-1])
    return ordered.filter(pa.array(last)), ordered.filter(pa.array(~last))


def compact_slices(rows: pa.RecordBatch | pa.Table,
                   max_rows: int) -> Iterator[pa.RecordBatch]:
    """The rows as RecordBatches of at most max_rows rows, each with its own buffers.

    A slice shares its parent's buffers, and pickling it (as Beam does to pass
    a batch between stages) writes all of them: slices of a 1M-row batch
    would each carry the 1M rows.  Each slice is therefore copied, once.
    """
    for start in range(0, rows.num_rows, max_rows):
        part = rows.slice(start, max_rows)
        columns = [pa.concat_arrays(column.chunks) if isinstance(column, pa.ChunkedArray)
                   else pa.concat_arrays([column]) for column in part.columns]
        yield pa.RecordBatch.from_arrays(columns, schema=part.schema)


def _to_ipc(batch: pa.RecordBatch) -> bytes:
    """Arrow IPC bytes of one batch: compact, and only the slice's own data."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _from_ipc(blobs: Iterable[bytes]) -> pa.Table:
    batches = [batch for blob in blobs for batch in pa.ipc.open_stream(blob)]
    return pa.Table.from_batches(batches, schema=rating_parser.PARSED_SCHEMA)


class DeduplicateRatings(beam.PTransform):
    """Parsed RecordBatches -> one rating per (user, movie), rejects, counts.

    Each batch is cut into slices by a hash of the pair (numpy), the slices
    of a bucket are grouped (GroupByKey on the bucket id; elements are Arrow
    IPC chunks, not rows), and each bucket keeps the latest rating of every
    pair (`keep_latest_ratings`).  Outputs: VALID, parsed RecordBatches of at
    most max_batch_size rows; REJECTED, CSV text blocks of the duplicates'
    'duplicate_rating,<line>' rows; STATS, the accepted and duplicate counts.
    """

    VALID, REJECTED, STATS = ParseRatings.VALID, ParseRatings.REJECTED, ParseRatings.STATS

    def __init__(self, num_buckets: int = DEFAULT_DEDUPE_BUCKETS,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE):
        super().__init__()
        self._num_buckets = num_buckets
        self._max_batch_size = max_batch_size

    def expand(self, batches):
        return (
            batches
            | 'HashPairsToBuckets' >> beam.FlatMap(
                _bucket_chunks, self._num_buckets).with_output_types(tuple[int, bytes])
            | 'GroupBuckets' >> beam.GroupByKey()
            | 'KeepLatest' >> beam.ParDo(_KeepLatestFn(self._max_batch_size)).with_outputs(
                self.REJECTED, self.STATS, main=self.VALID))


def pair_keys(batch: pa.RecordBatch) -> np.ndarray:
    """The 64-bit hash of each row's (user, movie) that finds repeated pairs."""
    return pair_hash(batch.column(features.USER_ID).to_numpy(),
                     batch.column(features.MOVIE_ID).to_numpy(), _BUCKET_KEY)


def repeated_keys(keys: np.ndarray) -> np.ndarray:
    """The sorted distinct values that occur more than once in `keys`."""
    ordered = np.sort(keys)
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])


def is_in_sorted(values: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    """values[i] in sorted_values, for each i (a binary search each)."""
    if not len(sorted_values):
        return np.zeros(len(values), dtype=bool)
    found = np.minimum(np.searchsorted(sorted_values, values), len(sorted_values) - 1)
    return sorted_values[found] == values


class FindRepeatedPairs(beam.PTransform):
    """Parsed RecordBatches -> one sorted uint64 array of the pair hashes seen twice or more.

    A pair in it may be rated once (two pairs can share a hash); a pair rated
    more than once is always in it, which is all `DeduplicateRatings` needs.
    """

    def expand(self, batches):
        return (batches
                | 'HashPairs' >> beam.Map(pair_keys)
                | 'KeepRepeated' >> beam.CombineGlobally(_RepeatedKeysFn()))


class _RepeatedKeysFn(beam.CombineFn):
    """Gathers pair hashes (8 bytes a row) and keeps those that occur more than once."""

    def create_accumulator(self) -> list[np.ndarray]:
        return []

    def add_input(self, accumulator: list[np.ndarray], keys: np.ndarray) -> list[np.ndarray]:
        accumulator.append(keys)
        return accumulator

    def merge_accumulators(self, accumulators) -> list[np.ndarray]:
        return [keys for accumulator in accumulators for keys in accumulator]

    def extract_output(self, accumulator: list[np.ndarray]) -> np.ndarray:
        if not accumulator:
            return np.zeros(0, dtype=np.uint64)
        return repeated_keys(np.concatenate(accumulator))


class SeparateRepeatedPairs(beam.PTransform):
    """Parsed RecordBatches -> REPEATED rows (a pair hash in `repeated_pairs`)
    and SINGLE rows (all others, the only rating of their pair), plus counts.

    Only REPEATED rows need `DeduplicateRatings`; duplicates are rare, so its
    shuffle then carries next to nothing instead of every row.  SINGLE rows
    are accepted as they are and lose their line (nothing will reject them),
    in RecordBatches of at most max_batch_size rows.
    """

    SINGLE, REPEATED, STATS = ParseRatings.VALID, 'repeated', ParseRatings.STATS

    def __init__(self, repeated_pairs, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE):
        super().__init__()
        self._repeated_pairs = repeated_pairs
        self._max_batch_size = max_batch_size

    def expand(self, batches):
        return batches | 'SeparateRepeated' >> beam.ParDo(
            _SeparateRepeatedFn(self._max_batch_size),
            beam.pvalue.AsSingleton(self._repeated_pairs)).with_outputs(
                self.REPEATED, self.STATS, main=self.SINGLE)


class _SeparateRepeatedFn(beam.DoFn):
    def __init__(self, max_batch_size: int):
        super().__init__()
        self._max_batch_size = max_batch_size
        self._accepted = beam.metrics.Metrics.counter('preprocess', 'rows_accepted')

    def process(self, batch: pa.RecordBatch, repeated: np.ndarray) -> Iterator[Any]:
        is_repeated = is_in_sorted(pair_keys(batch), repeated)
        if is_repeated.any():
            yield beam.pvalue.TaggedOutput(SeparateRepeatedPairs.REPEATED,
                                           batch.filter(pa.array(is_repeated)))
            batch = batch.filter(pa.array(~is_repeated))
        self._accepted.inc(batch.num_rows)
        yield beam.pvalue.TaggedOutput(SeparateRepeatedPairs.STATS,
                                          {'rows_accepted': batch.num_rows})
        single = batch.drop_columns([rating_parser.LINE])
        yield from compact_slices(single, self._max_batch_size)


def _bucket_chunks(batch: pa.RecordBatch, num_buckets: int) -> Iterator[tuple[int, bytes]]:
    for bucket, rows in partition_by_bucket(batch, num_buckets):
        yield bucket, _to_ipc(rows)


class _KeepLatestFn(beam.DoFn):
    def __init__(self, max_batch_size: int):
        super().__init__()
        self._max_batch_size = max_batch_size
        self._accepted = beam.metrics.Metrics.counter('preprocess', 'rows_accepted')
        self._duplicates = beam.metrics.Metrics.counter('preprocess', 'rows_duplicate')

    def process(self, bucket_and_blobs: tuple[int, Iterable[bytes]]) -> Iterator[Any]:
        kept, duplicates = keep_latest_ratings(_from_ipc(bucket_and_blobs[1]))
        self._accepted.inc(kept.num_rows)
        self._duplicates.inc(duplicates.num_rows)
        stats = {'rows_accepted': kept.num_rows}
        if duplicates.num_rows:
            stats['rejected:' + rating_parser.DUPLICATE_RATING] = duplicates.num_rows
            rejected = zip(itertools.repeat(rating_parser.DUPLICATE_RATING),
                           duplicates.column(rating_parser.LINE).to_pylist())
            yield beam.pvalue.TaggedOutput(DeduplicateRatings.REJECTED,
                                           rating_parser.format_rejected(rejected))
        yield beam.pvalue.TaggedOutput(DeduplicateRatings.STATS, stats)
        yield from compact_slices(kept, self._max_batch_size)
