"""Tests of trainer/summary.py: the closing lines of run-local.sh."""

from __future__ import annotations

from trainer import features, summary

INFO = features.DatasetInfo(
    dataset='synthetic', layout='ml-100k', seed=42, eval_percent=20.0, rows_read=103,
    rows_accepted=100, rows_rejected=3, rejected_by_reason={'blank_line': 3}, train_ratings=80,
    eval_ratings=20, users=10, movies=12, train_mean_rating=3.5, global_mean_eval_rmse=1.1,
    rating_min=1.0, rating_max=5.0, train_pattern='t', eval_pattern='e', noise_floor_rmse=0.8)
METRICS = {'eval_rmse': 0.88, 'eval_mae': 0.7, 'epochs': 12, 'export_dir': 'w/model/export',
           'ranking': {'k': 10, 'model': {'ndcg': 0.2, 'recall': 0.3, 'coverage': 0.5},
                       'most_popular': {'ndcg': 0.1, 'recall': 0.15}}}


def test_summary_names_counts_quality_times_and_paths():
    text = summary.format_summary(INFO, METRICS, 'w/model', 'fig/x.png',
                                  [('extract', 1.0), ('train', 2.5)])
    assert '103 rows read, 100 accepted, 3 rejected' in text
    assert 'eval RMSE 0.8800' in text and 'predicting the train mean: 1.1000' in text
    assert '1.100x' in text  # 0.88 / 0.8
    assert 'NDCG 0.2000' in text and 'most popular: NDCG 0.1000' in text
    assert 'extract 1.0, train 2.5 (total 3.5)' in text
    assert 'w/model/export' in text and 'fig/x.png' in text


def test_summary_without_noise_floor_or_ranking_leaves_those_lines_out():
    import dataclasses
    info = dataclasses.replace(INFO, noise_floor_rmse=None)
    metrics = {key: value for key, value in METRICS.items() if key != 'ranking'}
    text = summary.format_summary(info, metrics, 'w/model', None, [])
    assert 'noise floor' not in text and 'NDCG' not in text and 'seconds' not in text


def test_summary_names_the_rating_models_lists_beside_the_served_ones():
    ranking = {**METRICS['ranking'], 'rating_model': {'ndcg': 0.05, 'recall': 0.04}}
    text = summary.format_summary(INFO, {**METRICS, 'ranking': ranking}, 'w/model', None, [])
    assert ('NDCG 0.2000, recall 0.3000, coverage 0.500; ranked by predicted rating: '
            'NDCG 0.0500; most popular: NDCG 0.1000') in text


def test_summary_ends_with_a_real_user_and_the_chart(tmp_path):
    work_dir = str(tmp_path / 'my work')
    raw = tmp_path / 'my work' / 'raw'
    raw.mkdir(parents=True)
    # The layout's own separator and header: ml-25m has a header, ml-100k tabs.
    (raw / 'ratings.csv').write_text('userId,movieId,rating,timestamp\n8123,1,4.0,9\n7,2,3,9\n')
    user_id = summary.first_user_id(work_dir, features.DATASETS['ml-25m'])
    text = summary.format_summary(INFO, METRICS, f'{work_dir}/model', f'{work_dir}/fig/x.png',
                                  [], user_id)

    assert user_id == '8123'
    assert text.splitlines()[-2:] == [
        f"== next: .venv/bin/python recommend.py --model-dir '{work_dir}/model' --user 8123",
        f'== chart: {work_dir}/fig/x.png']
    assert summary.first_user_id(str(tmp_path / 'gone'), features.ML_100K) is None


def test_the_lists_line_says_which_model_validation_chose_and_from_how_many_points():
    topn = {'model': 'blend', 'factors': 64, 'ease_lambda': 3200.0, 'blend': 0.3,
            'like': {'weight': 0.5, 'cut': 3.5, 'noise': 0.9},
            'search': {'validation_ndcg': 0.14304, 'table': [{}] * 34, 'seconds': 21.0,
                       'on_edge': ['EASE weight 0.3']}}
    assert summary.lists_phrase(topn) == (
        'a blend of EASE and iALS (64 factors, lambda 3200, EASE weight 0.3, like weight 0.5), '
        'chosen on validation: NDCG@10 0.1430, 34 points in 21 s '
        '(on the edge of its space: EASE weight 0.3)')
    fixed = {'model': 'ease', 'ease_lambda': 800.0, 'like': None, 'search': None}
    assert summary.lists_phrase(fixed) == 'EASE (lambda 800, no like term)'
    dropped = {**fixed, 'ease_lambda': 100.0, 'ease_dropout': 0.5}
    assert summary.lists_phrase(dropped) == 'EASE (lambda 100, dropout 0.5, no like term)'
    assert summary.lists_phrase({**dropped, 'ease_dropout': 0.0}) == (
        'EASE (lambda 100, no like term)')
    assert summary.lists_phrase({**dropped, 'ease_form': 'dlae'}) == (
        'EASE (lambda 100, dropout 0.5, DLAE form, no like term)')
    assert summary.lists_phrase({**dropped, 'ease_form': 'ease'}) == (
        'EASE (lambda 100, dropout 0.5, no like term)')
    weighted = {'model': 'ials', 'factors': 48, 'target': 'weighted', 'like': None,
                'search': None}
    assert summary.lists_phrase(weighted) == 'iALS (48 factors, weighted targets, no like term)'


def test_the_trainer_seconds_line_shows_each_phase_and_the_rest_of_the_wall_time():
    metrics = {**METRICS, 'wall_seconds': 10.0,
               'phase_seconds': {'load': 1.25, 'rating_epochs': 4.0, 'ranking': 2.0}}
    text = summary.format_summary(INFO, metrics, 'w/model', None, [])
    assert ('== trainer seconds: load shards 1.2, rating epochs 4.0, ranking eval 2.0 '
            '(other 2.8 of 10.0 s)') in text.splitlines()
