"""Tests of trainer/task.py: main() from a preprocessed work dir to export and summary."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

import preprocess
from conftest import served_rmse, strict_json
from trainer import config, features, task, tune
from trainer.pipeline import synthetic
from trainer.serving import export

LAYOUT = features.ML_100K


@pytest.fixture(scope='module')
def preprocessed(tmp_path_factory) -> str:
    """A work dir after preprocess.py ran on 1,500 staged synthetic ratings, of the
    generator before franchises and interest (commit a19b3ff): on these the search
    keeps iALS, which the summary tests below name."""
    work_dir = str(tmp_path_factory.mktemp('work'))
    ratings = synthetic.generate(synthetic.SyntheticConfig(
        num_users=60, num_movies=60, num_ratings=1_500, seed=2, noise_std=0.5,
        movie_popularity_sigma=1.15, selection_bias=1.0, **synthetic.EXPOSURE_LEGACY))
    raw_dir = features.raw_dir(work_dir)
    os.makedirs(raw_dir)
    lines = [f'{u}\t{m}\t{int(r)}\t{t}\n' for u, m, r, t in zip(
        ratings.user_ids, ratings.movie_ids, ratings.ratings, ratings.timestamps)]
    with open(os.path.join(raw_dir, LAYOUT.ratings_file), 'w', encoding='utf-8') as f:
        f.writelines(lines)
    features.write_json(os.path.join(raw_dir, features.SOURCE_FILE), features.SourceInfo(
        dataset=features.SYNTHETIC, layout=LAYOUT.name, source='test', md5=''))
    assert preprocess.main(['--work-dir', work_dir]) == 0
    return work_dir


def test_main_trains_exports_and_summarises(preprocessed, tmp_path, monkeypatch, capsys):
    aip_model_dir = str(tmp_path / 'aip-model')
    monkeypatch.setenv(config.ENV_MODEL_DIR, aip_model_dir)
    model_dir = str(tmp_path / 'model')
    assert task.main(['--work-dir', preprocessed, '--job-dir', model_dir,
                      '--num-epochs', '3', '--batch-size', '64',
                      '--learning-rate', '0.02', '--num-factors', '4']) == 0

    with open(os.path.join(model_dir, features.LOSS_LOG_FILE), encoding='utf-8') as f:
        log = f.read().splitlines()
    assert log[0] == ','.join(features.LOSS_LOG_COLUMNS)
    assert [line.split(',')[0] for line in log[1:]] == ['1', '2', '3']

    info = features.read_dataset_info(preprocessed)
    with open(os.path.join(model_dir, features.METRICS_FILE), encoding='utf-8') as f:
        metrics = strict_json(f.read())  # no NaN: the posterior's validation is null
    assert metrics['posterior']['before']['validation_mae'] is None  # refit: no validation
    assert metrics['epochs'] == 3 and metrics['epochs_this_run'] == 3
    assert metrics['eval_rmse'] < info.global_mean_eval_rmse
    assert metrics['global_mean_eval_rmse'] == pytest.approx(info.global_mean_eval_rmse)
    assert metrics['export_dir'] == aip_model_dir
    assert metrics['ratings_per_second'] > 0
    assert metrics['config']['num_factors'] == 4
    # Where the time went: every phase this run had, each positive, within the wall time.
    seconds = metrics['phase_seconds']
    assert set(seconds) == {'load', 'rating_epochs', 'refit', 'posterior', 'topn_search',
                            'topn_train', 'topn_refit', 'topn_validation', 'export', 'ranking',
                            'eval_predictions'}
    assert all(value > 0 for value in seconds.values())
    assert sum(seconds.values()) <= metrics['wall_seconds']

    # The export serves the model metrics.json scored: its eval RMSE, rating by rating.
    signature = tf.saved_model.load(aip_model_dir).signatures[export.SIGNATURE]
    assert served_rmse(signature, preprocessed) == pytest.approx(metrics['eval_rmse'], rel=1e-4)
    rating = signature(user_id=tf.constant(['1', 'nobody']),
                       movie_id=tf.constant(['1', '1']))[features.RATING].numpy()
    assert rating.shape == (2,) and np.all((rating >= 1) & (rating <= 5))
    assert not os.path.exists(os.path.join(model_dir, features.EXPORT_DIR))

    summary = capsys.readouterr().out
    assert f'eval RMSE {metrics["eval_rmse"]:.4f}' in summary
    assert f'predicting the train mean: {info.global_mean_eval_rmse:.4f}' in summary
    # Posterior averaging (on by default) is reported with the model it started from.
    before = metrics['posterior']['before']['eval_rmse']
    assert metrics['posterior']['noise'] == 'user-movie'
    assert ('\n  then its posterior mean: 100 Gibbs sweeps after 20 burn-in, a noise level '
            'per user and per movie' in summary
            and f'the trained model alone scored eval RMSE {before:.4f}\n' in summary)
    assert f'  seconds: load shards {seconds["load"]:.1f}, ' in summary
    assert f'of {metrics["wall_seconds"]:.1f} s)' in summary
    for path in (aip_model_dir, os.path.join(model_dir, features.LOSS_LOG_FILE),
                 os.path.join(model_dir, features.METRICS_FILE)):
        assert path in summary

    # Resuming that run with another shape is refused in one line.
    assert task.main(['--work-dir', preprocessed, '--job-dir', model_dir,
                      '--num-factors', '5']) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and '--overwrite' in errors[0]


def test_implicit_feedback_exports_a_plain_model(preprocessed, tmp_path, capsys):
    model_dir = str(tmp_path / 'model')
    assert task.main(['--work-dir', preprocessed, '--job-dir', model_dir,
                      '--num-epochs', '2', '--batch-size', '64', '--num-factors', '4',
                      '--implicit-feedback', '--posterior-samples', '5']) == 0
    metrics = features.read_json(os.path.join(model_dir, features.METRICS_FILE))
    settings = metrics['config']
    assert settings['implicit_feedback'] and settings['implicit_l2'] == pytest.approx(
        config.IMPLICIT_L2_FACTOR * settings['l2'], abs=1e-4)
    summary = capsys.readouterr().out
    assert (f"\n  with implicit feedback (--implicit-l2 {settings['implicit_l2']:g}), folded "
            'into the user factors for export\n') in summary
    saved = tf.train.list_variables(os.path.join(metrics['export_dir'], 'variables',
                                                 'variables'))
    assert saved and not [name for name, _ in saved if 'implicit' in name]
    served = tf.saved_model.load(metrics['export_dir']).signatures[export.SIGNATURE](
        user_id=tf.constant(['1']), movie_id=tf.constant(['1']))
    assert served[features.RATING].numpy().shape == (1,)


@pytest.mark.parametrize('flags, served', [
    ([], 'topn'), (['--validation-percent', '0'], 'topn'), (['--topn-model', 'rating'], None)])
def test_the_summary_and_metrics_name_the_lists_recommend_serves(preprocessed, tmp_path,
                                                                 capsys, flags, served):
    model_dir = str(tmp_path / 'model')
    assert task.main(['--work-dir', preprocessed, '--job-dir', model_dir, '--num-epochs', '2',
                      '--batch-size', '64', '--num-factors', '4', '--posterior-samples', '0',
                      '--topn-iterations', '3', *flags]) == 0
    metrics = features.read_json(os.path.join(model_dir, features.METRICS_FILE))
    summary = capsys.readouterr().out
    ranked = metrics['ranking']
    if served is None:  # ranked by predicted rating, as before the top-N model
        assert metrics['topn'] is None and 'rating_model' not in ranked
        assert 'top-N lists' not in summary
        return
    record = metrics['topn']
    assert record['model'] == 'ials' and 1 <= record['iterations'] <= 3
    assert 'rating_model' in ranked
    assert f"ranked by predicted rating: precision {ranked['rating_model']['precision']:.4f}" \
        in summary
    if '--validation-percent' in flags:  # nothing to choose by: all 3 iterations, no refit
        assert record['validation_ndcg'] is None and not record['refit']
        assert record['iterations'] == 3
        assert 'top-N lists: iALS, 64 factors, 3 iterations, watched targets (' in summary
    else:
        assert 0 <= record['validation_ndcg'] <= 1 and record['refit']
        assert f"(best by validation NDCG@10 {record['validation_ndcg']:.4f})" in summary


def test_main_without_preprocessing_says_what_to_run(work_dir, capsys):
    assert task.main(['--work-dir', work_dir]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1
    assert 'preprocess.py' in errors[0] and features.DATASET_INFO_FILE in errors[0]


RANKING_SPACE = str(tune.DEFAULT_SPACE.with_name('hptuning-ranking.yaml'))


@pytest.mark.parametrize('path, metric, names', [
    (str(tune.DEFAULT_SPACE), 'validation_rmse', ['learning-rate', 'num-factors', 'l2']),
    (RANKING_SPACE, 'validation_ndcg', ['topn-factors', 'topn-l2', 'topn-unobserved-weight'])])
def test_each_search_space_names_trainer_flags_and_its_metric(path, metric, names):
    space, chosen = tune.read_space(path)
    assert [parameter.name for parameter in space] == names and chosen.name == metric
    parser_flags = {action.option_strings[0] for action in config.build_parser()._actions
                    if action.option_strings}
    assert {f'--{parameter.name}' for parameter in space} <= parser_flags
    for parameter in space:  # every bound is a value the trainer's flag accepts
        for bound in (parameter.low, parameter.high):
            if bound > 0:
                config.parse_args(['--work-dir', 'w', f'--{parameter.name}',
                                   str(int(bound) if parameter.integer else bound)], environ={})


def test_the_search_space_is_the_cloud_tuning_jobs_and_its_ids_are_trainer_flags():
    space, _ = tune.read_space(str(tune.DEFAULT_SPACE))
    trials = tune.draw_trials(space, 20, seed=5)
    assert trials[0] == {} and trials == tune.draw_trials(space, 20, seed=5)
    for flags in trials[1:]:
        for parameter in space:
            assert parameter.low <= flags[parameter.name] <= parameter.high
        assert isinstance(flags['num-factors'], int)
    # Log-uniform: the learning rate's draws spread over its decades.
    rates = [flags['learning-rate'] for flags in tune.draw_trials(space, 200, seed=1)[1:]]
    assert min(rates) < 0.001 and max(rates) > 0.03


def test_tune_ranks_trials_by_validation_and_refuses_to_mix_searches(
        preprocessed, tmp_path, capsys):
    job_dir = str(tmp_path / 'search')
    flags = ['--work-dir', preprocessed, '--job-dir', job_dir, '--trials', '3',
             '--num-epochs', '3', '--batch-size', '64', '--num-factors', '4']
    assert tune.main(flags) == 0
    out = capsys.readouterr().out
    results = features.read_json(os.path.join(job_dir, tune.RESULTS_FILE))
    trials = results['trials']
    assert [trial['trial'] for trial in trials] == [0, 1, 2]
    assert trials[0]['flags'] == {}
    assert all(np.isfinite(trial['validation_rmse']) for trial in trials)
    assert len({trial['validation_rmse'] for trial in trials}) == 3
    best = min(trials, key=lambda trial: trial['validation_rmse'])
    assert f'best validation RMSE {best["validation_rmse"]:.4f}' in out
    table = [line.split()[0] for line in out.splitlines()[1:4]]
    assert table == [str(trial['trial']) for trial in
                     sorted(trials, key=lambda trial: trial['validation_rmse'])]
    assert f'.venv/bin/python -m trainer.task --work-dir {preprocessed} --num-epochs 3' in out
    assert '--job-dir' not in out.splitlines()[-1]
    # A second search into the same dir would mix two searches: refused.
    assert tune.main(flags) == 2
    assert '--overwrite' in capsys.readouterr().err
    assert tune.main(flags + ['--overwrite']) == 0


def test_tune_for_the_ranking_metric_trains_the_top_n_model_alone(preprocessed, tmp_path,
                                                                 capsys):
    job_dir = str(tmp_path / 'ranking-search')
    assert tune.main(['--work-dir', preprocessed, '--job-dir', job_dir, '--trials', '3',
                      '--space', RANKING_SPACE, '--topn-iterations', '3']) == 0
    out = capsys.readouterr().out
    results = features.read_json(os.path.join(job_dir, tune.RESULTS_FILE))
    assert results['metric'] == 'validation_ndcg'
    trials = results['trials']
    assert all(0 <= trial['validation_ndcg'] <= 1 and 'validation_rmse' not in trial
               for trial in trials)
    best = max(trials, key=lambda trial: trial['validation_ndcg'])
    assert f'best validation NDCG@10 {best["validation_ndcg"]:.4f}' in out
    table = [line.split()[0] for line in out.splitlines()[1:4]]
    assert table == [str(trial['trial']) for trial in
                     sorted(trials, key=lambda trial: -trial['validation_ndcg'])]
    # No rating model was trained: no loss log in any trial.
    assert not list(tmp_path.glob('ranking-search/*/' + features.LOSS_LOG_FILE))


def test_tune_without_a_validation_slice_is_refused_in_one_line(preprocessed, capsys):
    with pytest.raises(SystemExit) as stop:
        tune.main(['--work-dir', preprocessed, '--validation-percent', '0'])
    assert stop.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert '--validation-percent 10' in errors[-1]
