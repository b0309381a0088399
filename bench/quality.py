"""Benchmark: our trainer against classic matrix factorisation on the same split.

Owns the quality benchmark of the issue "Model quality: beat the best classic
matrix factorisation on the same split". It runs the pipeline as a user would,
as subprocesses (`data-extractor.py`, `preprocess.py`,
`python -m trainer.task` with any trainer flags after `--`), reads the exact
train/eval split back from `transformed/{train,eval}-*.tfrecord.gz` (batched
`tf.io.parse_example`, converted to numpy once), fits on the train split and
scores on the eval split:

- the global mean (the train mean rating);
- baselines (numpy ALS): Surprise's `BaselineOnly` rule, re-implemented with
  `np.bincount` so this row exists without Surprise and tests can check it;
- scikit-surprise `BaselineOnly`, `SVD` (defaults), `SVD` tuned on a
  validation slice carved from train only (never on eval), `SVD++`
  (defaults, `cache_ratings=True`, time-boxed: one epoch on a sample of
  whole users is timed first and the fit is skipped when the full fit would
  exceed `--svdpp-budget-seconds`);

next to our trainer's eval RMSE, MAE and seconds (`model/metrics.json`) and,
for synthetic data, the noise floor (`dataset_info.json`).

Dependencies: scikit-surprise is benchmark-only, pinned in
`bench/requirements.txt`. Version 1.1.5 ships a CPython 3.11 manylinux wheel
that works with our numpy 2.4, so it installs into the project venv
(`.venv/bin/pip install -r bench/requirements.txt -c constraints.txt`) and one
process reads the TFRecords and fits Surprise; no second venv or CSV export is
needed. Without Surprise the Surprise rows are left out (logged) and the rest
of the table is still printed.

Comparability: everything trains on the same train ratings and is scored on
the same eval ratings, with raw MovieLens ids. Predictions are clipped to the
rating scale, by Surprise (`clip=True`, its default) and by us. An eval rating
whose user or movie never occurs in train is still scored: Surprise's SVD,
SVD++ and BaselineOnly then drop the unknown terms (mean plus the known bias),
as our model does with its zero out-of-vocabulary rows; the table counts them.
Surprise predicts through `algo.test`, one Python call per eval rating: that is
its API, and the time is not part of "fit seconds". Surprise models are seeded
(`random_state=--seed`), their hyperparameters otherwise as named.

The tuned SVD: every `SVD_GRID` point is fitted on train less a validation
slice (`--validation-percent`, a seeded draw per train rating) and scored on
that slice; the best point is refitted on all of train and scored once on
eval. Eval never picks anything. The SVD++ time box costs one epoch on about
20,000 ratings.

Our trainer's row is whatever `model/metrics.json` holds after the train step
(a resumed run reports its own epochs and seconds, `epochs_this_run` says how
many); "fit s" is its `train_seconds`, the fit loop without start-up. The
noise floor comes from the synthetic `truth.json`: the planted model's RMSE
over all ratings, not only eval.

Usage::

    python bench/quality.py --work-dir /tmp/bench-100k --dataset synthetic
    python bench/quality.py --work-dir /tmp/bench-1m --dataset synthetic \\
        --num-users 6040 --num-movies 3706 --num-ratings 1000000 --synthetic-layout ml-1m
    python bench/quality.py --work-dir /tmp/ml100k --dataset ml-100k \\
        --data-sources ~/Downloads/ml-100k.zip --json-out ml100k.json -- --num-epochs 20
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import math
import pathlib
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainer import logs  # noqa: E402

logs.quiet_startup(sys.argv[1:])  # TensorFlow's start-up lines, before it loads

import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

from trainer import data  # noqa: E402  pylint: disable=wrong-import-position
from trainer import features  # noqa: E402  pylint: disable=wrong-import-position

logger = logging.getLogger(__name__)

_SPLIT_SPEC = {key: features.TRANSFORMED_FEATURE_SPEC[key]
               for key in (features.USER_ID, features.MOVIE_ID, features.RATING)}
_READ_BATCH = 65536
# Surprise's BaselineOnly defaults (method 'als').
BASELINE_REG_ITEM = 10.0
BASELINE_REG_USER = 15.0
BASELINE_EPOCHS = 10
# Train ratings (whole users) SVD++ is timed on before its full fit.
SVDPP_PROBE_RATINGS = 20_000
# The tuned SVD's grid, searched on a validation slice of train. On synthetic
# 100k a first grid (100 factors, 20 or 40 epochs, lr 0.005-0.01, reg
# 0.05-0.1) picked its corner (40 epochs, lr 0.01, reg 0.1); a wider search
# there found fewer factors and 40 epochs better, and reg 0.1 between 0.05 and
# 0.15, so the grid brackets lr and reg around that point. On synthetic 1M
# the best point was 20 factors, lr 0.005, reg 0.05, so reg also tries
# Surprise's default 0.02. 24 fits (about 5 minutes on 1M ratings, 2 cores).
SVD_GRID = {'n_factors': (20, 100), 'n_epochs': (40,),
            'lr_all': (0.005, 0.01, 0.02), 'reg_all': (0.02, 0.05, 0.1, 0.15)}


TRAINER = 'this trainer'
# The yardstick: the best of these on the same split.
RIVALS = ('Surprise SVD (tuned)', 'Surprise SVD++ (defaults)')


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One side of the split: raw ids and ratings, one element per rating."""
    user_ids: np.ndarray  # str
    movie_ids: np.ndarray  # str
    ratings: np.ndarray  # float64


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table."""
    model: str
    rmse: float | None  # None: not fitted (SVD++ over its time box)
    mae: float | None
    fit_seconds: float | None
    note: str = ''


def _parse_split_batch(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    return tf.io.parse_example(serialized, _SPLIT_SPEC)


def read_split(file_pattern: str, batch_size: int = _READ_BATCH) -> Split:
    """Reads one split's raw ids and ratings from its TFRecord shards.

    Args:
      file_pattern: e.g. features.split_pattern(work_dir, features.TRAIN).
      batch_size: serialised examples parsed per `tf.io.parse_example` call.

    Returns:
      The split, in shard order.
    """
    records = tf.data.TFRecordDataset(data.list_shards(file_pattern),
                                      compression_type='GZIP')
    batches = records.batch(batch_size).map(_parse_split_batch)
    columns: dict[str, list[np.ndarray]] = {key: [] for key in _SPLIT_SPEC}
    for batch in batches.as_numpy_iterator():
        for key, values in batch.items():
            columns[key].append(values)
    joined = {key: np.concatenate(parts) if parts else np.array([])
              for key, parts in columns.items()}
    return Split(
        user_ids=np.char.decode(joined[features.USER_ID].astype(bytes), 'utf-8'),
        movie_ids=np.char.decode(joined[features.MOVIE_ID].astype(bytes), 'utf-8'),
        ratings=joined[features.RATING].astype(np.float64))


def check_split(train: Split, test: Split, info: features.DatasetInfo) -> None:
    """Raises ValueError unless the split read back matches dataset_info.json."""
    if (len(train.ratings), len(test.ratings)) != (info.train_ratings, info.eval_ratings):
        raise ValueError(
            f'read {len(train.ratings)} train and {len(test.ratings)} eval ratings, '
            f'dataset_info.json says {info.train_ratings} and {info.eval_ratings}')
    if not math.isclose(float(train.ratings.mean()), info.train_mean_rating,
                        rel_tol=1e-6):
        raise ValueError(f'train mean {train.ratings.mean()!r} differs from '
                         f'dataset_info.json {info.train_mean_rating!r}')


def score(ratings: np.ndarray, predictions: np.ndarray) -> tuple[float, float]:
    """(RMSE, MAE) of predictions against ratings."""
    errors = np.asarray(predictions, np.float64) - ratings
    return float(np.sqrt(np.mean(errors ** 2))), float(np.mean(np.abs(errors)))


def carve_validation(train: Split, percent: float, seed: int) -> tuple[Split, Split]:
    """Splits train into (fit, validation); eval is never touched.

    A seeded draw per rating: the same train split and seed give the same
    slices.
    """
    held = np.random.default_rng(seed).random(len(train.ratings)) < percent / 100

    def take(mask: np.ndarray) -> Split:
        return Split(train.user_ids[mask], train.movie_ids[mask], train.ratings[mask])
    return take(~held), take(held)


def _index(train_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ids in the sorted unique train ids, and which ids are known."""
    vocab = np.unique(train_ids)
    position = np.minimum(np.searchsorted(vocab, ids), len(vocab) - 1)
    return position, vocab[position] == ids


def fit_baselines(train: Split, reg_item: float = BASELINE_REG_ITEM,
                  reg_user: float = BASELINE_REG_USER,
                  epochs: int = BASELINE_EPOCHS) -> dict[str, Any]:
    """Surprise's ALS baseline estimates: r = mu + b_u + b_i, vectorised.

    Each epoch sets every b_i = sum(r - mu - b_u) / (reg_item + n_i), then
    every b_u = sum(r - mu - b_i) / (reg_user + n_u), as
    `surprise.BaselineOnly` (method 'als') does.

    Returns:
      A dict with the train ids and rating mean, user_bias and item_bias.
    """
    users, user_index = np.unique(train.user_ids, return_inverse=True)
    items, item_index = np.unique(train.movie_ids, return_inverse=True)
    mean = float(train.ratings.mean())
    residual = train.ratings - mean
    item_count = np.bincount(item_index, minlength=len(items))
    user_count = np.bincount(user_index, minlength=len(users))
    user_bias = np.zeros(len(users))
    item_bias = np.zeros(len(items))
    for _ in range(epochs):
        item_bias = np.bincount(item_index, residual - user_bias[user_index],
                                len(items)) / (reg_item + item_count)
        user_bias = np.bincount(user_index, residual - item_bias[item_index],
                                len(users)) / (reg_user + user_count)
    return {'users': users, 'items': items, 'mean': mean,
            'user_bias': user_bias, 'item_bias': item_bias}


def predict_baselines(model: dict[str, Any], test: Split, rating_min: float,
                      rating_max: float) -> np.ndarray:
    """mu + b_u + b_i, an unknown user's or movie's bias taken as 0, clipped."""
    user, user_known = _index(model['users'], test.user_ids)
    item, item_known = _index(model['items'], test.movie_ids)
    estimate = (model['mean'] + np.where(user_known, model['user_bias'][user], 0.0)
                + np.where(item_known, model['item_bias'][item], 0.0))
    return np.clip(estimate, rating_min, rating_max)


def unknown_counts(train: Split, test: Split) -> dict[str, int]:
    """Eval ratings whose user, movie, or either, never occurs in train."""
    _, user_known = _index(train.user_ids, test.user_ids)
    _, item_known = _index(train.movie_ids, test.movie_ids)
    return {'unknown_user': int((~user_known).sum()),
            'unknown_movie': int((~item_known).sum()),
            'unknown_either': int((~(user_known & item_known)).sum())}


def numpy_rows(train: Split, test: Split, rating_min: float,
               rating_max: float) -> list[Row]:
    """The rows that need no Surprise: global mean and numpy ALS baselines."""
    mean = float(train.ratings.mean())
    rows = [Row('global mean', *score(test.ratings, np.full(len(test.ratings), mean)),
                fit_seconds=0.0, note='train mean rating')]
    started = time.perf_counter()
    model = fit_baselines(train)
    seconds = time.perf_counter() - started
    predictions = predict_baselines(model, test, rating_min, rating_max)
    rows.append(Row('baselines (numpy ALS)', *score(test.ratings, predictions),
                    fit_seconds=seconds, note='BaselineOnly rule, reg_i 10, reg_u 15'))
    return rows


# --- Surprise (optional: bench/requirements.txt). ------------------------------
def to_trainset(train: Split, rating_min: float, rating_max: float) -> Any:
    """A `surprise.Trainset` of the split, on the dataset's rating scale."""
    import pandas as pd  # pylint: disable=import-outside-toplevel
    import surprise  # pylint: disable=import-outside-toplevel
    frame = pd.DataFrame({'user': train.user_ids, 'item': train.movie_ids,
                          'rating': train.ratings})
    reader = surprise.Reader(rating_scale=(rating_min, rating_max))
    return surprise.Dataset.load_from_df(frame, reader).build_full_trainset()


def surprise_predict(algo: Any, test: Split) -> np.ndarray:
    """Surprise's clipped predictions for every rating of the split."""
    testset = list(zip(test.user_ids.tolist(), test.movie_ids.tolist(),
                       test.ratings.tolist()))
    return np.array([prediction.est for prediction in algo.test(testset)])


def fit_timed(algo: Any, trainset: Any) -> float:
    """Fits algo and returns the seconds it took."""
    started = time.perf_counter()
    algo.fit(trainset)
    return time.perf_counter() - started


def tune_svd(fit_split: Split, validation: Split, rating_min: float,
             rating_max: float, seed: int) -> tuple[dict[str, Any], float]:
    """Grid-searches SVD_GRID by RMSE on a validation slice of train.

    Returns:
      The best parameters and their validation RMSE.
    """
    import surprise  # pylint: disable=import-outside-toplevel
    trainset = to_trainset(fit_split, rating_min, rating_max)
    results = []
    for values in itertools.product(*SVD_GRID.values()):
        params = dict(zip(SVD_GRID, values))
        algo = surprise.SVD(random_state=seed, **params)
        seconds = fit_timed(algo, trainset)
        rmse, _ = score(validation.ratings, surprise_predict(algo, validation))
        logger.info('SVD %s: validation RMSE %.4f (%.1f s)', params, rmse, seconds)
        results.append((rmse, params))
    rmse, params = min(results, key=lambda result: result[0])
    return params, rmse


def probe_users(train: Split, max_ratings: int) -> tuple[Split, float]:
    """A few users' train ratings to time SVD++ on, and how much more all of train costs.

    One SVD++ epoch costs about sum(n_u ** 2) over users (each rating of user u
    reads and updates u's n_u implicit factors), so a sample of whole users
    scales by that sum, where a sample of ratings would not.

    Returns:
      The ratings of the first users (in sorted id order) holding at most
      max_ratings of them (at least one user), and sum(n_u ** 2) over all
      users divided by that over these.
    """
    _, index, counts = np.unique(train.user_ids, return_inverse=True, return_counts=True)
    keep = np.cumsum(counts) <= max(max_ratings, int(counts[0]))
    mask = keep[index]
    work = np.square(counts.astype(np.float64))
    return (Split(train.user_ids[mask], train.movie_ids[mask], train.ratings[mask]),
            float(work.sum() / work[keep].sum()))


def svdpp_row(train: Split, trainset: Any, test: Split, rating_scale: tuple[float, float],
              seed: int, budget_seconds: float) -> Row:
    """SVD++ with defaults, unless a timed probe says it would overrun the budget."""
    import surprise  # pylint: disable=import-outside-toplevel
    name, epochs = RIVALS[1], surprise.SVDpp().n_epochs
    probe_split, scale = probe_users(train, SVDPP_PROBE_RATINGS)
    probe = fit_timed(surprise.SVDpp(n_epochs=1, cache_ratings=True, random_state=seed),
                      to_trainset(probe_split, *rating_scale))
    estimate = probe * scale * epochs
    logger.info('SVD++: 1 epoch on %d ratings took %.1f s; %d epochs on all of train '
                'would take ~%.0f s', len(probe_split.ratings), probe, epochs, estimate)
    if estimate > budget_seconds:
        note = (f'skipped: estimated {estimate:.0f} s > --svdpp-budget-seconds '
                f'{budget_seconds:g}')
        logger.warning('SVD++ %s', note)
        return Row(name, None, None, None, note)
    algo = surprise.SVDpp(cache_ratings=True, random_state=seed)
    seconds = fit_timed(algo, trainset)
    return Row(name, *score(test.ratings, surprise_predict(algo, test)),
               fit_seconds=seconds, note='n_factors 20, 20 epochs, cache_ratings')


def surprise_rows(train: Split, test: Split, rating_min: float, rating_max: float,
                  seed: int, validation_percent: float,
                  svdpp_budget_seconds: float) -> list[Row]:
    """BaselineOnly, SVD (defaults), SVD (tuned on train only), SVD++."""
    import surprise  # pylint: disable=import-outside-toplevel
    trainset = to_trainset(train, rating_min, rating_max)
    rows = []
    for name, algo, note in (
            ('Surprise BaselineOnly', surprise.BaselineOnly(verbose=False), 'ALS, defaults'),
            ('Surprise SVD (defaults)', surprise.SVD(random_state=seed),
             'n_factors 100, 20 epochs, lr 0.005, reg 0.02')):
        seconds = fit_timed(algo, trainset)
        rows.append(Row(name, *score(test.ratings, surprise_predict(algo, test)),
                        fit_seconds=seconds, note=note))
        logger.info('%s: eval RMSE %.4f', name, rows[-1].rmse)
    fit_split, validation = carve_validation(train, validation_percent, seed)
    params, validation_rmse = tune_svd(fit_split, validation, rating_min, rating_max, seed)
    algo = surprise.SVD(random_state=seed, **params)
    seconds = fit_timed(algo, trainset)
    rows.append(Row(RIVALS[0], *score(test.ratings, surprise_predict(algo, test)),
                    fit_seconds=seconds,
                    note=', '.join(f'{key} {value}' for key, value in params.items())
                    + f'; val RMSE {validation_rmse:.4f}'))
    rows.append(svdpp_row(train, trainset, test, (rating_min, rating_max), seed,
                          svdpp_budget_seconds))
    return rows


# --- The pipeline, as a user runs it. ------------------------------------------
@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run does; see the flags in `parse_args`."""
    work_dir: str
    dataset: str = features.SYNTHETIC
    data_sources: str | None = None
    extractor_flags: tuple[str, ...] = ()
    preprocess_flags: tuple[str, ...] = ()
    trainer_flags: tuple[str, ...] = ()
    overwrite: bool = False
    skip_pipeline: bool = False
    skip_surprise: bool = False
    validation_percent: float = 10.0
    seed: int = 0
    svdpp_budget_seconds: float = 600.0
    json_out: str | None = None


def pipeline_commands(config: BenchConfig) -> list[list[str]]:
    """The three commands, exactly as a user would type them."""
    overwrite = ['--overwrite'] if config.overwrite else []
    extract = [sys.executable, 'data-extractor.py', '--work-dir', config.work_dir,
               '--dataset', config.dataset, *config.extractor_flags, *overwrite]
    if config.data_sources:
        extract += ['--data-sources', config.data_sources]
    return [extract,
            [sys.executable, 'preprocess.py', '--work-dir', config.work_dir,
             *config.preprocess_flags, *overwrite],
            [sys.executable, '-m', 'trainer.task', '--work-dir', config.work_dir,
             *overwrite, *config.trainer_flags]]


def run_pipeline(config: BenchConfig) -> dict[str, float]:
    """Runs each step from the repository root; returns seconds per step.

    Raises:
      subprocess.CalledProcessError: a step failed (its output is on stderr).
    """
    seconds = {}
    for name, command in zip(('extract', 'preprocess', 'train'), pipeline_commands(config)):
        logger.info('+ %s', ' '.join(command))
        started = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True)
        seconds[name] = time.perf_counter() - started
    return seconds


def model_dir(config: BenchConfig) -> str:
    """The trainer's model dir: its --job-dir if given after --, else the default."""
    flags = list(config.trainer_flags)
    for position, flag in enumerate(flags):
        if flag == '--job-dir' and position + 1 < len(flags):
            return flags[position + 1]
        if flag.startswith('--job-dir='):
            return flag.split('=', 1)[1]
    return features.default_model_dir(config.work_dir)


def trainer_rows(metrics: dict[str, Any]) -> list[Row]:
    """Our trainer's rows, from its metrics.json: the model it exported and,
    after posterior averaging, the trained model that averaging started from."""
    settings = metrics.get('config', {})
    note = (f"{settings.get('num_factors')} factors, l2 {settings.get('l2')}, "
            f"lr decay {settings.get('learning_rate_decay')}, "
            f"{settings.get('optimizer')}; best of {metrics.get('epochs')} epochs: "
            f"{metrics.get('best_epoch')}, final model {metrics.get('final_model')}")
    if settings.get('implicit_feedback'):
        note += f", implicit feedback (l2 {settings.get('implicit_l2')})"
    train_seconds = metrics.get('train_seconds')
    posterior = metrics.get('posterior')
    if not posterior:
        return [Row(TRAINER, metrics['eval_rmse'], metrics['eval_mae'],
                    fit_seconds=train_seconds, note=note)]
    before = posterior['before']
    return [
        Row(TRAINER + ', trained model', before['eval_rmse'], before['eval_mae'],
            fit_seconds=train_seconds, note=note),
        Row(TRAINER, metrics['eval_rmse'], metrics['eval_mae'],
            fit_seconds=(train_seconds or 0.0) + posterior['seconds'],
            note=f"its posterior mean: {posterior['samples']} Gibbs sweeps after "
                 f"{posterior['burn_in']} burn-in ({posterior['seconds']:.1f} s)")]


# --- The table. ------------------------------------------------------------------
def benchmark(config: BenchConfig) -> dict[str, Any]:
    """Reads the split, fits every model on train, scores on eval.

    Returns:
      The report: dataset facts, unknown-id counts and one dict per row.
    """
    info = features.read_dataset_info(config.work_dir)
    train = read_split(features.split_pattern(config.work_dir, features.TRAIN))
    test = read_split(features.split_pattern(config.work_dir, features.EVAL))
    check_split(train, test, info)
    rows = numpy_rows(train, test, info.rating_min, info.rating_max)
    if config.skip_surprise:
        logger.info('--skip-surprise: no Surprise rows')
    else:
        rows += surprise_rows(train, test, info.rating_min, info.rating_max,
                              seed=config.seed,
                              validation_percent=config.validation_percent,
                              svdpp_budget_seconds=config.svdpp_budget_seconds)
    metrics_path = features.join(model_dir(config), features.METRICS_FILE)
    if tf.io.gfile.exists(metrics_path):
        rows += trainer_rows(features.read_json(metrics_path))
    else:
        logger.warning('no %s: the trainer row is left out', metrics_path)
    if info.noise_floor_rmse is not None:
        rows.append(Row('noise floor (planted model)', info.noise_floor_rmse, None, None,
                        'synthetic truth.json, over all ratings'))
    return {'dataset': info.dataset, 'layout': info.layout, 'work_dir': config.work_dir,
            'train_ratings': info.train_ratings, 'eval_ratings': info.eval_ratings,
            'users': info.users, 'movies': info.movies,
            'rating_scale': [info.rating_min, info.rating_max],
            'eval_unknown': unknown_counts(train, test),
            'rows': [dataclasses.asdict(row) for row in rows]}


def _cell(value: float | None, digits: int) -> str:
    return '-' if value is None else f'{value:.{digits}f}'


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    unknown = report['eval_unknown']
    lines = [f"{report['dataset']} ({report['layout']} layout): "
             f"{report['train_ratings']} train / {report['eval_ratings']} eval ratings, "
             f"{report['users']} users, {report['movies']} movies; eval ratings with a "
             f"user or movie unseen in train: {unknown['unknown_either']} "
             f"(user {unknown['unknown_user']}, movie {unknown['unknown_movie']})",
             f"{'model':<30} {'RMSE':>7} {'MAE':>7} {'fit s':>8}  note"]
    for row in report['rows']:
        lines.append(f"{row['model']:<30} {_cell(row['rmse'], 4):>7} "
                     f"{_cell(row['mae'], 4):>7} {_cell(row['fit_seconds'], 1):>8}  "
                     f"{row['note']}")
    rmse = {row['model']: row['rmse'] for row in report['rows'] if row['rmse'] is not None}
    rivals = {name: rmse[name] for name in RIVALS if name in rmse}
    if TRAINER in rmse and rivals:
        name = min(rivals, key=rivals.get)
        lines.append(f"{TRAINER} / best of {', '.join(rivals)} ({name}): "
                     f"{rmse[TRAINER] / rivals[name]:.4f}x")
    return '\n'.join(lines)


def _local(path: str) -> str:
    """An absolute path (the steps run from the repository root); URLs unchanged."""
    if '://' in path:
        return path
    return str(pathlib.Path(path).expanduser().resolve())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Our trainer against Surprise SVD, SVD++ and baselines on one split.',
        epilog='Flags after -- go to python -m trainer.task.')
    parser.add_argument('--work-dir', required=True)
    parser.add_argument('--dataset', default=features.SYNTHETIC,
                        choices=features.DATASET_CHOICES)
    parser.add_argument('--data-sources', help='a GroupLens-layout zip (path or URL)')
    for flag in ('--num-users', '--num-movies', '--num-ratings'):
        parser.add_argument(flag, type=int, help='synthetic only; data-extractor.py default')
    parser.add_argument('--synthetic-layout', help='synthetic only')
    parser.add_argument('--synthetic-model', help='synthetic only: movielens (default) or rank3')
    parser.add_argument('--selection-bias', type=float,
                        help='synthetic only; data-extractor.py default')
    parser.add_argument('--data-seed', type=int, help="data-extractor.py's --seed (synthetic)")
    parser.add_argument('--eval-percent', type=float, help="preprocess.py's --eval-percent")
    parser.add_argument('--split-seed', type=int, help="preprocess.py's --seed")
    parser.add_argument('--overwrite', action='store_true', help='redo every step')
    parser.add_argument('--skip-pipeline', action='store_true',
                        help='benchmark the work dir as it is, running no step')
    parser.add_argument('--skip-surprise', action='store_true')
    parser.add_argument('--validation-percent', type=float, default=10.0,
                        help='share of train held out to tune SVD (default 10)')
    parser.add_argument('--seed', type=int, default=0,
                        help='seeds Surprise and the validation slice (default 0)')
    parser.add_argument('--svdpp-budget-seconds', type=float, default=600.0,
                        help='skip SVD++ when its fit would take longer (default 600)')
    parser.add_argument('--json-out', help='also write the report as JSON here')
    return parser


def parse_args(argv: Sequence[str] | None) -> BenchConfig:
    """Parses the flags (trainer flags after --) into a BenchConfig."""
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_flags: list[str] = []
    if '--' in argv:
        trainer_flags = argv[argv.index('--') + 1:]
        argv = argv[:argv.index('--')]
    parser = _parser()
    args = parser.parse_args(argv)
    synthetic = {'--num-users': args.num_users, '--num-movies': args.num_movies,
                 '--num-ratings': args.num_ratings, '--seed': args.data_seed,
                 '--synthetic-layout': args.synthetic_layout,
                 '--selection-bias': args.selection_bias,
                 '--synthetic-model': args.synthetic_model}
    given = {flag: value for flag, value in synthetic.items() if value is not None}
    if given and args.dataset != features.SYNTHETIC:
        parser.error(f'{sorted(given)[0]} applies to --dataset synthetic only, not '
                     f'{args.dataset!r}; drop it or pass --dataset synthetic')
    if not 0 < args.validation_percent < 100:
        parser.error(f'--validation-percent {args.validation_percent!r} must lie in '
                     '(0, 100); e.g. 10')
    if args.svdpp_budget_seconds < 0:
        parser.error(f'--svdpp-budget-seconds {args.svdpp_budget_seconds!r} must be >= 0')
    preprocess = {'--eval-percent': args.eval_percent, '--seed': args.split_seed}
    return BenchConfig(
        work_dir=_local(args.work_dir), dataset=args.dataset,
        data_sources=_local(args.data_sources) if args.data_sources else None,
        extractor_flags=tuple(itertools.chain.from_iterable(
            (flag, str(value)) for flag, value in given.items())),
        preprocess_flags=tuple(itertools.chain.from_iterable(
            (flag, str(value)) for flag, value in preprocess.items() if value is not None)),
        trainer_flags=tuple(trainer_flags), overwrite=args.overwrite,
        skip_pipeline=args.skip_pipeline, skip_surprise=args.skip_surprise,
        validation_percent=args.validation_percent, seed=args.seed,
        svdpp_budget_seconds=args.svdpp_budget_seconds, json_out=args.json_out)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    config = parse_args(argv)
    step_seconds: dict[str, float] = {}
    if not config.skip_pipeline:
        try:
            step_seconds = run_pipeline(config)
        except subprocess.CalledProcessError as error:
            logger.error('step failed (exit %d): %s', error.returncode, ' '.join(error.cmd))
            return 1
    if not config.skip_surprise:
        try:
            import surprise  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        except ImportError:
            logger.warning('scikit-surprise is not installed (pip install -r '
                           'bench/requirements.txt): the Surprise rows are left out')
            config = dataclasses.replace(config, skip_surprise=True)
    report = {**benchmark(config), 'step_seconds': step_seconds}
    if config.json_out:
        features.write_json(config.json_out, report)
    print(format_table(report))
    return 0


if __name__ == '__main__':
    sys.exit(main())
