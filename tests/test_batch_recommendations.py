"""trainer/serving/batch.py: every user's top-k through Beam's RunInference.

Runs the job on Beam's in-process runner against the planted export of
tests/test_serving.py (rating = 3 + user bias + movie bias; train ratings of
tests/test_export.py), so each user's list is known in advance.
"""

from __future__ import annotations

import glob
import json
import os

import pytest

from test_export import tft_dir  # pylint: disable=unused-import
from test_serving import GLOBAL_MEAN, MOVIE_BIAS, USER_BIAS, export_planted_model
from trainer import features, usage
from trainer.serving import batch


@pytest.fixture
def work_dir(tft_dir: str, tmp_path) -> str:
    export_planted_model(tft_dir, tmp_path)
    return str(tmp_path)


def read_records(work_dir: str) -> dict[str, dict]:
    pattern = os.path.join(features.recommendations_dir(work_dir),
                           f'{features.RECOMMENDATIONS_PREFIX}*{features.RECOMMENDATIONS_SUFFIX}')
    records = {}
    for path in glob.glob(pattern):
        with open(path, encoding='utf-8') as f:
            for line in f:
                record = json.loads(line)
                records[record['user_id']] = record
    return records


def expected_list(user: str, movies: list[str]) -> list[dict]:
    titles = {'m1': 'Amélie (2001)', 'm2': 'Léon (1994)', 'm3': 'm3'}
    # The planted model's rating is its score: global mean + user bias + movie bias.
    rating = {movie: pytest.approx(GLOBAL_MEAN + USER_BIAS.get(user, 0.0) + MOVIE_BIAS[movie],
                                   abs=1e-4) for movie in movies}
    return [{'rank': rank, 'movie_id': movie, 'title': titles[movie], 'score': rating[movie],
             'rating': rating[movie]}
            for rank, movie in enumerate(movies, start=1)]


def test_every_user_gets_their_unrated_movies_best_first(work_dir: str, capsys):
    assert batch.main(['--work-dir', work_dir, '-k', '2',
                                       '--batch-size', '3']) == 0
    records = read_records(work_dir)
    # Train ratings: u1 rated every movie, u2 m1 and m3, u3 m1 and m2, u4 m3.
    assert {user: record['recommendations'] for user, record in records.items()} == {
        'u1': [], 'u2': expected_list('u2', ['m2']), 'u3': expected_list('u3', ['m3']),
        'u4': expected_list('u4', ['m1', 'm2'])}
    assert not any(record['fallback'] for record in records.values())
    assert 'recommendations:' in capsys.readouterr().out
    assert usage.read_usage(features.usage_path(work_dir, 'batch')).peak_rss_bytes() > 0


def test_a_second_run_needs_overwrite(work_dir: str, capsys):
    assert batch.main(['--work-dir', work_dir, '-k', '1']) == 0
    assert batch.main(['--work-dir', work_dir, '-k', '2']) == 2
    assert '--overwrite' in capsys.readouterr().err
    assert batch.main(['--work-dir', work_dir, '-k', '2', '--overwrite']) == 0
    assert len(read_records(work_dir)['u4']['recommendations']) == 2


def test_a_missing_export_is_one_line(tmp_path, capsys):
    assert batch.main(['--work-dir', str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and 'holds no SavedModel' in error[0]


@pytest.mark.parametrize('flags, named', [
    (['-k', '0'], '-k'),
    (['--batch-size', '0'], '--batch-size'),
    (['--bigquery-table', 'just-a-table'], '--bigquery-table'),
])
def test_bad_flags_are_one_line(tmp_path, capsys, flags: list[str], named: str):
    with pytest.raises(SystemExit) as exit_info:
        batch.main(['--work-dir', str(tmp_path), *flags])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err.strip().splitlines()[-1]


def test_records_fit_the_bigquery_schema():
    outputs = {features.MOVIE_IDS: [[b'm1', b'']], features.TITLES: [[b'T', b'']],
               features.SCORES: [[4.5, 0.0]], features.PREDICTED_RATINGS: [[3.75, 0.0]],
               features.FALLBACK: [True]}
    (record,) = batch.user_records(['u9'], outputs)
    assert record == {'user_id': 'u9', 'fallback': True, 'recommendations': [
        {'rank': 1, 'movie_id': 'm1', 'title': 'T', 'score': 4.5, 'rating': 3.75}]}
    fields = batch.BIGQUERY_SCHEMA['fields']
    assert [field['name'] for field in fields] == list(record)
    (nested,) = [field['fields'] for field in fields if field['type'] == 'RECORD']
    assert [field['name'] for field in nested] == list(record['recommendations'][0])
