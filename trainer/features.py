"""Every name the stages share: dataset layouts, feature keys, specs, work-dir layout.

The extractor, the Beam pipeline, the trainer, the exporter and the tests all
import these names from here, so a column, a feature key or a sub-path is
spelled exactly once.  This module holds no hyperparameters and imports no
Beam (Dataflow workers and the training container both install it).

Work-dir layout (a local path or ``gs://bucket/prefix``)::

    WORK_DIR/
      run.lock                  while a step or run-local.sh writes here (trainer/worklock.py)
      raw/                      data-extractor.py
        source.json             what was staged: dataset, layout, url, md5
        <ratings file>          as in the archive: u.data, ratings.dat, ratings.csv
        <movies file>           as in the archive: u.item, movies.dat, movies.csv
        truth.json              synthetic data only: the planted noise floor
      transformed/              preprocess.py (refused when non-empty, unless --overwrite)
        train-*.tfrecord.gz     gzipped tf.train.Example, TRANSFORMED_FEATURE_SPEC
        eval-*.tfrecord.gz
        transform_fn/           the TFT graph: raw ids -> vocabulary indices
        transformed_metadata/
        rejected/               rejected-*.csv: reason, line
        dataset_info.json       counts and the train mean; written last
      model/                    python -m trainer.task
        run.lock                while a trainer writes here
        checkpoints/
        export/                 SavedModel, serving_default(user_id, movie_id) -> rating,
                                recommend(user_id, k) -> movie_ids, titles, scores,
                                ratings (the top-N model's list, predicted ratings)
        loss_log.csv            one row per epoch
        topn_log.csv            one row per iteration of the top-N model
        metrics.json
        eval_predictions.csv    predicted-rating counts per true eval rating
"""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
from typing import Any

from trainer import fileio

# --- Raw features: one MovieLens rating. -------------------------------------
USER_ID = 'user_id'
MOVIE_ID = 'movie_id'
RATING = 'rating'
TIMESTAMP = 'timestamp'
RAW_COLUMNS = (USER_ID, MOVIE_ID, RATING, TIMESTAMP)

# --- Transformed features: what the trainer reads. ---------------------------
USER = 'user'  # int64 index into the user vocabulary; OOV is the last row.
ITEM = 'item'  # int64 index into the movie vocabulary; OOV is the last row.

USER_VOCAB = 'user_vocab'
MOVIE_VOCAB = 'movie_vocab'
# One out-of-vocabulary bucket per vocabulary, so an id unseen in training gets
# its own row (index == vocabulary size) instead of TFT's default -1, which an
# embedding lookup would silently read as the last real row.
NUM_OOV_BUCKETS = 1

TRAIN = 'train'
EVAL = 'eval'
SPLITS = (TRAIN, EVAL)

# --- Work-dir layout. ----------------------------------------------------------
RAW_DIR = 'raw'
SOURCE_FILE = 'source.json'
TRUTH_FILE = 'truth.json'
TRANSFORMED_DIR = 'transformed'
REJECTED_DIR = 'rejected'
DATASET_INFO_FILE = 'dataset_info.json'
TFRECORD_SUFFIX = '.tfrecord.gz'
MODEL_DIR = 'model'
# A directory's lock while a step writes in it (trainer/worklock.py): in the
# work dir for the data steps and a run-local.sh chain, in the model dir for
# the trainer.
LOCK_FILE = 'run.lock'
CHECKPOINT_DIR = 'checkpoints'
EXPORT_DIR = 'export'
LOSS_LOG_FILE = 'loss_log.csv'
# The top-N model (trainer/topn/train.py): its checkpoints under CHECKPOINT_DIR, and
# one row per search iteration.
TOPN_CHECKPOINT_DIR = 'topn'
# The posterior chain's state and running sums (trainer/rating/state.py), under CHECKPOINT_DIR.
POSTERIOR_CHECKPOINT_DIR = 'posterior'
TOPN_LOG_FILE = 'topn_log.csv'
TOPN_LOG_COLUMNS = ('iteration', 'objective', 'validation_ndcg', 'seconds')
# What a tuning trial can report, each a log column, and whether larger is
# better: hptuning.yaml's metricId, the rating model's best validation RMSE
# (loss_log.csv), and hptuning-ranking.yaml's, the top-N model's best
# validation NDCG@10 (topn_log.csv).
TUNING_METRIC_ID = 'validation_rmse'
RANKING_METRIC_ID = 'validation_ndcg'
TUNING_METRICS = {TUNING_METRIC_ID: False, RANKING_METRIC_ID: True}
METRICS_FILE = 'metrics.json'
# Counts of clipped eval predictions per true rating, for plot.py.
EVAL_PREDICTIONS_FILE = 'eval_predictions.csv'
EVAL_PREDICTIONS_COLUMNS = ('rating', 'predicted_low', 'predicted_high', 'count')
# Every user's top-k from the batch job (trainer/serving/batch.py), JSON lines.
RECOMMENDATIONS_DIR = 'recommendations'
RECOMMENDATIONS_PREFIX = 'part'
RECOMMENDATIONS_SUFFIX = '.jsonl'

# Each step's CPU and resident memory, sampled about every second (trainer/usage.py):
# WORK_DIR/usage/<step>.csv, one row a sample; seconds count from the process's start.
USAGE_DIR = 'usage'
USAGE_COLUMNS = ('unix_time', 'seconds', 'cpu_cores', 'rss_bytes')
USAGE_STEPS = ('extract', 'preprocess', 'trainer', 'batch')

# --- The export's `recommend` signature (trainer/serving/export.py). -------------------
RECOMMEND_SIGNATURE = 'recommend'
RECOMMEND_K = 'k'  # the number of movies asked for
MOVIE_IDS = 'movie_ids'
TITLES = 'titles'
SCORES = 'scores'
PREDICTED_RATINGS = 'ratings'  # the rating model's prediction for each listed movie
FALLBACK = 'fallback'

# Columns of the loss log, in order.
LOSS_LOG_COLUMNS = (
    'epoch', 'train_mse', 'train_rmse', 'train_mae',
    'validation_mse', 'validation_rmse', 'validation_mae',
    'eval_mse', 'eval_rmse', 'eval_mae', 'seconds')


def join(*parts: str) -> str:
    """Joins path parts with '/', for local paths and gs:// URLs alike."""
    return posixpath.join(*parts)


def raw_dir(work_dir: str) -> str:
    return join(work_dir, RAW_DIR)


def transformed_dir(work_dir: str) -> str:
    """The preprocessing output; also the directory `tft.TFTransformOutput` reads."""
    return join(work_dir, TRANSFORMED_DIR)


def split_prefix(work_dir: str, split: str) -> str:
    """The TFRecord shard prefix of one split, e.g. WORK_DIR/transformed/train."""
    return join(transformed_dir(work_dir), split)


def split_pattern(work_dir: str, split: str) -> str:
    """The glob that matches every TFRecord shard of one split."""
    return split_prefix(work_dir, split) + '-*' + TFRECORD_SUFFIX


def default_model_dir(work_dir: str) -> str:
    return join(work_dir, MODEL_DIR)


def recommendations_dir(work_dir: str) -> str:
    return join(work_dir, RECOMMENDATIONS_DIR)


def usage_path(work_dir: str, step: str) -> str:
    """WORK_DIR/usage/<step>.csv: the CPU and memory samples of one step."""
    return join(work_dir, USAGE_DIR, f'{step}.csv')


# --- Dataset layouts. ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DatasetLayout:
    """How one GroupLens archive stores its ratings and titles.

    Attributes:
      name: the --dataset value.
      url: the download address, or None when there is nothing to download.
      md5: the archive's MD5 checksum as known to this project, or None where
        GroupLens updates the archive in place (ml-latest-small), so none is
        stable, or where it is known only from the checksum file GroupLens
        publishes beside the archive (`url + CHECKSUM_SUFFIX`, e.g.
        ml-32m.zip.md5), which data-extractor.py fetches and checks as well.
      ratings_member: the ratings file's path inside the zip.
      ratings_separator: the field separator of the ratings file.
      ratings_header: whether the ratings file starts with a header line.
      movies_member: the movie-title file's path inside the zip.
      movies_separator: the field separator of the movie-title file.
      movies_encoding: the movie-title file's text encoding.
      rating_min: the lowest rating on the scale.
      rating_max: the highest rating on the scale.
      rating_step: 1.0 for whole stars, 0.5 for half stars.
    """
    name: str
    url: str | None
    md5: str | None
    ratings_member: str
    ratings_separator: str
    ratings_header: bool
    movies_member: str
    movies_separator: str
    movies_encoding: str
    rating_min: float
    rating_max: float
    rating_step: float

    @property
    def ratings_file(self) -> str:
        """The staged ratings file's name under raw/."""
        return posixpath.basename(self.ratings_member)

    @property
    def movies_file(self) -> str:
        """The staged movie-title file's name under raw/."""
        return posixpath.basename(self.movies_member)


_GROUPLENS = 'https://files.grouplens.org/datasets/movielens/'
# GroupLens publishes each archive's MD5 in a file of this suffix beside it.
CHECKSUM_SUFFIX = '.md5'


def _csv_layout(name: str, folder: str, md5: str | None) -> DatasetLayout:
    return DatasetLayout(
        name=name, url=f'{_GROUPLENS}{name}.zip', md5=md5,
        ratings_member=f'{folder}/ratings.csv', ratings_separator=',',
        ratings_header=True, movies_member=f'{folder}/movies.csv',
        movies_separator=',', movies_encoding='utf-8',
        rating_min=0.5, rating_max=5.0, rating_step=0.5)


def _dat_layout(name: str, folder: str, md5: str, encoding: str,
                rating_min: float, rating_step: float) -> DatasetLayout:
    return DatasetLayout(
        name=name, url=f'{_GROUPLENS}{name}.zip', md5=md5,
        ratings_member=f'{folder}/ratings.dat', ratings_separator='::',
        ratings_header=False, movies_member=f'{folder}/movies.dat',
        movies_separator='::', movies_encoding=encoding,
        rating_min=rating_min, rating_max=5.0, rating_step=rating_step)


ML_100K = DatasetLayout(
    name='ml-100k', url=f'{_GROUPLENS}ml-100k.zip',
    md5='0e33842e24a9c977be4e0107933c0723',
    ratings_member='ml-100k/u.data', ratings_separator='\t',
    ratings_header=False, movies_member='ml-100k/u.item',
    movies_separator='|', movies_encoding='latin-1',
    rating_min=1.0, rating_max=5.0, rating_step=1.0)

DATASETS: dict[str, DatasetLayout] = {
    layout.name: layout for layout in (
        ML_100K,
        _dat_layout('ml-1m', 'ml-1m', 'c4d9eecfca2ab87c1945afe126590906',
                    'latin-1', rating_min=1.0, rating_step=1.0),
        _dat_layout('ml-10m', 'ml-10M100K', 'ce571fd55effeba0271552578f2648bd',
                    'utf-8', rating_min=0.5, rating_step=0.5),
        _csv_layout('ml-20m', 'ml-20m', 'cd245b17a1ae2cc31bb14903e1204af3'),
        _csv_layout('ml-25m', 'ml-25m', '6b51fb2759a8657d3bfcbfc42b592ada'),
        # GroupLens, 2024: the ml-25m layout; its MD5 comes from ml-32m.zip.md5.
        _csv_layout('ml-32m', 'ml-32m', None),
        _csv_layout('ml-latest-small', 'ml-latest-small', None),
    )
}

SYNTHETIC = 'synthetic'
DATASET_CHOICES = (*DATASETS, SYNTHETIC)
DEFAULT_DATASET = ML_100K.name


# --- Hand-offs between stages (JSON, never pickles). ---------------------------
@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """What data-extractor.py staged under raw/ (raw/source.json).

    Attributes:
      dataset: the --dataset value (a DATASETS key or 'synthetic').
      layout: the DATASETS key whose file layout the staged files follow.
      source: where the archive came from (URL or path).
      md5: the archive's MD5 as computed while staging.
    """
    dataset: str
    layout: str
    source: str
    md5: str


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What preprocess.py wrote (transformed/dataset_info.json).

    Counts satisfy rows_read == rows_accepted + rows_rejected and
    rows_accepted == train_ratings + eval_ratings.
    """
    dataset: str
    layout: str
    seed: int
    eval_percent: float
    rows_read: int
    rows_accepted: int
    rows_rejected: int
    rejected_by_reason: dict[str, int]
    train_ratings: int
    eval_ratings: int
    users: int
    movies: int
    train_mean_rating: float
    global_mean_eval_rmse: float
    rating_min: float
    rating_max: float
    train_pattern: str
    eval_pattern: str
    noise_floor_rmse: float | None = None
    source_md5: str = ''


def strict_json_value(value: Any) -> Any:
    """value with every NaN or infinity, however deeply nested, replaced by None.

    JSON has no NaN: Python writes a bare `NaN`, which JSON.parse, BigQuery and
    most other readers reject; null is what they all read.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(item) for item in value]
    return value


def to_json(record: Any) -> str:
    """Serialises a SourceInfo, DatasetInfo or metrics dict as strict JSON (NaN -> null)."""
    if dataclasses.is_dataclass(record):
        record = dataclasses.asdict(record)
    return json.dumps(strict_json_value(record), indent=2, sort_keys=True,
                      allow_nan=False) + '\n'


def write_json(path: str, record: Any) -> None:
    """Writes JSON locally or to GCS, atomically where the storage allows."""
    fileio.write_text(path, to_json(record))


def read_json(path: str) -> dict[str, Any]:
    with fileio.open_file(path) as f:
        return json.load(f)


def _feature_specs() -> dict[str, dict[str, Any]]:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return {
        'RAW_FEATURE_SPEC': {
            USER_ID: tf.io.FixedLenFeature([], tf.string),
            MOVIE_ID: tf.io.FixedLenFeature([], tf.string),
            RATING: tf.io.FixedLenFeature([], tf.float32),
            TIMESTAMP: tf.io.FixedLenFeature([], tf.int64),
        },
        # What the trainer reads.
        'TRANSFORMED_FEATURE_SPEC': {
            USER: tf.io.FixedLenFeature([], tf.int64),
            ITEM: tf.io.FixedLenFeature([], tf.int64),
            RATING: tf.io.FixedLenFeature([], tf.float32),
            USER_ID: tf.io.FixedLenFeature([], tf.string),
            MOVIE_ID: tf.io.FixedLenFeature([], tf.string),
        },
    }


def __getattr__(name: str) -> Any:
    """RAW_FEATURE_SPEC and TRANSFORMED_FEATURE_SPEC, built on first use.

    They are `tf.io.FixedLenFeature` dicts; building them lazily keeps this
    module (and plot.py, which reads only names and paths from it) from
    importing TensorFlow.
    """
    if name in ('RAW_FEATURE_SPEC', 'TRANSFORMED_FEATURE_SPEC'):
        specs = _feature_specs()
        globals().update(specs)
        return specs[name]
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def read_source_info(work_dir: str) -> SourceInfo:
    return SourceInfo(**read_json(join(raw_dir(work_dir), SOURCE_FILE)))


def read_dataset_info(work_dir: str) -> DatasetInfo:
    return DatasetInfo(
        **read_json(join(transformed_dir(work_dir), DATASET_INFO_FILE)))
