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
--setup_file ./setup.py, which installs `trainer` (and so trainer/features.py
and every stage below) on the workers.

This file is the entry point: the flags, the checks before any pipeline
starts, the wiring of the stages, and dataset_info.json.  The stages live in
the `trainer` package, so that Dataflow workers can import them:

- trainer/pipeline/rating_reader.py reads the ratings file in blocks of lines
  (trainer/pipeline/blockio.py: byte ranges sized from the file, one Arrow array of
  lines per range) and parses them block by block with
  trainer/pipeline/rating_parser.py: a strict regular expression accepts the common
  case column-wise with pyarrow; only lines that fail it go through the
  per-line parser, which names the reason (bytes that are not UTF-8 are
  one).  Rejected rows are counted and written with that reason under
  transformed/rejected/, never dropped silently.
- trainer/pipeline/deduplication.py: a (user, movie) pair rated more than once keeps
  its latest rating (`DeduplicateRatings`); the others are rejected as
  duplicate_rating.  A first, light pass over the file (ids only) finds the pairs seen
  more than once (`FindRepeatedPairs`), so only their rows are grouped.
- trainer/pipeline/hash_split.py: the train/eval split is a keyed 64-bit hash of
  (seed, user, movie), so the same input gives the same split on every run
  and every retry.
- trainer/pipeline/examples.py: TFT learns the id vocabularies on train only and
  transforms both splits; examples are encoded per RecordBatch column-wise
  (numpy and Arrow) and written as blocks of gzipped TFRecords
  (trainer/pipeline/blockio.py, which compresses on a thread of its own).

No step passes a Beam element per rating.  Per-rating Python objects remain
in two places: the TFRecord framing takes each record's CRC-32C with one C
call on a Python bytes object, and TFT's vocabulary analyser turns each
batch's distinct ids into Python values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from trainer import logs

DEFAULT_EVAL_PERCENT = 20.0
DEFAULT_SEED = 42


# --- Flags: parsed before Beam and TensorFlow load, so --help is quick. ---------------------
@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Our flags; Beam's own flags travel separately as a list."""
    work_dir: str
    eval_percent: float = DEFAULT_EVAL_PERCENT
    seed: int = DEFAULT_SEED
    overwrite: bool = False


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
    logs.add_verbose_flag(parser)
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


if __name__ == '__main__':
    parse_args(sys.argv[1:])  # --help and a bad flag answer before Beam and TensorFlow load
    logs.quiet_startup()

# pylint: disable=wrong-import-position
import apache_beam as beam  # noqa: E402

from trainer import features  # noqa: E402
from trainer import shutdown  # noqa: E402
from trainer import usage  # noqa: E402
from trainer import worklock  # noqa: E402
from trainer.pipeline import blockio  # noqa: E402
from trainer.pipeline import rating_parser  # noqa: E402
from trainer.pipeline.deduplication import DEFAULT_DEDUPE_BUCKETS  # noqa: E402
from trainer.pipeline.deduplication import DeduplicateRatings  # noqa: E402
from trainer.pipeline.deduplication import FindRepeatedPairs  # noqa: E402
from trainer.pipeline.deduplication import SeparateRepeatedPairs  # noqa: E402
from trainer.pipeline.examples import TransformRatings  # noqa: E402
from trainer.pipeline.hash_split import SplitRatings  # noqa: E402
from trainer.pipeline.rating_reader import ParseRatings, ReadIdPairs, ReadRatings  # noqa: E402
from trainer.pipeline.rating_reader import SumStatsFn  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_RUNNER = 'FnApiRunner'

# Rows per RecordBatch after the duplicate check, the batches TFT analyses and
# transforms (a block of the file is at most ~0.9M rows, so in practice one
# batch per block).  Large, because TFT's vocabulary analyser emits one Python
# element per distinct id per batch (see `examples.preprocessing_fn`), and
# pays a TF call and conversions per batch.  TFT's desired_batch_size only
# batches instance dicts; RecordBatch input is taken as it comes.
DEFAULT_TRANSFORM_BATCH_SIZE = 1 << 22

_STATS_FILE = 'stats.json'
# Lines check_sample parses before any pipeline starts.
_SAMPLE_LINES = 200
_TMP_DIR = 'tmp'


def read_ratings(p: beam.Pipeline, path: str, layout: features.DatasetLayout,
                 header_lines: int) -> tuple[Any, Any]:
    """Reads the ratings file twice: once for the rows, once for the repeated pairs.

    The second pass parses only the ids (`ReadIdPairs`) and keeps 8 bytes a
    row (`FindRepeatedPairs`), so only the rows of repeated pairs go through
    the duplicate check's shuffle with their lines: reading again costs less
    memory than shuffling every row (the local runner holds a shuffle's input until the job ends).
    Each pass plans its own ranges: were they shared, the runner could not
    fuse the first pass with the step that waits for the second (the side
    input), and would hold every parsed row in memory in between.

    Returns:
      (the outputs of `ReadRatings`, the repeated pairs for `DeduplicateRatings`).
    """
    parsed = (p | 'PlanRanges' >> blockio.PlanLineRanges(path, header_lines)
              | 'ReadRatings' >> ReadRatings(path, layout))
    repeated = (p | 'PlanRangesForPairs' >> blockio.PlanLineRanges(path, header_lines)
                | 'ReadIdPairs' >> ReadIdPairs(path, layout)
                | 'FindRepeatedPairs' >> FindRepeatedPairs())
    return parsed, repeated


def deduplicate_and_split(valid, repeated_pairs, num_buckets: int, seed: int,
                          eval_percent: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parsed rows -> the duplicate check's outputs and the train/eval split.

    With `repeated_pairs`, only rows of a repeated pair go through
    `DeduplicateRatings`; the others pass by it.  The two branches meet
    before the split (where the runner holds the rows without their lines,
    32 bytes a row): merged after the split instead, the runner would hold
    the train split twice.

    Returns:
      ({REJECTED: rejected rows, STATS: a tuple of count PCollections},
       the outputs of `SplitRatings`).
    """
    dedupe = DeduplicateRatings(num_buckets, max_batch_size=DEFAULT_TRANSFORM_BATCH_SIZE)
    if repeated_pairs is None:
        unique = valid | 'DeduplicateRatings' >> dedupe
        kept = unique[DeduplicateRatings.VALID]
        stats = (unique[DeduplicateRatings.STATS],)
    else:
        separated = valid | 'SeparateRepeatedPairs' >> SeparateRepeatedPairs(
            repeated_pairs, max_batch_size=DEFAULT_TRANSFORM_BATCH_SIZE)
        unique = separated[SeparateRepeatedPairs.REPEATED] | 'DeduplicateRatings' >> dedupe
        kept = ((separated[SeparateRepeatedPairs.SINGLE], unique[DeduplicateRatings.VALID])
                | 'MergeUnique' >> beam.Flatten())
        stats = (unique[DeduplicateRatings.STATS], separated[SeparateRepeatedPairs.STATS])
    splits = kept | 'SplitRatings' >> SplitRatings(seed, eval_percent)
    return ({DeduplicateRatings.REJECTED: unique[DeduplicateRatings.REJECTED],
             DeduplicateRatings.STATS: stats}, splits)


def build_pipeline(parsed, work_dir: str, seed: int, eval_percent: float,
                   num_buckets: int = DEFAULT_DEDUPE_BUCKETS,
                   repeated_pairs=None) -> dict[str, Any]:
    """Adds every step after parsing; returns the PCollections tests check.

    Args:
      parsed: the outputs of `ReadRatings` (or `ParseRatings`).
      work_dir: the work dir whose transformed/ receives the outputs.
      seed: the split seed.
      eval_percent: the share of ratings that go to eval, in percent.
      num_buckets: buckets of (user, movie) pairs for the duplicate check.
      repeated_pairs: the output of `FindRepeatedPairs` over the same rows, so
        that only those rows go through the duplicate check's grouping; None
        groups every row.

    Returns:
      A dict with 'train' and 'eval' (Arrow arrays of serialized tf.Examples,
      one per batch), 'rejected' (CSV text of every rejected row, a block per
      element) and 'stats' (one dict of summed counts).
    """
    import tensorflow_transform.beam as tft_beam  # pylint: disable=import-outside-toplevel
    out_dir = features.transformed_dir(work_dir)
    unique, splits = deduplicate_and_split(parsed[ParseRatings.VALID], repeated_pairs,
                                           num_buckets, seed, eval_percent)
    examples = ((splits[features.TRAIN], splits[features.EVAL])
                | 'TransformRatings' >> TransformRatings())
    _ = examples['transform_fn'] | 'WriteTransformFn' >> tft_beam.WriteTransformFn(out_dir)
    for split in features.SPLITS:
        _ = examples[split] | f'Write{split.capitalize()}Examples' >> blockio.WriteTFRecordBlocks(
            features.split_prefix(work_dir, split), file_name_suffix=features.TFRECORD_SUFFIX)
    rejected = ((parsed[ParseRatings.REJECTED]
                 | 'FormatRejected' >> beam.Map(lambda row: rating_parser.format_rejected([row])),
                 unique[DeduplicateRatings.REJECTED])
                | 'MergeRejected' >> beam.Flatten())
    _ = rejected | 'WriteRejected' >> beam.io.WriteToText(
        features.join(out_dir, features.REJECTED_DIR, 'rejected'),
        file_name_suffix='.csv', header='reason,line')
    stats = ((parsed[ParseRatings.STATS], *unique[DeduplicateRatings.STATS],
              splits[ParseRatings.STATS])
             | 'MergeStats' >> beam.Flatten()
             | 'SumStats' >> beam.CombineGlobally(SumStatsFn()))
    _ = (stats
         | 'StatsToJson' >> beam.Map(lambda s: json.dumps(s, sort_keys=True))
         | 'WriteStats' >> beam.io.WriteToText(
             features.join(out_dir, _TMP_DIR, _STATS_FILE), shard_name_template=''))
    return {features.TRAIN: examples[features.TRAIN], features.EVAL: examples[features.EVAL],
            'rejected': rejected, 'stats': stats}


# --- Edges: output dir, run, summary. ---------------------------------------------------
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


def read_head(path: str, count: int) -> list[bytes]:
    """The first `count` lines of a file, as bytes without line ends."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    with tf.io.gfile.GFile(path, 'rb') as f:
        head = [f.readline() for _ in range(count)]
    return [raw.rstrip(b'\r\n') for raw in head if raw]


def check_sample(head: Sequence[bytes], path: str, layout: features.DatasetLayout) -> int:
    """Fails fast, before any pipeline starts, when no sampled line parses.

    Args:
      head: the first lines of the ratings file (`read_head`).
      path: the file, for the message.
      layout: the layout the file should follow.

    Returns:
      The number of header lines to skip (`rating_parser.count_header_lines`).

    Raises:
      UserError: the file is empty, holds only a header, or none of the
        sampled lines is a valid rating of the layout.
    """
    if not head:
        raise UserError(f'{path} is empty: no ratings to preprocess; stage it again with '
                        '.venv/bin/python data-extractor.py --overwrite')
    header_lines = rating_parser.count_header_lines(head[0], layout)
    lines = head[header_lines:header_lines + _SAMPLE_LINES]
    if not lines:
        raise UserError(f'{path} holds a header and no ratings; stage it again with '
                        '.venv/bin/python data-extractor.py --overwrite')
    parsed = rating_parser.parse_rating_lines(lines, layout)
    if not parsed.valid.num_rows:
        reasons = sorted({reason for reason, _ in parsed.rejected})
        raise UserError(
            f'none of the first {len(lines)} lines of {path} is a valid {layout.name} '
            f'rating ({", ".join(reasons)}); check that --dataset matches the file')
    return header_lines


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
    """Runs the pipeline and writes dataset_info.json last, as the completion marker.

    Stopped by SIGTERM, it removes the transformed/ it was writing and exits 143.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    source_path = features.join(features.raw_dir(config.work_dir), features.SOURCE_FILE)
    if not tf.io.gfile.exists(source_path):
        raise UserError(f'no staged ratings in {config.work_dir} ({source_path} is missing); '
                        f'run: .venv/bin/python data-extractor.py --work-dir {config.work_dir}')
    source = features.read_source_info(config.work_dir)
    layout = features.DATASETS[source.layout]
    ratings_path = features.join(features.raw_dir(config.work_dir), layout.ratings_file)
    header_lines = check_sample(read_head(ratings_path, _SAMPLE_LINES + 1), ratings_path, layout)
    if layout.ratings_header and not header_lines:
        logger.warning('%s has no header line; reading ratings from its first line',
                       ratings_path)
    done = prepare_output_dir(config, source)
    if done:
        logger.info('%s already holds this output (same data, seed and eval share); '
                    'reusing it. Pass --overwrite to redo it.',
                    features.transformed_dir(config.work_dir))
        return done
    out_dir = features.transformed_dir(config.work_dir)
    try:
        return _write_output(config, beam_args, source, layout, ratings_path, header_lines)
    except BaseException:  # cleaning up, then re-raised
        if not shutdown.terminated():
            raise
        # transformed/ was empty when this run started: all of it is half written.
        logger.warning('Stopped by SIGTERM: removing the unfinished output in %s', out_dir)
        tf.io.gfile.rmtree(out_dir)
        raise shutdown.Terminated() from None  # Beam re-raises it as a RuntimeError


def _write_output(config: PreprocessConfig, beam_args: Sequence[str],
                  source: features.SourceInfo, layout: features.DatasetLayout,
                  ratings_path: str, header_lines: int) -> features.DatasetInfo:
    """Runs the pipeline into the empty transformed/ and writes dataset_info.json last."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import tensorflow_transform as tft  # pylint: disable=import-outside-toplevel
    import tensorflow_transform.beam as tft_beam  # pylint: disable=import-outside-toplevel
    out_dir = features.transformed_dir(config.work_dir)
    options = pipeline_options(beam_args)
    temp_dir = options.get_all_options().get('temp_location') or tempfile.mkdtemp()
    logger.info('Preprocessing %s (%s layout) into %s', ratings_path, layout.name, out_dir)
    # TFT's analysers (vocabularies, the train mean) report no progress, so its first
    # phase gets a heartbeat without an estimate; the write phase logs its own lines.
    with logs.heartbeat('Preprocessing', "the Beam pipeline (TFT's analyse phase: "
                        'vocabularies and the train mean, then the write)'), \
            beam.Pipeline(options=options) as p:
        with tft_beam.Context(temp_dir=temp_dir):
            parsed, repeated = read_ratings(p, ratings_path, layout, header_lines)
            build_pipeline(parsed, config.work_dir, config.seed, config.eval_percent,
                           repeated_pairs=repeated)
    shutdown.raise_if_terminated()
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
    shutdown.raise_if_terminated()
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
    logs.setup_logging(verbose=logs.wants_verbose(argv))
    started = time.monotonic()
    try:
        with shutdown.raise_on_sigterm(), \
                worklock.hold(config.work_dir, worklock.command_line(argv)), \
                usage.sampling(features.usage_path(config.work_dir, 'preprocess')):
            info = run(config, beam_args)
    except (UserError, worklock.LockHeld) as error:
        print(f'preprocess.py: error: {error}', file=sys.stderr)
        return 2
    print(summarize(info, config.work_dir, time.monotonic() - started))
    return 0


if __name__ == '__main__':
    sys.exit(main())
