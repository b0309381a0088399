"""bench/ranking.py, and the served lists end to end, on small taste-driven data.

The pipeline runs as a user runs it (data-extractor.py, preprocess.py, the
trainer) on generated data whose 400 users pick among 800 movies by popularity
and by taste, as MovieLens users do.
Then:

- the lists the exported `recommend` signature serves, called for every eval
  user with raw ids as recommend.py does, score exactly the NDCG the trainer
  wrote to metrics.json: what is measured is what is served;
- they beat the most-popular list and the lists ranked by predicted rating by
  a clear margin (measured: NDCG@10 0.292 against 0.256 and 0.048);
- the rivals that need no benchmark-only package (most popular, item kNN,
  EASE) are tuned on the validation slice and scored on the same users.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import preprocess
from conftest import load_script
from trainer import config, features, task

data_extractor = load_script('data-extractor.py')
bench = load_script('bench/ranking.py')


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> str:
    work_dir = str(tmp_path_factory.mktemp('ranking') / 'work')
    assert data_extractor.main([
        '--work-dir', work_dir, '--dataset', 'synthetic', '--num-users', '400',
        '--num-movies', '800', '--num-ratings', '25000', '--seed', '5']) == 0
    assert preprocess.main(['--work-dir', work_dir]) == 0
    assert task.main(['--work-dir', work_dir, '--posterior-samples', '0']) == 0
    return work_dir


def test_served_lists_score_what_the_trainer_measured(trained):
    tuning, final, facts = bench.load_problems(trained)
    row = bench.served_row(trained, features.default_model_dir(trained), final, 0,
                           facts['seed'])
    metrics = features.read_json(features.join(features.default_model_dir(trained),
                                               features.METRICS_FILE))
    ranked = metrics['ranking']
    for name in ('ndcg', 'precision', 'recall', 'coverage'):
        assert row[name] == pytest.approx(ranked['model'][name], abs=1e-9), name
    assert ranked['model']['ndcg'] > 1.08 * ranked['most_popular']['ndcg'], ranked
    assert ranked['model']['ndcg'] > 3.0 * ranked['rating_model']['ndcg'], ranked
    topn = metrics['topn']
    assert topn['refit'] and topn['model'] in ('ials', 'ease', 'blend')
    # The default run chose its model on validation and says what it tried.
    search = topn['search']
    assert search['family'] == topn['model'] and len(search['table']) >= 3
    best = max(row['validation_ndcg'] for row in search['table'] if row['stage'] == 'score')
    assert topn['validation_ndcg'] == search['validation_ndcg']
    assert (search['validation_ndcg'] <= best) if search['kept_flags'] else (
        search['validation_ndcg'] == pytest.approx(best))
    if topn['model'] != 'ials':  # the refit is the searched EASE point, dropout and form
        assert (topn['ease_lambda'], topn['ease_dropout'], topn['ease_form']) == (
            search['ease_lambda'], search['ease_dropout'], search['ease_form'])


@pytest.mark.parametrize('model, dropout, form', [
    ('ease', '0', 'ease'), ('ease', '0.5', 'ease'), ('ease', '0.25', 'dlae'),
    ('ials', '0', 'ease'), ('blend', '0', 'ease')])
def test_each_top_n_family_serves_what_the_trainer_measured(trained, tmp_path, model, dropout,
                                                            form):
    model_dir = str(tmp_path / model)
    assert task.main(['--work-dir', trained, '--job-dir', model_dir, '--posterior-samples', '0',
                      '--topn-model', model, '--topn-search', 'off', '--num-epochs', '4',
                      '--ease-dropout', dropout, '--ease-form', form]) == 0
    metrics = features.read_json(features.join(model_dir, features.METRICS_FILE))
    assert metrics['topn']['model'] == model and metrics['topn']['search'] is None
    assert (metrics['topn'].get('ease_lambda') is not None) == (model != 'ials')
    if model != 'ials':
        assert metrics['topn']['ease_dropout'] == float(dropout)
        assert metrics['topn']['ease_form'] == form
        assert metrics['topn']['ease_user_exponent'] == config.TrainConfig.ease_user_exponent
    tuning, final, facts = bench.load_problems(trained)
    row = bench.served_row(trained, model_dir, final, 0, facts['seed'])
    for name in ('ndcg', 'precision', 'recall', 'coverage'):
        assert row[name] == pytest.approx(metrics['ranking']['model'][name], abs=1e-9), name
    assert row['ndcg'] > metrics['ranking']['most_popular']['ndcg']


@pytest.mark.parametrize('weight, confidence', [('0.5', '0'), ('0', '1')])
def test_with_any_like_weight_the_served_lists_score_what_the_trainer_measured(
        trained, tmp_path, weight, confidence):
    # --topn-like-weight moves the served score into the SavedModel's graph
    # (the rating model's P(rating >= 4) times the top-N score): the export and
    # the trainer's evaluation must still rank alike.  Weight 0 (with confidence 1,
    # as docs/evaluation.md suggests for it) serves the top-N score alone.
    model_dir = str(tmp_path / 'liked')
    assert task.main(['--work-dir', trained, '--job-dir', model_dir, '--posterior-samples', '0',
                      '--topn-confidence', confidence, '--topn-like-weight', weight,
                      '--topn-search', 'off']) == 0
    metrics = features.read_json(features.join(model_dir, features.METRICS_FILE))
    like = metrics['topn'].get('like')
    if float(weight):
        assert like['weight'] == float(weight) and like['cut'] == 3.5
        assert like['noise'] == pytest.approx(metrics['validation_rmse'])
    else:
        assert like is None or like['weight'] == 0
    tuning, final, facts = bench.load_problems(trained)
    row = bench.served_row(trained, model_dir, final, 0, facts['seed'])
    for name in ('ndcg', 'precision', 'recall', 'coverage'):
        assert row[name] == pytest.approx(metrics['ranking']['model'][name], abs=1e-9), name
    default = features.read_json(features.join(features.default_model_dir(trained),
                                               features.METRICS_FILE))
    assert row['ndcg'] > 1.08 * default['ranking']['most_popular']['ndcg']


def test_rivals_are_tuned_on_validation_and_scored_on_eval(trained, capsys, tmp_path):
    tuning, final, facts = bench.load_problems(trained)
    assert tuning.ratings.size + tuning.target.rating.shape[0] == final.ratings.size
    rivals = {rival.name: rival for rival in bench.rivals(facts['movies'], 20_000, True, 0)}
    popular = bench.tune_and_score(rivals['most popular'], tuning, final, 0, facts['seed'])
    ease = bench.tune_and_score(rivals['EASE, graded'], tuning, final, 0, facts['seed'])
    assert ease['settings']['lam'] in bench.QUICK['ease']
    assert ease['validation_ndcg'] > 0 and ease['ndcg'] > popular['ndcg']
    counts = np.bincount(final.items, minlength=final.num_items)
    assert popular['ndcg'] == pytest.approx(final.ndcg_etc(counts.astype(float), 0, 0)['ndcg'])


def test_the_command_prints_the_table_and_writes_json(trained, capsys, tmp_path):
    out = tmp_path / 'ranking.json'
    assert bench.main(['--work-dir', trained, '--quick', '--no-implicit',
                       '--json-out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'this trainer: the lists recommend serves' in printed
    assert 'served NDCG@10 / best rival' in printed
    report = json.loads(out.read_text())
    assert [row['name'] for row in report['rows']][:2] == [
        'this trainer: the lists recommend serves', 'most popular']
    assert report['users'] == 400 and report['movies'] <= 800
    assert not any('implicit' in row['name'] for row in report['rows'])
    # Generated data: the planted Bayes ranking of the same users tops every row.
    assert 'served NDCG@10 / planted ceiling' in printed
    ceiling = report['ceiling']
    assert ceiling['name'].startswith('planted Bayes ranking')
    assert ceiling['ndcg'] > max(row['ndcg'] for row in report['rows'])
    # The served lists' share of it: the ceiling knows the franchises each
    # user follows, also those with no movie in the user's train ratings.
    share = report['rows'][0]['ndcg'] / ceiling['ndcg']
    print(f'served / planted ceiling: {share:.3f}')
    assert 0.3 < share < 1.0, share


def test_no_ceiling_without_a_planted_truth(trained, tmp_path):
    tuning, final, facts = bench.load_problems(trained)
    assert bench.planted_row(str(tmp_path), final, 0, facts['seed'], 20.0) is None


def test_rivals_can_be_chosen_by_name(trained, capsys, tmp_path):
    out = tmp_path / 'some.json'
    assert bench.main(['--work-dir', trained, '--quick', '--rival', 'most popular',
                       '--rival', 'EASE, graded', '--json-out', str(out)]) == 0
    names = [row['name'] for row in json.loads(out.read_text())['rows']]
    assert names == ['this trainer: the lists recommend serves', 'most popular', 'EASE, graded']
    with pytest.raises(SystemExit):
        bench.main(['--work-dir', trained, '--rival', 'SLIM'])
    assert '--rival' in capsys.readouterr().err


def test_a_work_dir_without_a_trained_model_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(['--work-dir', str(tmp_path)])
    assert exit_info.value.code == 2
    assert 'run ./run-local.sh --work-dir' in capsys.readouterr().err


@pytest.mark.parametrize('name', ['implicit ALS, weighted', 'implicit BPR, rated >= 4'])
def test_implicits_rivals_train_on_the_same_split(trained, name):
    tuning, final, facts = bench.load_problems(trained)
    rivals = {rival.name: rival for rival in bench.rivals(facts['movies'], 20_000, True, 0)}
    row = bench.tune_and_score(rivals[name], tuning, final, 0, facts['seed'])
    counts = np.bincount(final.items, minlength=final.num_items).astype(float)
    popular = final.ndcg_etc(counts, 0, 0)['ndcg']
    assert row['fit_seconds'] > 0 and 0 <= row['coverage'] <= 1
    if 'ALS' in name:  # a real top-N model: it must beat most popular on taste-driven data
        assert row['ndcg'] > popular, (row['ndcg'], popular)
    else:  # BPR's 100 epochs at lr 0.01 do not get far on 25k ratings; it still ranks
        chance = final.ndcg_etc(np.random.default_rng(0).random(final.num_items), 0, 0)['ndcg']
        assert row['ndcg'] > 2 * chance, (row['ndcg'], chance)
