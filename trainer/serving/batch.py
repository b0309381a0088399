"""Every user's top-k movies as a Beam job: RunInference on the exported SavedModel.

Owns the batch-recommendation pipeline.  It reads the users the model was
trained on (the TFT user vocabulary in WORK_DIR/transformed/), scores them in
batches with the export's `recommend` signature through Beam's RunInference,
and writes one JSON line per user under WORK_DIR/recommendations/, e.g.

    {"user_id": "196", "fallback": false, "recommendations": [
        {"rank": 1, "movie_id": "670", "title": "Movie 670 (1945)",
         "score": -2.0103, "rating": 3.0704}, ...]}

and, with --bigquery-table, the same rows to a BigQuery table.  On Beam's
local runner by default; on Dataflow with --runner DataflowRunner (run-cloud.sh
--batch-recommend), where each worker process loads the model once and the
users spread over the workers.  It scores nothing itself: the lists are the
export's (trainer/serving/export.py), best first, movies the user rated in training
left out, padding dropped; `score` ranks the list (not a rating: with the
default top-N model a log, recommend.py's score_scale "ranking"); `rating` is
the rating model's prediction for the movie, as recommend.py and the server
give it (null from an export without it).

    python -m trainer.serving.batch --work-dir W [--export-dir W/model/export]
        [-k 10] [--batch-size 256] [--bigquery-table P:D.T] [--overwrite] [Beam flags]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from trainer import features
from trainer import logs
from trainer import shutdown
from trainer import usage
from trainer import worklock

if __name__ == '__main__':
    logs.check_packages()  # one line, not a traceback, outside .venv

# pylint: disable=wrong-import-position
import apache_beam as beam  # noqa: E402
from apache_beam.ml.inference.base import ModelHandler, RunInference  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_K = 10
MAX_K = 10_000
# Users per signature call: a call scores users x movies floats (256 users x
# 62k movies of ml-25m is 64 MB).
DEFAULT_BATCH_SIZE = 256
DEFAULT_RUNNER = 'FnApiRunner'
# The BigQuery table's columns: one row per user, the list as a repeated record.
BIGQUERY_SCHEMA = {'fields': [
    {'name': 'user_id', 'type': 'STRING', 'mode': 'REQUIRED'},
    {'name': features.FALLBACK, 'type': 'BOOLEAN', 'mode': 'REQUIRED'},
    {'name': 'recommendations', 'type': 'RECORD', 'mode': 'REPEATED', 'fields': [
        {'name': 'rank', 'type': 'INTEGER', 'mode': 'REQUIRED'},
        {'name': 'movie_id', 'type': 'STRING', 'mode': 'REQUIRED'},
        {'name': 'title', 'type': 'STRING', 'mode': 'REQUIRED'},
        {'name': 'score', 'type': 'FLOAT', 'mode': 'REQUIRED'},
        {'name': 'rating', 'type': 'FLOAT', 'mode': 'NULLABLE'}]}]}


class UserError(Exception):
    """A problem the user can fix; main prints it as one line."""


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """What to score and where the lists go."""
    work_dir: str
    export_dir: str
    k: int = DEFAULT_K
    batch_size: int = DEFAULT_BATCH_SIZE
    bigquery_table: str | None = None
    overwrite: bool = False


def user_records(users: Sequence[str], outputs: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per user from a `recommend` call's numpy outputs; padding dropped."""
    records = []
    for row, user_id in enumerate(users):
        movie_ids = outputs[features.MOVIE_IDS][row]
        ratings = (outputs[features.PREDICTED_RATINGS][row]
                   if features.PREDICTED_RATINGS in outputs else [None] * len(movie_ids))
        items = zip(movie_ids, outputs[features.TITLES][row], outputs[features.SCORES][row],
                    ratings)
        records.append({
            'user_id': user_id, features.FALLBACK: bool(outputs[features.FALLBACK][row]),
            'recommendations': [
                {'rank': rank, 'movie_id': movie_id.decode('utf-8'),
                 'title': title.decode('utf-8'), 'score': round(float(score), 4),
                 'rating': None if rating is None else round(float(rating), 4)}
                for rank, (movie_id, title, score, rating) in enumerate(
                    (item for item in items if item[0]), start=1)]})
    return records


class RecommendModelHandler(ModelHandler[str, dict, Any]):
    """RunInference's handler for the export's `recommend` signature."""

    def __init__(self, export_dir: str, k: int, batch_size: int) -> None:
        super().__init__(min_batch_size=1, max_batch_size=batch_size)
        self._export_dir = export_dir
        self._k = k

    def load_model(self) -> Any:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        model = tf.saved_model.load(self._export_dir)
        if features.RECOMMEND_SIGNATURE not in model.signatures:
            raise ValueError(f'{self._export_dir} has no {features.RECOMMEND_SIGNATURE} '
                             'signature; re-export it with python -m trainer.task')
        return model

    def run_inference(self, batch: Sequence[str], model: Any,
                      inference_args: dict[str, Any] | None = None
                      ) -> Iterable[dict[str, Any]]:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        del inference_args  # k is fixed per job
        outputs = model.signatures[features.RECOMMEND_SIGNATURE](
            user_id=tf.constant(list(batch)), k=tf.constant(self._k, tf.int32))
        return user_records(batch, {name: value.numpy() for name, value in outputs.items()})

    def get_metrics_namespace(self) -> str:
        return 'BatchRecommendations'


def to_json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False)


def build_pipeline(pipeline: beam.Pipeline, users_file: str,
                   handler: RecommendModelHandler) -> beam.PCollection:
    """Users (one id per line) -> their records; returns the records."""
    return (pipeline
            | 'ReadUsers' >> beam.io.ReadFromText(users_file)
            | 'DropBlankLines' >> beam.Filter(lambda line: bool(line.strip()))
            # The vocabulary is one small file: without a reshuffle the read and
            # the scoring fuse, and one worker would score every user.
            | 'SpreadUsers' >> beam.Reshuffle()
            | 'RecommendTopK' >> RunInference(handler))


def write_outputs(records: beam.PCollection, config: BatchConfig) -> None:
    """JSON lines under WORK_DIR/recommendations/, and the BigQuery table if any."""
    _ = (records
         | 'ToJsonLines' >> beam.Map(to_json_line)
         | 'WriteRecommendations' >> beam.io.WriteToText(
             features.join(features.recommendations_dir(config.work_dir),
                           features.RECOMMENDATIONS_PREFIX),
             file_name_suffix=features.RECOMMENDATIONS_SUFFIX))
    if config.bigquery_table:
        disposition = (beam.io.BigQueryDisposition.WRITE_TRUNCATE if config.overwrite
                       else beam.io.BigQueryDisposition.WRITE_EMPTY)
        _ = records | 'WriteToBigQuery' >> beam.io.WriteToBigQuery(
            config.bigquery_table, schema=BIGQUERY_SCHEMA, write_disposition=disposition,
            create_disposition=beam.io.BigQueryDisposition.CREATE_IF_NEEDED)


def prepare_output_dir(config: BatchConfig) -> None:
    """Makes WORK_DIR/recommendations/ empty, refusing to replace a list without --overwrite.

    Raises:
      UserError: the directory holds files and --overwrite is not set.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    out_dir = features.recommendations_dir(config.work_dir)
    if tf.io.gfile.exists(out_dir) and tf.io.gfile.listdir(out_dir):
        if not config.overwrite:
            raise UserError(f'{out_dir} already holds recommendations; pass --overwrite '
                            'to replace them')
        logger.info('--overwrite: removing the previous recommendations in %s', out_dir)
        tf.io.gfile.rmtree(out_dir)
    tf.io.gfile.makedirs(out_dir)


def users_file(work_dir: str) -> str:
    """The TFT user vocabulary: every user the model was trained on, one per line."""
    import tensorflow_transform as tft  # pylint: disable=import-outside-toplevel
    return tft.TFTransformOutput(features.transformed_dir(work_dir)).vocabulary_file_by_name(
        features.USER_VOCAB)


def parse_args(argv: Sequence[str] | None) -> tuple[BatchConfig, list[str]]:
    """Our flags, validated, and the rest (Beam's)."""
    parser = argparse.ArgumentParser(
        prog='python -m trainer.serving.batch', allow_abbrev=False,
        description=__doc__.split('\n\n')[0],
        epilog='Every other flag goes to Beam (--runner, --temp_location, ...).')
    parser.add_argument('--work-dir', required=True,
                        help='the work dir of preprocess.py and the trainer (local or gs://)')
    parser.add_argument('--export-dir',
                        help='the SavedModel (default: WORK_DIR/model/export)')
    parser.add_argument('-k', type=int, default=DEFAULT_K,
                        help=f'movies per user, 1..{MAX_K} (default {DEFAULT_K})')
    parser.add_argument('--batch-size', type=int, default=DEFAULT_BATCH_SIZE,
                        help=f'users per model call (default {DEFAULT_BATCH_SIZE})')
    parser.add_argument('--bigquery-table',
                        help='also write the rows to this table, PROJECT:DATASET.TABLE')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace earlier recommendations')
    args, beam_args = parser.parse_known_args(argv)
    if not 1 <= args.k <= MAX_K:
        parser.error(f'-k {args.k} is outside [1, {MAX_K}]; pass e.g. -k {DEFAULT_K}')
    if not 1 <= args.batch_size <= 100_000:
        parser.error(f'--batch-size {args.batch_size} is outside [1, 100000]; pass e.g. '
                     f'--batch-size {DEFAULT_BATCH_SIZE}')
    if args.bigquery_table is not None and not _is_table(args.bigquery_table):
        parser.error(f'--bigquery-table {args.bigquery_table!r} is not PROJECT:DATASET.TABLE; '
                     'pass e.g. --bigquery-table my-project:movielens.recommendations')
    work_dir = args.work_dir.rstrip('/')
    export_dir = args.export_dir or features.join(features.default_model_dir(work_dir),
                                                  features.EXPORT_DIR)
    return BatchConfig(work_dir=work_dir, export_dir=export_dir.rstrip('/'), k=args.k,
                       batch_size=args.batch_size, bigquery_table=args.bigquery_table,
                       overwrite=args.overwrite), beam_args


def _is_table(text: str) -> bool:
    project, _, rest = text.partition(':')
    dataset, _, table = rest.partition('.')
    return all(part and part.replace('-', '').replace('_', '').isalnum()
               for part in (project, dataset, table))


def run(config: BatchConfig, beam_args: Sequence[str]) -> None:
    """Runs the job to completion."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
    if not tf.io.gfile.exists(features.join(config.export_dir, 'saved_model.pb')):
        raise UserError(f'{config.export_dir} holds no SavedModel; train first '
                        f'(python -m trainer.task --work-dir {config.work_dir}) or pass '
                        '--export-dir')
    users = users_file(config.work_dir)
    prepare_output_dir(config)
    args = list(beam_args)
    if not any(arg == '--runner' or arg.startswith('--runner=') for arg in args):
        args.append(f'--runner={DEFAULT_RUNNER}')
    handler = RecommendModelHandler(config.export_dir, config.k, config.batch_size)
    with beam.Pipeline(options=PipelineOptions(args)) as pipeline:
        write_outputs(build_pipeline(pipeline, users, handler), config)
    logger.info('Wrote the top %d movies of every user to %s', config.k,
                features.recommendations_dir(config.work_dir))


def main(argv: Sequence[str] | None = None) -> int:
    """Parses flags and runs the job; returns the exit code."""
    logs.setup_logging()
    config, beam_args = parse_args(argv)
    try:
        with shutdown.raise_on_sigterm(), \
                worklock.hold(config.work_dir, worklock.command_line(argv)), \
                usage.sampling(features.usage_path(config.work_dir, 'batch')):
            run(config, beam_args)
    except RuntimeError:
        if not shutdown.terminated():
            raise
        logger.warning('Stopped by SIGTERM: %s may hold part of the lists; run again with '
                       '--overwrite', features.recommendations_dir(config.work_dir))
        return shutdown.EXIT_TERMINATED
    except (UserError, FileNotFoundError, worklock.LockHeld) as error:
        print(f'batch_recommendations: error: {error}', file=sys.stderr)
        return 2
    print(f'recommendations: {features.recommendations_dir(config.work_dir)}/'
          f'{features.RECOMMENDATIONS_PREFIX}-*{features.RECOMMENDATIONS_SUFFIX}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
