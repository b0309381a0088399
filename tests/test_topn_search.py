"""Tests of the top-N search (trainer/topn/search.py) on data with a planted answer.

The planted case: 120 movies in 60 pairs of near-duplicates (a film and its
re-release).  Each user watches both halves of five pairs; the validation
slice holds one half of two of them, so the right list for a user is the
other halves of the pairs they started: an item-item model finds them from
one neighbour, while a low-rank model of 4 or 8 factors cannot hold 60
independent pairs.  On a tiny grid the search must therefore pick EASE.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from trainer import config as config_lib
from trainer import data
from trainer.rating.train import Splits
from trainer.topn import ease, lists, ranking, search as topn_search

USERS, PAIRS, PAIRS_PER_USER, HELD_OUT = 200, 60, 5, 2


def _ratings(users, items, ratings) -> data.Ratings:
    order = np.lexsort((items, users))
    return data.Ratings(tf.constant(np.asarray(users)[order], tf.int32),
                        tf.constant(np.asarray(items)[order], tf.int32),
                        tf.constant(np.asarray(ratings)[order], tf.float32))


@pytest.fixture(scope='module')
def splits() -> Splits:
    rng = np.random.default_rng(0)
    fit, validation = [], []
    for user in range(USERS):
        for number, pair in enumerate(rng.choice(PAIRS, PAIRS_PER_USER, replace=False)):
            first, second = 2 * pair, 2 * pair + 1
            rating = float(rng.integers(4, 6))
            fit.append((user, first, rating))
            (validation if number < HELD_OUT else fit).append((user, second, rating))
    fit, validation = np.array(fit), np.array(validation)
    train = np.concatenate([fit, validation])

    def ratings(rows):
        return _ratings(rows[:, 0].astype(int), rows[:, 1].astype(int), rows[:, 2])
    return Splits(ratings(train), ratings(fit), ratings(validation), ratings(validation[:0]))


@pytest.fixture
def tiny_grid(monkeypatch):
    monkeypatch.setattr(topn_search, 'IALS_TRIALS', 2)
    monkeypatch.setattr(topn_search, 'IALS_SPACE', {
        'factors': (4, 8), 'l2_scale': (0.5, 2.0), 'unobserved_scale': (0.5, 2.0),
        'confidence': (0.0, 1.0)})
    monkeypatch.setattr(topn_search, 'EASE_RANGE', (1.0, 64.0))


DEFAULTS = config_lib.TrainConfig  # the flags' defaults (the walk's start)


def _config(tmp_path, **overrides) -> config_lib.TrainConfig:
    values = dict(topn_factors=4, topn_l2=1.0, topn_unobserved_weight=0.05, topn_iterations=4,
                  ease_lambda=8.0, topn_search_seconds=600.0)
    return config_lib.make_config(work_dir='unused', model_dir=str(tmp_path / 'model'),
                                  **{**values, **overrides})


def _table(result: topn_search.SearchResult) -> list:
    return [{key: value for key, value in row.items() if key != 'seconds'}
            for row in result.table]


def test_the_search_picks_the_planted_item_item_model(splits, tiny_grid, tmp_path):
    result = topn_search.search(_config(tmp_path), splits, (USERS, 2 * PAIRS), seed=0)
    assert result.family == 'ease' and result.blend == 1.0 and result.ials is None
    assert result.sample is None and result.ials_trial is None
    stages = [row['stage'] for row in result.table]
    assert stages.count('ials') == 2 and stages.count('ease') >= 2
    best_ials = max(row['validation_ndcg'] for row in result.table if row['stage'] == 'ials')
    assert result.validation_ndcg > 0.9 > best_ials + 0.2
    # The chosen (lambda, dropout, form) is the walk's best point, each scored in both
    # forms; no rating model: no like term.
    rungs = {tuple(row['settings'][key] for key in ('lambda', 'dropout', 'user_exponent',
                                                    'form')): row['validation_ndcg']
             for row in result.table if row['stage'] == 'ease'}
    assert {0.0, 0.25} <= {point[1] for point in rungs}  # the dropout ladder ran
    assert {0.0, 0.5} <= {point[2] for point in rungs}  # and the user exponent's
    assert {(*point[:3], form) for point in rungs for form in ease.FORMS} == set(rungs)
    assert rungs[result.ease_lambda, result.ease_dropout, result.ease_user_exponent,
                 result.ease_form] == max(rungs.values())
    assert result.like_weight == 0.0
    # Every blend weight was tried on the two best models and scored no better.
    blends = [row['settings']['blend'] for row in result.table if row['stage'] == 'score']
    assert sorted(blends) == sorted(topn_search.BLENDS)
    assert result.validation_ndcg == max(row['validation_ndcg'] for row in result.table
                                         if row['stage'] == 'score')


def test_the_chosen_ease_serves_the_ndcg_the_search_measured(splits, tiny_grid, tmp_path):
    result = topn_search.search(_config(tmp_path), splits, (USERS, 2 * PAIRS), seed=0)
    fit = splits.fit
    stored = ease.fit(fit.user.numpy(), fit.item.numpy(), fit.rating.numpy(), USERS,
                      2 * PAIRS, result.ease_lambda, count=200, dropout=result.ease_dropout,
                      form=result.ease_form, user_exponent=result.ease_user_exponent)
    model = lists.ListModel('ease', neighbours=stored, seen_values=ease.user_values(
        fit.user.numpy(), fit.item.numpy(), fit.rating.numpy()), blend=1.0)
    where = topn_search._Slice(fit, splits.validation, USERS, 2 * PAIRS, 5000, 0)
    top = ranking.rank_users(lists.scorer(model, where.seen, 2 * PAIRS), where.judged.users,
                             where.seen, 2 * PAIRS, ranking.TOP_K)
    served = ranking.ranking_metrics(top, where.judged.rows, where.judged.items, 2 * PAIRS,
                                     ranking.TOP_K)['ndcg']
    assert served == pytest.approx(result.validation_ndcg, abs=1e-9)


def test_the_same_seed_searches_the_same_points(splits, tiny_grid, tmp_path):
    first = topn_search.search(_config(tmp_path), splits, (USERS, 2 * PAIRS), seed=3)
    second = topn_search.search(_config(tmp_path), splits, (USERS, 2 * PAIRS), seed=3)
    assert _table(first) == _table(second)
    assert dataclasses.replace(first, table=(), seconds=0, validation_seconds=0) == (
        dataclasses.replace(second, table=(), seconds=0, validation_seconds=0))
    other = topn_search.search(_config(tmp_path), splits, (USERS, 2 * PAIRS), seed=4)
    ials = [row['settings'] for row in other.table if row['stage'] == 'ials']
    assert ials != [row['settings'] for row in first.table if row['stage'] == 'ials']


def test_the_ials_points_draw_their_targets_and_the_config_follows(tmp_path):
    config = _config(tmp_path, topn_target='watched')
    points = topn_search._ials_points(config, seed=0)
    assert points[0]['target'] == 'watched' and len(points) == topn_search.IALS_TRIALS
    drawn = {point['target'] for point in points[1:]}
    assert drawn == set(topn_search.IALS_SPACE['target'])
    weighted = next(point for point in points if point['target'] == 'weighted')
    assert topn_search.ials_config(config, weighted).topn_target == 'weighted'
    assert 'weighted targets' in topn_search.describe(dataclasses.replace(
        _any_result(), ials={**weighted, 'iterations': 3}))


def _any_result() -> topn_search.SearchResult:
    return topn_search.SearchResult(
        family='ials', blend=0.0, like_weight=0.0, ease_lambda=None, ials=None,
        validation_ndcg=0.0, table=(), on_edge=(), kept_flags=False, ease_left_out=None,
        seconds=0.0, budget=1.0, users=0)


def test_a_spent_budget_stops_each_stage_after_its_first_point(splits, tiny_grid, tmp_path,
                                                               caplog):
    caplog.set_level('INFO', logger='trainer.topn.search')
    result = topn_search.search(_config(tmp_path, topn_search_seconds=1e-3), splits,
                                (USERS, 2 * PAIRS), seed=0)
    stages = [row['stage'] for row in result.table]
    # EASE's first point, in each of its forms (one inverse), and iALS's first point.
    assert stages.count('ease') == len(ease.FORMS) and stages.count('ials') == 1
    # The score grid still compares the two families' best, no blend.
    assert [row['settings']['blend'] for row in result.table if row['stage'] == 'score'] == [
        0.0, 1.0]
    assert result.budget == 1e-3
    assert 'the budget ends iALS after 1 of 2 points' in caplog.text
    assert 'the budget ends the score grid after 2 of' in caplog.text


@pytest.mark.parametrize('start', [1.0, 64.0])
def test_the_lambda_ladder_climbs_to_the_best_rung_from_either_side(splits, tmp_path, start,
                                                                    monkeypatch):
    # Measured on this data: validation NDCG rises from lambda 1 (0.79) to 16
    # (0.92) and falls after (32: 0.915, 128: 0.84).
    monkeypatch.setattr(topn_search, 'EASE_RANGE', (0.01, 1e6))
    result = topn_search.search(_config(tmp_path, topn_model='ease', ease_lambda=start),
                                splits, (USERS, 2 * PAIRS), seed=0)
    assert result.family == 'ease' and result.ease_lambda == 16.0 and not result.on_edge


def test_a_rung_whose_neighbours_the_budget_left_untried_is_on_the_edge(splits, tmp_path,
                                                                        monkeypatch):
    # Lambda 16 is this data's best (see above), but with the budget spent after
    # the first rung nothing says so: what was searched is that rung alone.
    monkeypatch.setattr(topn_search, 'EASE_RANGE', (0.01, 1e6))
    result = topn_search.search(_config(tmp_path, topn_model='ease', ease_lambda=16.0,
                                        topn_search_seconds=1e-3),
                                splits, (USERS, 2 * PAIRS), seed=0)
    assert [row['settings'] for row in result.table if row['stage'] == 'ease'] == [
        {'lambda': 16.0, 'dropout': DEFAULTS.ease_dropout,
         'user_exponent': DEFAULTS.ease_user_exponent, 'form': form} for form in ease.FORMS]
    # ... and so are the dropout and the user exponent, whose neighbours went untried.
    assert result.on_edge == ('EASE lambda 16', f'EASE dropout {DEFAULTS.ease_dropout:g}',
                              f'EASE user exponent {DEFAULTS.ease_user_exponent:g}')


def test_a_best_point_on_the_edge_is_said_in_one_line(splits, tmp_path, caplog, monkeypatch):
    # A ladder that may not go past 8 ends on its edge, still improving.
    monkeypatch.setattr(topn_search, 'EASE_RANGE', (0.5, 8.0))
    caplog.set_level('INFO', logger='trainer.topn.search')
    result = topn_search.search(_config(tmp_path, topn_model='ease', ease_lambda=1.0), splits,
                                (USERS, 2 * PAIRS), seed=0)
    assert result.ease_lambda == 8.0 and result.on_edge == ('EASE lambda 8',)
    lines = [line for line in caplog.text.splitlines() if 'on the edge of its space' in line]
    assert len(lines) == 1 and 'EASE lambda 8' in lines[0]


# Validation NDCG@10 of EASE (lambda, dropout) measured on generated 100k (default seed):
# the walk from (800, 0) must ask these points, and only these, and end at (100, 0.5).
MEASURED_100K = {(800.0, 0.0): .2084, (1600.0, 0.0): .1951, (400.0, 0.0): .2135,
                 (200.0, 0.0): .2099, (400.0, 0.25): .2180, (400.0, 0.5): .2189,
                 (400.0, 0.67): .2143, (800.0, 0.5): .2080, (200.0, 0.5): .2198,
                 (100.0, 0.5): .2205, (50.0, 0.5): .2162}


def test_the_ease_walk_reaches_the_planted_best_dropout_and_lambda():
    asked = []

    def score(lam, dropout, exponent):  # planted: any user weighting scores less
        asked.append((lam, dropout, exponent))
        return MEASURED_100K[lam, dropout] - 0.01 * exponent
    lam, dropout, exponent, edges = topn_search.ease_walk(score, 800.0, 0.0, 0.0,
                                                          topn_search._Clock(600.0))
    assert (lam, dropout, exponent, edges) == (100.0, 0.5, 0.0, [])
    # The lambda ladder at p = 0, the p ladder at 400, the lambda ladder again at 0.5,
    # then the exponent's first rung up, which scores less.
    assert asked == [(*point, 0.0) for point in MEASURED_100K] + [(100.0, 0.5, 0.5)]
    assert 'EASE (lambda 100, dropout 0.5)' in topn_search.describe(dataclasses.replace(
        _any_result(), family='ease', blend=1.0, ease_lambda=lam, ease_dropout=dropout))


def test_a_user_exponent_that_wins_walks_lambda_again_at_it():
    asked = []

    def score(lam, dropout, exponent):  # planted best: lambda 100, p 0, a 1
        asked.append((lam, dropout, exponent))
        return -dropout - abs(exponent - 1.0) - abs(np.log2(lam / 100.0))
    lam, dropout, exponent, edges = topn_search.ease_walk(score, 100.0, 0.0, 0.0,
                                                          topn_search._Clock(600.0))
    assert (lam, dropout, exponent, edges) == (100.0, 0.0, 1.0, [])
    assert asked[-2:] == [(200.0, 0.0, 1.0), (50.0, 0.0, 1.0)]  # lambda's ladder at a = 1
    assert 'EASE (lambda 100, user exponent 1, DLAE form)' in topn_search.describe(
        dataclasses.replace(_any_result(), family='ease', blend=1.0, ease_lambda=lam,
                            ease_dropout=dropout, ease_user_exponent=exponent,
                            ease_form='dlae'))


def test_a_dropout_or_exponent_at_the_top_of_its_ladder_is_on_the_edge():
    # NDCG rises with p and a everywhere and peaks at lambda 100 at every p.
    def score(lam, dropout, exponent):
        return dropout + exponent - abs(np.log2(lam / 100.0))
    lam, dropout, exponent, edges = topn_search.ease_walk(score, 100.0, 0.0, 0.0,
                                                          topn_search._Clock(600.0))
    top_p, top_a = max(topn_search.EASE_DROPOUTS), max(topn_search.EASE_USER_EXPONENTS)
    assert (lam, dropout, exponent) == (100.0, top_p, top_a)
    assert edges == [f'EASE dropout {top_p:g}', f'EASE user exponent {top_a:g}']
    # Falling with p and a: 0 is the best and not an edge (neither can go below 0).
    lam, dropout, exponent, edges = topn_search.ease_walk(
        lambda lam, p, a: -p - a - abs(np.log2(lam / 100.0)), 100.0, 0.25, 0.5,
        topn_search._Clock(600.0))
    assert (lam, dropout, exponent, edges) == (100.0, 0.0, 0.0, [])


@pytest.mark.parametrize('form', ['ease', 'dlae'])
def test_a_dropout_flag_off_the_ladder_is_walked_from_where_it_sits(splits, tiny_grid,
                                                                   tmp_path, form):
    result = topn_search.search(_config(tmp_path, topn_model='ease', ease_dropout=0.1,
                                        ease_form=form),
                                splits, (USERS, 2 * PAIRS), seed=0)
    rows = [row['settings'] for row in result.table if row['stage'] == 'ease']
    # The flags' point first, in the flags' form, then the other form.
    other = next(value for value in ease.FORMS if value != form)
    exponent = DEFAULTS.ease_user_exponent
    assert rows[:2] == [
        {'lambda': 8.0, 'dropout': 0.1, 'user_exponent': exponent, 'form': form},
        {'lambda': 8.0, 'dropout': 0.1, 'user_exponent': exponent, 'form': other}]
    assert {0.0, 0.25} <= {row['dropout'] for row in rows}  # its neighbours on the ladder
    best = max((row for row in result.table if row['stage'] == 'ease'),
               key=lambda row: row['validation_ndcg'])
    assert best['settings'] == {'lambda': result.ease_lambda, 'dropout': result.ease_dropout,
                                'user_exponent': result.ease_user_exponent,
                                'form': result.ease_form}


def test_the_default_budget_grows_with_the_data_up_to_the_searched_sample():
    assert topn_search.default_budget(100_000) == pytest.approx(30.0)
    assert 50 < topn_search.default_budget(1_000_000) < 55
    # Past SEARCH_RATINGS the search fits a sample of that size, in the same budget.
    assert topn_search.default_budget(22_500_000) == topn_search.default_budget(
        topn_search.SEARCH_RATINGS)


@pytest.fixture
def sampled(monkeypatch):
    """The search fits a sample of about half the users (the planted fit: 1,600 ratings)."""
    monkeypatch.setattr(topn_search, 'SEARCH_RATINGS', 800)


def test_past_its_ratings_the_search_fits_a_seeded_sample_of_users(splits, tiny_grid, sampled,
                                                                   tmp_path, monkeypatch):
    fitted = []
    trial = topn_search.topn_train.trial

    def recorded_trial(config, fit, validation, *args, **kwargs):
        fitted.append((set(fit.user.numpy()), set(validation.user.numpy()), args[-1]))
        return trial(config, fit, validation, *args, **kwargs)
    monkeypatch.setattr(topn_search.topn_train, 'trial', recorded_trial)
    first = topn_search.search(_config(tmp_path), splits, (USERS, 2 * PAIRS), seed=3)
    assert 60 < first.sample['users'] < 140 and first.sample['of_users'] == USERS
    assert first.sample['fit_ratings'] < first.sample['of_fit_ratings'] == len(splits.fit)
    users, validation_users, sample = fitted[0]
    assert len(users) == first.sample['users'] and validation_users <= users
    assert all(fit_users == users for fit_users, _, _ in fitted)  # every point, one sample
    assert first.users <= len(validation_users)
    # Each movie's ridge is the whole data's times the share kept (topn_train.UserSample).
    assert sample.share == pytest.approx(800 / len(splits.fit))
    np.testing.assert_array_equal(sample.item_counts[:2 * PAIRS],
                                  np.bincount(splits.fit.item.numpy(), minlength=2 * PAIRS))
    # Deterministic for a seed; another seed draws other users.
    second = topn_search.search(_config(tmp_path), splits, (USERS, 2 * PAIRS), seed=3)
    assert _table(first) == _table(second) and first.sample == second.sample
    topn_search.search(_config(tmp_path), splits, (USERS, 2 * PAIRS), seed=4)
    assert fitted[-1][0] != users
    # The chosen iALS point's iterations are chosen again on all users (no trial to
    # refit from), up to the sample's count.
    ials = topn_search.search(_config(tmp_path, topn_model='ials'), splits, (USERS, 2 * PAIRS),
                              seed=3)
    assert ials.family == 'ials' and ials.sample is not None and ials.ials_trial is None
    config = _config(tmp_path, topn_iterations=9)
    point = {'factors': 8, 'l2_scale': 2.0, 'unobserved_scale': 1.0, 'confidence': 0.0,
             'iterations': 3}
    refit = topn_search.refit_config(config, dataclasses.replace(first, ials=point))
    assert refit.topn_iterations == 3 and refit.topn_factors == 8 and refit.topn_l2 == 2.0


def test_a_sampled_search_still_picks_the_planted_item_item_model(splits, tiny_grid, sampled,
                                                                  tmp_path):
    result = topn_search.search(_config(tmp_path), splits, (USERS, 2 * PAIRS), seed=0)
    assert result.sample is not None
    # (half the users: EASE's pairs are seen half as often, its lead stays)
    best_ials = max(row['validation_ndcg'] for row in result.table if row['stage'] == 'ials')
    assert result.family == 'ease' and result.validation_ndcg > best_ials + 0.1
    assert 0 < result.validation_seconds < result.seconds


def test_a_sampled_search_respects_its_budget(splits, tiny_grid, sampled, tmp_path):
    result = topn_search.search(_config(tmp_path, topn_search_seconds=1e-3), splits,
                                (USERS, 2 * PAIRS), seed=0)
    assert result.sample is not None and result.budget == 1e-3
    stages = [row['stage'] for row in result.table]
    assert stages.count('ease') == len(ease.FORMS) and stages.count('ials') == 1


def test_the_flags_point_stays_unless_the_best_is_clearly_better(splits, tiny_grid, tmp_path,
                                                                 monkeypatch, caplog):
    caplog.set_level('INFO', logger='trainer.topn.search')
    monkeypatch.setattr(topn_search, 'CLEAR_MARGIN', 1e9)
    result = topn_search.search(_config(tmp_path), splits, (USERS, 2 * PAIRS), seed=0)
    first_ials = next(row for row in result.table if row['stage'] == 'ials')
    assert result.kept_flags and result.family == 'ials' and result.ease_lambda is None
    # The trial the refit starts from is the flags' point's (the search fitted all users).
    assert result.ials_trial.iteration == first_ials['settings']['iterations']
    assert result.ials == first_ials['settings'] and not result.on_edge
    assert result.validation_ndcg == pytest.approx(first_ials['validation_ndcg'])
    assert "the flags' point is kept" in caplog.text


def test_a_catalogue_too_large_for_the_budget_leaves_ease_out(splits, tiny_grid, tmp_path,
                                                              monkeypatch, caplog):
    caplog.set_level('INFO', logger='trainer.topn.search')
    monkeypatch.setattr(topn_search, 'EASE_MAX_WORK', 1000.0)
    result = topn_search.search(_config(tmp_path), splits, (USERS, 2 * PAIRS), seed=0)
    assert result.family == 'ials' and result.ease_left_out
    assert not any(row['stage'] == 'ease' for row in result.table)
    assert 'EASE left out' in caplog.text


@pytest.mark.parametrize('done, spent, stage_spent, budget, left', [
    (3, 40.0, 30.0, 1000.0, 90.0),  # 10 s a point, 9 points to go; the budget is far
    (3, 40.0, 30.0, 100.0, 30.0),  # 70 s of the budget is iALS's: 30 s of it is left
    (3, 90.0, 30.0, 100.0, 0.0),  # past its share: it ends with the point it is on
])
def test_the_ials_stage_time_left_is_its_rate_capped_by_its_budget(done, spent, stage_spent,
                                                                   budget, left):
    assert topn_search.IALS_TRIALS == 12 and topn_search.IALS_SHARE == 0.7
    assert topn_search.ials_seconds_left(done, spent, stage_spent, budget) == pytest.approx(left)
