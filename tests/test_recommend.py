"""Tests of recommend.py and of the trained `recommend` signature, on planted tastes.

The planted case (a checkerboard, as in benfred/implicit's tests): 40 users
and 40 movies in two taste groups by parity; a user rates movies of their own
group 5 and the others 1, and rates 24 movies drawn at random, so exposure
says nothing about taste.  For each user the planted best unseen movies are
then exactly the unrated movies of their own group: a top-5 list drawn at
random would hold 2.5 of them.  Every movie title has non-ASCII letters in a
latin-1 u.item.  After training, the export is copied away and the work dir
deleted, so everything below runs on the export alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

import preprocess
import recommend
from trainer import features, task

NUM_USERS = NUM_MOVIES = 40
MOVIES_PER_USER = 24


def _title(movie_id: str) -> str:
    return f'Amélie n°{movie_id} (2001)'


@dataclasses.dataclass(frozen=True)
class PlantedRun:
    model_dir: str  # a copy holding export/, metrics.json, eval_predictions.csv
    train_movies: dict[str, set[str]]  # raw user id -> raw movie ids rated in train
    summary: str  # what task.main printed


def _stage(work_dir: str) -> None:
    rng = np.random.default_rng(0)
    lines = []
    for user in range(1, NUM_USERS + 1):
        for movie in sorted(rng.choice(np.arange(1, NUM_MOVIES + 1), MOVIES_PER_USER,
                                       replace=False).tolist()):
            rating = 5 if user % 2 == movie % 2 else 1
            lines.append(f'{user}\t{movie}\t{rating}\t{880_000_000 + 100 * user + movie}\n')
    raw_dir = features.raw_dir(work_dir)
    os.makedirs(raw_dir)
    layout = features.ML_100K
    with open(os.path.join(raw_dir, layout.ratings_file), 'w', encoding='utf-8') as f:
        f.writelines(lines)
    with open(os.path.join(raw_dir, layout.movies_file), 'wb') as f:
        f.write(''.join(f'{movie}|{_title(str(movie))}|01-Jan-2001||http://x|0\n'
                        for movie in range(1, NUM_MOVIES + 1)).encode(layout.movies_encoding))
    features.write_json(os.path.join(raw_dir, features.SOURCE_FILE), features.SourceInfo(
        dataset=features.SYNTHETIC, layout=layout.name, source='test', md5=''))


def _train_movies(work_dir: str) -> dict[str, set[str]]:
    """Raw ids of the train split, read back from the TFRecords."""
    spec = {key: features.TRANSFORMED_FEATURE_SPEC[key]
            for key in (features.USER_ID, features.MOVIE_ID)}
    pattern = features.split_pattern(work_dir, features.TRAIN)
    records = tf.data.TFRecordDataset(tf.io.gfile.glob(pattern), compression_type='GZIP')
    batch = next(iter(records.batch(100_000).map(
        lambda serialized: tf.io.parse_example(serialized, spec))))
    movies: dict[str, set[str]] = {}
    for user, movie in zip(batch[features.USER_ID].numpy().astype(str),
                           batch[features.MOVIE_ID].numpy().astype(str)):
        movies.setdefault(user, set()).add(movie)
    return movies


@pytest.fixture(scope='module')
def planted(tmp_path_factory) -> PlantedRun:
    root = tmp_path_factory.mktemp('planted')
    work_dir = str(root / 'work')
    _stage(work_dir)
    assert preprocess.main(['--work-dir', work_dir]) == 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert task.main(['--work-dir', work_dir, '--num-epochs', '8', '--batch-size', '32',
                          '--learning-rate', '0.05', '--num-factors', '4', '--l2', '0.05']) == 0
    model_dir = features.default_model_dir(work_dir)
    served = root / 'served'
    shutil.copytree(os.path.join(model_dir, features.EXPORT_DIR), served / features.EXPORT_DIR)
    for name in (features.METRICS_FILE, features.EVAL_PREDICTIONS_FILE):
        shutil.copy(os.path.join(model_dir, name), served / name)
    run = PlantedRun(str(served), _train_movies(work_dir), printed.getvalue())
    shutil.rmtree(work_dir)  # TFT output, checkpoints, original export: all gone
    return run


def _signature(run: PlantedRun):
    return tf.saved_model.load(os.path.join(run.model_dir, features.EXPORT_DIR)).signatures[
        features.RECOMMEND_SIGNATURE]


def test_top_k_holds_the_planted_favourites_and_never_a_rated_movie(planted):
    users = [str(user) for user in range(1, NUM_USERS + 1)]
    out = _signature(planted)(user_id=tf.constant(users + ['stranger']), k=tf.constant(5))
    movie_ids = out[features.MOVIE_IDS].numpy().astype(str)
    in_group = []
    for user, row in zip(users, movie_ids[:-1]):
        assert not set(row) & planted.train_movies[user]
        in_group += [int(movie) % 2 == int(user) % 2 for movie in row]
    assert np.mean(in_group) >= 0.9  # chance: 0.5
    assert out[features.FALLBACK].numpy().tolist() == [False] * NUM_USERS + [True]
    assert all(movie_ids[-1])  # the stranger gets a full list too
    scores = out[features.SCORES].numpy()
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first


def test_table_for_one_user_lists_rank_id_title_and_score(planted, capsys):
    assert recommend.main(['--model-dir', planted.model_dir, '--user', '3', '-k', '5']) == 0
    lines = capsys.readouterr().out.splitlines()
    out = _signature(planted)(user_id=tf.constant(['3']), k=tf.constant(5))
    movie_ids = out[features.MOVIE_IDS].numpy()[0].astype(str).tolist()
    scores = out[features.SCORES].numpy()[0]
    ratings = out[features.PREDICTED_RATINGS].numpy()[0]
    width = max(len('title'), *(len(_title(movie)) for movie in movie_ids))
    assert lines == [
        'user 3: best movies not rated in training',
        f'rank  movie id  {"title":<{width}}  score  rating',
        *(f'{rank:>4}  {movie:<8}  {_title(movie):<{width}}  {score:>5.2f}  {rating:>6.2f}'
          for rank, (movie, score, rating) in enumerate(zip(movie_ids, scores, ratings),
                                                         start=1))]
    assert not set(movie_ids) & planted.train_movies['3']


def test_json_for_a_users_file_on_the_export_dir(planted, tmp_path, capsys):
    users_file = tmp_path / 'users.txt'
    users_file.write_text('3\n\nstranger\n', encoding='utf-8')
    export_dir = os.path.join(planted.model_dir, features.EXPORT_DIR)
    assert recommend.main(['--model-dir', export_dir, '--users-file', str(users_file),
                           '-k', '4', '--json']) == 0
    results = json.loads(capsys.readouterr().out)
    assert [(r['user_id'], r['fallback']) for r in results] == [('3', False), ('stranger', True)]
    for result in results:
        items = result['recommendations']
        assert [item['rank'] for item in items] == [1, 2, 3, 4]
        assert all(item['title'] == _title(item['movie_id']) for item in items)
        assert [item['score'] for item in items] == sorted(
            (item['score'] for item in items), reverse=True)


def test_a_work_dir_is_served_from_its_model_dir(planted, tmp_path, capsys):
    """--model-dir WORK_DIR (not WORK_DIR/model) finds WORK_DIR/model/export."""
    work_dir = tmp_path / 'work'
    work_dir.mkdir()
    (work_dir / features.MODEL_DIR).symlink_to(planted.model_dir)
    flags = ['--user', '3', '-k', '4', '--json']
    assert recommend.main(['--model-dir', planted.model_dir, *flags]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert recommend.main(['--model-dir', str(work_dir), *flags]) == 0
    assert json.loads(capsys.readouterr().out) == expected
    assert recommend.main(['--model-dir', str(tmp_path / 'empty'), *flags]) == 2
    error = capsys.readouterr().err
    assert 'no SavedModel in' in error and f'{tmp_path}/empty/model/export' in error


def test_training_reports_ranking_metrics_and_eval_prediction_counts(planted):
    metrics = features.read_json(os.path.join(planted.model_dir, features.METRICS_FILE))
    ranking = metrics['ranking']
    assert ranking['k'] == 10 and ranking['relevant_rating'] == 4.0
    assert 0 < ranking['users_with_relevant'] <= ranking['users'] <= NUM_USERS
    for name in ('model', 'most_popular', 'fallback'):
        assert set(ranking[name]) == {'precision', 'recall', 'ndcg', 'coverage'}
        assert all(0.0 <= value <= 1.0 for value in ranking[name].values())
    # Exposure is uniform here, so taste is all there is to find.
    assert ranking['model']['ndcg'] > ranking['most_popular']['ndcg'] + 0.1
    assert f'NDCG {ranking["model"]["ndcg"]:.4f}' in planted.summary
    with open(os.path.join(planted.model_dir, features.EVAL_PREDICTIONS_FILE),
              encoding='utf-8') as f:
        header, *rows = f.read().splitlines()
    assert header == ','.join(features.EVAL_PREDICTIONS_COLUMNS)
    assert len(rows) == 5 * 40  # 5 true ratings x 0.1-star bins over [1, 5]
    assert sum(int(row.split(',')[-1]) for row in rows) == metrics['eval_ratings']


def _save_rating_only_export(path: str) -> None:
    module = tf.Module()
    module.serve = tf.function(lambda user_id: {'rating': tf.zeros_like(user_id, tf.float32)},
                               input_signature=[tf.TensorSpec([None], tf.string)])
    tf.saved_model.save(module, path, signatures={'serving_default': module.serve})


@pytest.mark.parametrize('case, expected', [
    ('missing export', 'no SavedModel in'),
    ('missing users file', 'does not exist'),
    ('empty users file', 'holds no user id'),
    ('no recommend signature', "has no 'recommend' signature"),
])
def test_bad_inputs_get_one_line(case, expected, tmp_path, capsys):
    users_file = tmp_path / 'users.txt'
    users_file.write_text('\n\n' if case == 'empty users file' else '3\n')
    model_dir = str(tmp_path / 'model')
    if case == 'no recommend signature':
        _save_rating_only_export(os.path.join(model_dir, features.EXPORT_DIR))
    if case == 'missing users file':
        users_file = tmp_path / 'absent.txt'
    assert recommend.main(['--model-dir', model_dir, '--users-file', str(users_file)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and expected in errors[0] and 'recommend.py: error' in errors[0]


@pytest.mark.parametrize('flags, named', [
    (['-k', '0', '--user', '1'], '-k 0'),
    (['-k', '10001', '--user', '1'], '-k 10001'),
    ([], '--user'),
    (['--user', ' '], '--user'),
])
def test_bad_flags_get_one_line(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recommend.main(['--model-dir', 'anywhere', *flags])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err.strip().splitlines()[-1]


def test_each_listed_movie_carries_the_rating_serving_default_predicts(planted):
    loaded = tf.saved_model.load(os.path.join(planted.model_dir, features.EXPORT_DIR))
    out = loaded.signatures[features.RECOMMEND_SIGNATURE](
        user_id=tf.constant(['3', 'stranger']), k=tf.constant(5))
    for row, user in enumerate(['3', 'stranger']):
        movies = out[features.MOVIE_IDS].numpy()[row]
        served = loaded.signatures['serving_default'](
            user_id=tf.constant([user] * len(movies)), movie_id=tf.constant(movies))
        np.testing.assert_allclose(out[features.PREDICTED_RATINGS].numpy()[row],
                                   served[features.RATING].numpy(), rtol=1e-6)
    # The planted favourites: own-group movies were rated 5, the others 1.
    assert np.all(out[features.PREDICTED_RATINGS].numpy()[0] > 3.0)
