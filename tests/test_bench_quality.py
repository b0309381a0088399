"""bench/quality.py: the split it reads back, the rows that need no Surprise, its flags.

Runs without scikit-surprise (a benchmark-only dependency); the one test that
compares against Surprise is skipped where it is not installed.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import load_script
from trainer import features

quality = load_script('bench/quality.py')

TRAIN_ROWS = [('1', '10', 5.0), ('1', '20', 3.0), ('2', '10', 4.0)]
# User 9 and movie 90 never occur in train.
EVAL_ROWS = [('1', '10', 4.0), ('9', '20', 2.0), ('2', '90', 5.0)]


def _example(user_id: str, movie_id: str, rating: float) -> bytes:
    feature = {
        features.USER: tf.train.Feature(int64_list=tf.train.Int64List(value=[0])),
        features.ITEM: tf.train.Feature(int64_list=tf.train.Int64List(value=[0])),
        features.RATING: tf.train.Feature(float_list=tf.train.FloatList(value=[rating])),
        features.USER_ID: tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[user_id.encode()])),
        features.MOVIE_ID: tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[movie_id.encode()])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _write_split(work_dir: str, split: str, shards: list[list[tuple]]) -> None:
    for index, rows in enumerate(shards):
        path = (f'{features.split_prefix(work_dir, split)}-{index:05d}-of-'
                f'{len(shards):05d}{features.TFRECORD_SUFFIX}')
        with tf.io.TFRecordWriter(path, options='GZIP') as writer:
            for row in rows:
                writer.write(_example(*row))


@pytest.fixture
def preprocessed(work_dir: str) -> str:
    """A work dir as preprocess.py and the trainer leave it, with hand-written rows."""
    os.makedirs(features.transformed_dir(work_dir))
    _write_split(work_dir, features.TRAIN, [TRAIN_ROWS[:2], TRAIN_ROWS[2:]])
    _write_split(work_dir, features.EVAL, [EVAL_ROWS])
    features.write_json(
        features.join(features.transformed_dir(work_dir), features.DATASET_INFO_FILE),
        features.DatasetInfo(
            dataset='synthetic', layout='ml-100k', seed=42, eval_percent=50.0,
            rows_read=6, rows_accepted=6, rows_rejected=0, rejected_by_reason={},
            train_ratings=3, eval_ratings=3, users=2, movies=2, train_mean_rating=4.0,
            global_mean_eval_rmse=float(np.sqrt(2 / 3)), rating_min=1.0, rating_max=4.2,
            train_pattern=features.split_pattern(work_dir, features.TRAIN),
            eval_pattern=features.split_pattern(work_dir, features.EVAL),
            noise_floor_rmse=0.5))
    os.makedirs(features.default_model_dir(work_dir))
    features.write_json(
        features.join(features.default_model_dir(work_dir), features.METRICS_FILE),
        {'eval_rmse': 0.7, 'eval_mae': 0.6, 'train_seconds': 1.5, 'epochs': 12,
         'epochs_this_run': 12, 'config': {'num_factors': 16, 'optimizer': 'adam'}})
    return work_dir


def test_read_split_returns_every_rating_in_shard_order(preprocessed):
    split = quality.read_split(
        features.split_pattern(preprocessed, features.TRAIN), batch_size=2)
    assert split.user_ids.tolist() == ['1', '1', '2']
    assert split.movie_ids.tolist() == ['10', '20', '10']
    np.testing.assert_allclose(split.ratings, [5.0, 3.0, 4.0])


def test_a_split_that_disagrees_with_dataset_info_is_refused(preprocessed):
    info = features.read_dataset_info(preprocessed)
    train = quality.read_split(features.split_pattern(preprocessed, features.TRAIN))
    test = quality.read_split(features.split_pattern(preprocessed, features.EVAL))
    quality.check_split(train, test, info)
    short = quality.Split(train.user_ids[:2], train.movie_ids[:2], train.ratings[:2])
    with pytest.raises(ValueError, match='read 2 train and 3 eval ratings'):
        quality.check_split(short, test, info)


def test_baselines_match_a_hand_computed_epoch():
    train = quality.Split(*(np.array(column) for column in zip(*TRAIN_ROWS)))
    test = quality.Split(*(np.array(column) for column in zip(*EVAL_ROWS)))
    model = quality.fit_baselines(train, reg_item=1.0, reg_user=1.0, epochs=1)
    # mu = 4; b_10 = (1 + 0) / 3, b_20 = -1 / 2; then
    # b_1 = ((1 - 1/3) + (-1 + 1/2)) / 3 = 1/18, b_2 = (0 - 1/3) / 2 = -1/6.
    np.testing.assert_allclose(model['item_bias'], [1 / 3, -1 / 2])
    np.testing.assert_allclose(model['user_bias'], [1 / 18, -1 / 6])
    predictions = quality.predict_baselines(model, test, rating_min=1.0, rating_max=4.2)
    # 4 + 1/18 + 1/3 = 4.39 is clipped; unknown user 9 and movie 90 add nothing.
    np.testing.assert_allclose(predictions, [4.2, 4.0 - 0.5, 4.0 - 1 / 6])
    assert quality.unknown_counts(train, test) == {
        'unknown_user': 1, 'unknown_movie': 1, 'unknown_either': 2}


def test_the_report_without_surprise_has_mean_baselines_trainer_and_floor(
        preprocessed, tmp_path):
    json_out = str(tmp_path / 'report.json')
    assert quality.main(['--work-dir', preprocessed, '--skip-pipeline',
                         '--skip-surprise', '--json-out', json_out]) == 0
    with open(json_out, encoding='utf-8') as f:
        report = json.load(f)
    rows = {row['model']: row for row in report['rows']}
    assert list(rows) == ['global mean', 'baselines (numpy ALS)', 'this trainer',
                          'noise floor (planted model)']
    # Train mean 4 against eval ratings 4, 2, 5.
    assert rows['global mean']['rmse'] == pytest.approx(np.sqrt(5 / 3))
    assert rows['global mean']['mae'] == pytest.approx(1.0)
    assert rows['this trainer']['rmse'] == pytest.approx(0.7)
    assert rows['this trainer']['fit_seconds'] == pytest.approx(1.5)
    assert rows['noise floor (planted model)']['rmse'] == pytest.approx(0.5)
    assert report['eval_unknown']['unknown_either'] == 2


def test_numpy_baselines_match_surprise_baseline_only():
    surprise = pytest.importorskip('surprise')
    rng = np.random.default_rng(0)
    users = rng.integers(0, 30, 600).astype(str)
    movies = rng.integers(0, 40, 600).astype(str)
    ratings = rng.integers(1, 6, 600).astype(np.float64)
    train = quality.Split(users[:500], movies[:500], ratings[:500])
    test = quality.Split(users[500:], movies[500:], ratings[500:])
    algo = surprise.BaselineOnly(verbose=False)
    algo.fit(quality.to_trainset(train, 1.0, 5.0))
    expected = quality.surprise_predict(algo, test)
    model = quality.fit_baselines(train)
    np.testing.assert_allclose(quality.predict_baselines(model, test, 1.0, 5.0), expected,
                               rtol=1e-9)


def test_flags_become_the_commands_a_user_would_type(tmp_path):
    config = quality.parse_args([
        '--work-dir', str(tmp_path), '--num-ratings', '5000', '--synthetic-layout',
        'ml-1m', '--eval-percent', '10', '--overwrite', '--', '--num-epochs', '3',
        '--job-dir', '/elsewhere'])
    extract, preprocess, train = quality.pipeline_commands(config)
    assert extract[1:] == ['data-extractor.py', '--work-dir', str(tmp_path), '--dataset',
                           'synthetic', '--num-ratings', '5000', '--synthetic-layout',
                           'ml-1m', '--overwrite']
    assert preprocess[1:] == ['preprocess.py', '--work-dir', str(tmp_path),
                              '--eval-percent', '10.0', '--overwrite']
    assert train[1:] == ['-m', 'trainer.task', '--work-dir', str(tmp_path), '--overwrite',
                         '--num-epochs', '3', '--job-dir', '/elsewhere']
    assert quality.model_dir(config) == '/elsewhere'


def test_selection_bias_goes_to_the_extractor(tmp_path):
    config = quality.parse_args(['--work-dir', str(tmp_path), '--num-users', '200',
                                 '--selection-bias', '2'])
    assert config.extractor_flags == ('--num-users', '200', '--selection-bias', '2.0')
    extract = quality.pipeline_commands(config)[0]
    assert extract[-2:] == ['--selection-bias', '2.0']


@pytest.mark.parametrize('argv, message', [
    (['--dataset', 'ml-100k', '--num-users', '5'], '--num-users applies to --dataset synthetic'),
    (['--dataset', 'ml-100k', '--selection-bias', '2'],
     '--selection-bias applies to --dataset synthetic'),
    (['--validation-percent', '100'], '--validation-percent 100.0 must lie in'),
])
def test_bad_flags_are_refused_with_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        quality.parse_args(['--work-dir', str(tmp_path), *argv])
    assert message in capsys.readouterr().err


def test_the_svdpp_probe_takes_whole_users_and_scales_by_squared_counts():
    train = quality.Split(*(np.array(column) for column in zip(*TRAIN_ROWS)))
    probe, scale = quality.probe_users(train, max_ratings=2)
    assert probe.user_ids.tolist() == ['1', '1']
    # User 1 has 2 ratings, user 2 has 1: (4 + 1) / 4.
    assert scale == pytest.approx(1.25)


def test_the_trainer_row_names_implicit_feedback():
    metrics = {'eval_rmse': 0.9, 'eval_mae': 0.7, 'train_seconds': 1.5, 'epochs': 12,
               'config': {'num_factors': 16, 'implicit_feedback': True, 'implicit_l2': 0.48}}
    (row,) = quality.trainer_rows(metrics)
    assert row.note.endswith(', implicit feedback (l2 0.48)')
    metrics['config']['implicit_feedback'] = False
    assert 'implicit' not in quality.trainer_rows(metrics)[0].note


def test_posterior_averaging_adds_the_trained_model_row_and_the_ratio_line():
    metrics = {'eval_rmse': 0.9, 'eval_mae': 0.7, 'train_seconds': 1.5, 'epochs': 12,
               'config': {'num_factors': 16},
               'posterior': {'samples': 100, 'burn_in': 10, 'seconds': 2.0,
                             'before': {'eval_rmse': 0.92, 'eval_mae': 0.72}}}
    trained, final = quality.trainer_rows(metrics)
    assert (trained.model, trained.rmse, trained.fit_seconds) == (
        'this trainer, trained model', 0.92, 1.5)
    assert (final.model, final.rmse, final.fit_seconds) == ('this trainer', 0.9, 3.5)
    rows = [quality.Row('Surprise SVD (tuned)', 0.95, 0.8, 1.0),
            quality.Row('Surprise SVD++ (defaults)', 0.93, 0.8, 9.0), trained, final]
    table = quality.format_table({
        'dataset': 'synthetic', 'layout': 'ml-100k', 'train_ratings': 8,
        'eval_ratings': 2, 'users': 2, 'movies': 2,
        'eval_unknown': {'unknown_either': 0, 'unknown_user': 0, 'unknown_movie': 0},
        'rows': [dataclasses.asdict(row) for row in rows]})
    assert table.splitlines()[-1] == (
        'this trainer / best of Surprise SVD (tuned), Surprise SVD++ (defaults) '
        '(Surprise SVD++ (defaults)): 0.9677x')
