"""Beam steps that read and parse the ratings file, and the counts they all keep.

Owns `ReadRatings` (byte ranges of the file, each read by trainer/pipeline/blockio.py
as one Arrow array of lines and parsed where it is read) and `ParseRatings`
(lines given one per element, batched first: tests and small inputs).  Both
parse with trainer/pipeline/rating_parser.py and emit three outputs, whose tags the
later steps reuse: VALID, RecordBatches of parsed rows in
`rating_parser.PARSED_SCHEMA`; REJECTED, (reason, line) pairs; STATS, dicts
of counts, which `SumStatsFn` adds up key by key.  No element is made per
rating.  This module lives in `trainer` so that Dataflow workers, which
install the package, can import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import pyarrow as pa

from trainer import features, logs
from trainer.pipeline import blockio, rating_parser

# Rows per batch when lines come one per element (tests, small inputs).
DEFAULT_MAX_BATCH_SIZE = 65536


class ParseRatings(beam.PTransform):
    """Lines (bytes) -> parsed RecordBatches, (reason, line) rejects, and counts."""

    VALID, REJECTED, STATS = 'valid', 'rejected', 'stats'

    def __init__(self, layout: features.DatasetLayout, min_batch_size: int = 1024,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE):
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
            | 'ParseBatches' >> beam.ParDo(_ParseBatchFn(self._layout, self.label)).with_outputs(
                self.REJECTED, self.STATS, main=self.VALID))


class _ReadLineRanges(beam.PTransform):
    """Byte ranges of one ratings file of a layout; subclasses parse what they read."""

    def __init__(self, path: str, layout: features.DatasetLayout):
        super().__init__()
        self._path = path
        self._layout = layout


class ReadRatings(_ReadLineRanges):
    """Byte ranges of a ratings file -> the outputs of `ParseRatings`.

    `blockio.ReadLineRanges` reads each range (`blockio.PlanLineRanges`) as an
    Arrow array of lines, parsed where it is read: one element per block,
    never per line.
    """

    def expand(self, ranges):
        return (
            ranges
            | 'ReadLineRanges' >> blockio.ReadLineRanges(self._path)
            | 'ParseBlocks' >> beam.ParDo(_ParseBatchFn(self._layout, self.label)).with_outputs(
                ParseRatings.REJECTED, ParseRatings.STATS, main=ParseRatings.VALID))


class ReadIdPairs(_ReadLineRanges):
    """Byte ranges of a ratings file -> RecordBatches of the (user, movie) ids of its rows.

    For the repeated-pairs pass (`rating_parser.parse_id_pairs`): the ids of
    every row `ReadRatings` accepts, and perhaps of a few it rejects; no
    counts, no rejects.
    """

    def expand(self, ranges):
        return (
            ranges
            | 'ReadLineRanges' >> blockio.ReadLineRanges(self._path)
            | 'ParseIds' >> beam.ParDo(_ParseIdsFn(self._layout, self.label)))


class _ParseIdsFn(beam.DoFn):
    def __init__(self, layout: features.DatasetLayout, step: str):
        super().__init__()
        self._layout = layout
        self._progress = logs.ProgressLog(f'{step}: rating rows read')

    def process(self, lines: pa.Array) -> Iterator[pa.RecordBatch]:
        self._progress.add(len(lines))
        yield rating_parser.parse_id_pairs(lines, self._layout)


class _ParseBatchFn(beam.DoFn):
    def __init__(self, layout: features.DatasetLayout, step: str):
        super().__init__()
        self._layout = layout
        self._read = beam.metrics.Metrics.counter('preprocess', 'rows_read')
        self._valid = beam.metrics.Metrics.counter('preprocess', 'rows_valid')
        self._rejected = beam.metrics.Metrics.counter('preprocess', 'rows_rejected')
        self._progress = logs.ProgressLog(f'{step}: rating rows parsed')

    def process(self, lines: list[bytes] | pa.Array) -> Iterator[Any]:
        parsed = rating_parser.parse_rating_lines(lines, self._layout)
        self._read.inc(len(lines))
        self._progress.add(len(lines))
        self._valid.inc(parsed.valid.num_rows)
        self._rejected.inc(len(parsed.rejected))
        stats = {'rows_read': len(lines), 'rows_valid': parsed.valid.num_rows}
        for reason, line in parsed.rejected:
            stats['rejected:' + reason] = stats.get('rejected:' + reason, 0) + 1
            yield beam.pvalue.TaggedOutput(ParseRatings.REJECTED, (reason, line))
        yield beam.pvalue.TaggedOutput(ParseRatings.STATS, stats)
        if parsed.valid.num_rows:
            yield parsed.valid


class SumStatsFn(beam.CombineFn):
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
