"""Tests of preprocess.py: the row parser, the split, the Beam steps and main()."""

from __future__ import annotations

import csv
import glob
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

import preprocess
from trainer import features
from trainer.pipeline import hash_split, rating_parser, rating_reader

ML_100K = features.DATASETS['ml-100k']
ML_1M = features.DATASETS['ml-1m']
ML_25M = features.DATASETS['ml-25m']


@pytest.mark.parametrize('layout, line, expected', [
    (ML_100K, '196\t242\t3\t881250949', (196, 242, 3.0, 881250949)),
    (ML_1M, '1::1193::5::978300760', (1, 1193, 5.0, 978300760)),
    (ML_25M, '1,296,4.5,1147880044', (1, 296, 4.5, 1147880044)),
    (ML_25M, '\ufeff1,296,0.5,1147880044\r', (1, 296, 0.5, 1147880044)),
    (ML_100K, ' 007\t 12\t4\t5 ', (7, 12, 4.0, 5)),
])
def test_parse_rating_line_accepts_each_layout(layout, line, expected):
    assert rating_parser.parse_rating_line(line, layout) == pytest.approx(expected)


@pytest.mark.parametrize('layout, line, reason', [
    (ML_100K, '', rating_parser.BLANK_LINE),
    (ML_100K, '   \r', rating_parser.BLANK_LINE),
    (ML_25M, 'userId,movieId,rating,timestamp', rating_parser.HEADER_LINE),
    (ML_100K, '1\t2\t3', rating_parser.WRONG_FIELD_COUNT),
    (ML_100K, '1\t2\t3\t4\t5', rating_parser.WRONG_FIELD_COUNT),
    (ML_1M, '1\t2\t3\t4', rating_parser.WRONG_FIELD_COUNT),
    (ML_100K, '\t2\t3\t4', rating_parser.EMPTY_ID),
    (ML_100K, 'u1\t2\t3\t4', rating_parser.NON_NUMERIC_ID),
    (ML_100K, '-1\t2\t3\t4', rating_parser.NON_NUMERIC_ID),
    (ML_100K, '1\t2\tfour\t4', rating_parser.NON_NUMERIC_RATING),
    (ML_100K, '1\t2\tnan\t4', rating_parser.RATING_NOT_FINITE),
    (ML_25M, '1,2,inf,4', rating_parser.RATING_NOT_FINITE),
    (ML_100K, '1\t2\t6\t4', rating_parser.RATING_OUT_OF_RANGE),
    (ML_100K, '1\t2\t0\t4', rating_parser.RATING_OUT_OF_RANGE),
    (ML_100K, '1\t2\t3.5\t4', rating_parser.RATING_OFF_STEP),
    (ML_25M, '1,2,3.25,4', rating_parser.RATING_OFF_STEP),
    (ML_100K, '1\t2\t3\tyesterday', rating_parser.BAD_TIMESTAMP),
])
def test_parse_rating_line_names_the_reason(layout, line, reason):
    with pytest.raises(ValueError, match=f'^{reason}$'):
        rating_parser.parse_rating_line(line, layout)


def _columns(batch):
    return {name: batch.column(name).to_pylist() for name in batch.schema.names}


def test_parse_rating_lines_matches_the_per_line_parser():
    lines = ['1\t10\t5\t100', 'bad', '2\t20\t3\t200', '3\t30\t9\t300', ' 4\t40\t1\t400',
             '\ufeff5\t50\t2\t500', '6\t60\t2.5\t600', '']
    parsed = rating_parser.parse_rating_lines(lines, ML_100K)
    cols = _columns(parsed.valid)
    rows = sorted(zip(cols['user_id'], cols['movie_id'], cols['rating'], cols['timestamp']))
    assert rows == [(1, 10, 5.0, 100), (2, 20, 3.0, 200), (4, 40, 1.0, 400), (5, 50, 2.0, 500)]
    assert sorted(cols['line']) == sorted([' 4\t40\t1\t400', '\ufeff5\t50\t2\t500',
                                           '1\t10\t5\t100', '2\t20\t3\t200'])
    assert parsed.rejected == [
        (rating_parser.WRONG_FIELD_COUNT, 'bad'),
        (rating_parser.RATING_OUT_OF_RANGE, '3\t30\t9\t300'),
        (rating_parser.RATING_OFF_STEP, '6\t60\t2.5\t600'), (rating_parser.BLANK_LINE, '')]


def test_parse_rating_lines_of_nothing_is_empty():
    parsed = rating_parser.parse_rating_lines([], ML_100K)
    assert parsed.valid.num_rows == 0 and parsed.rejected == []


@pytest.mark.parametrize('layout', [ML_100K, ML_1M, ML_25M])
def test_parse_id_pairs_finds_every_accepted_pair(layout):
    """The repeated-pairs pass reads only ids: every pair the full parser accepts, at most
    a few of the rejected lines' pairs, on messy lines of every kind."""
    sep = layout.ratings_separator
    fields = [('1', '10', '5', '100'), ('007', '70', '4', '1'), (' 8', '80 ', '3', '2'),
              ('9', '90', '9', '3'), ('x', '1', '1', '1'), ('11', '110', '2', 'bad'),
              ('12', '-120', '1', '4'), ('1', '10', '3', '200'), ('13', '130', '1')]
    lines = [sep.join(row) for row in fields]
    lines += ['\ufeff14' + sep + '140' + sep + '2' + sep + '5', '', 'userId' + sep + 'movieId']
    raw = [line.encode() for line in lines] + [b'15' + sep.encode() + b'\xff' + sep.encode()
                                               + b'1' + sep.encode() + b'1']
    got = rating_parser.parse_id_pairs(pa.array(raw, pa.large_binary()), layout)
    got_pairs = list(zip(got.column('user_id').to_pylist(), got.column('movie_id').to_pylist()))
    valid = rating_parser.parse_rating_lines(pa.array(raw, pa.large_binary()), layout).valid
    accepted = list(zip(valid.column('user_id').to_pylist(), valid.column('movie_id').to_pylist()))
    assert sorted(accepted) == [(1, 10), (1, 10), (7, 70), (8, 80), (14, 140)]
    assert not set(accepted) - set(got_pairs)
    assert sorted(got_pairs) == sorted(accepted + [(9, 90), (11, 110), (13, 130)])
    assert got_pairs.count((1, 10)) == 2


def test_split_is_deterministic_and_near_the_asked_share():
    rng = np.random.default_rng(0)
    users = rng.integers(1, 5000, 50_000)
    movies = rng.integers(1, 5000, 50_000)
    first = hash_split.assign_split(users, movies, seed=7, eval_percent=20)
    again = hash_split.assign_split(users.copy(), movies.copy(), seed=7, eval_percent=20)
    other_seed = hash_split.assign_split(users, movies, seed=8, eval_percent=20)
    np.testing.assert_array_equal(first, again)
    assert first.mean() == pytest.approx(0.20, abs=0.01)
    assert (first != other_seed).mean() > 0.2
    # Per rating, not per batch: a rating's split does not depend on its neighbours.
    np.testing.assert_array_equal(
        hash_split.assign_split(users[:10], movies[:10], seed=7, eval_percent=20), first[:10])


def _pipeline():
    return BeamTestPipeline(runner=preprocess.DEFAULT_RUNNER)


def test_parse_ratings_transform_outputs_rows_rejects_and_counts():
    lines = ['1\t10\t5\t100', '2\t20\t3\t200', 'x\t1\t1\t1', '3\t30\t6\t300', '']
    with _pipeline() as p:
        parsed = p | beam.Create(lines) | rating_reader.ParseRatings(ML_100K)
        ids = (parsed[rating_reader.ParseRatings.VALID]
               | 'Ids' >> beam.FlatMap(lambda b: b.column('user_id').to_pylist()))
        assert_that(ids, equal_to([1, 2]), label='CheckValid')
        assert_that(parsed[rating_reader.ParseRatings.REJECTED], equal_to([
            (rating_parser.NON_NUMERIC_ID, 'x\t1\t1\t1'),
            (rating_parser.RATING_OUT_OF_RANGE, '3\t30\t6\t300'),
            (rating_parser.BLANK_LINE, '')]), label='CheckRejected')
        totals = (parsed[rating_reader.ParseRatings.STATS]
                  | beam.CombineGlobally(rating_reader.SumStatsFn()))
        assert_that(totals, equal_to([{
            'rows_read': 5, 'rows_valid': 2, 'rejected:non_numeric_id': 1,
            'rejected:rating_out_of_range': 1, 'rejected:blank_line': 1}]), label='CheckStats')


def test_parse_ratings_of_an_empty_file_yields_nothing():
    with _pipeline() as p:
        parsed = p | beam.Create([]) | rating_reader.ParseRatings(ML_100K)
        assert_that(parsed[rating_reader.ParseRatings.VALID], equal_to([]), label='NoRows')
        assert_that(parsed[rating_reader.ParseRatings.REJECTED], equal_to([]), label='NoRejects')


# --- main(): the whole job on a small staged file. -------------------------------------
def _stage(work_dir: str, lines: list[str], layout=ML_100K, dataset='ml-100k') -> None:
    raw = os.path.join(work_dir, features.RAW_DIR)
    os.makedirs(raw, exist_ok=True)
    with open(os.path.join(raw, layout.ratings_file), 'w', encoding='utf-8') as f:
        f.write(''.join(line + '\n' for line in lines))
    features.write_json(os.path.join(raw, features.SOURCE_FILE), features.SourceInfo(
        dataset=dataset, layout=layout.name, source='test', md5=''))


def _ratings(n_users=40, n_movies=30, seed=0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f'{u}\t{m}\t{rng.integers(1, 6)}\t{880000000 + u * 100 + m}'
            for u in range(1, n_users + 1) for m in range(1, n_movies + 1)
            if rng.random() < 0.5]


def _read_examples(pattern: str) -> list[dict]:
    files = sorted(glob.glob(pattern))
    dataset = tf.data.TFRecordDataset(files, compression_type='GZIP')
    return [tf.io.parse_single_example(record, features.TRANSFORMED_FEATURE_SPEC)
            for record in dataset]


@pytest.fixture(scope='module')
def preprocessed(tmp_path_factory):
    """One real run of main() shared by the checks below (a run costs seconds)."""
    work_dir = str(tmp_path_factory.mktemp('work'))
    good = _ratings()
    bad = ['1\t2\t3', 'abc\t1\t4\t5', '1\t1\t9\t5', '']
    _stage(work_dir, good[:100] + bad + good[100:])
    assert preprocess.main(['--work-dir', work_dir, '--seed', '3']) == 0
    return work_dir, good, bad


def test_main_accounts_for_every_row(preprocessed):
    work_dir, good, bad = preprocessed
    info = features.read_dataset_info(work_dir)
    assert info.rows_read == len(good) + len(bad)
    assert info.rows_accepted == len(good)
    assert info.rows_rejected == len(bad) == sum(info.rejected_by_reason.values())
    assert info.train_ratings + info.eval_ratings == len(good)
    assert info.eval_ratings / len(good) == pytest.approx(0.2, abs=0.06)
    ratings = [float(line.split('\t')[2]) for line in good]
    train = _read_examples(info.train_pattern)
    assert len(train) == info.train_ratings
    assert info.train_mean_rating == pytest.approx(
        np.mean([float(e[features.RATING]) for e in train]), rel=1e-6)
    assert len(_read_examples(info.eval_pattern)) == info.eval_ratings
    assert info.global_mean_eval_rmse > 0 and min(ratings) >= 1
    with open(glob.glob(os.path.join(features.transformed_dir(work_dir),
                                     features.REJECTED_DIR, '*.csv'))[0]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['reason', 'line']
    assert sorted(line for _, line in rows[1:]) == sorted(bad)


def test_main_split_matches_the_hash_and_vocab_covers_train_only(preprocessed):
    work_dir, _, _ = preprocessed
    info = features.read_dataset_info(work_dir)
    for split, expected_eval in ((info.train_pattern, False), (info.eval_pattern, True)):
        examples = _read_examples(split)
        users = np.array([int(e[features.USER_ID]) for e in examples])
        movies = np.array([int(e[features.MOVIE_ID]) for e in examples])
        assert (hash_split.assign_split(users, movies, 3, 20) == expected_eval).all()
    import tensorflow_transform as tft
    tft_output = tft.TFTransformOutput(features.transformed_dir(work_dir))
    train_users = {e[features.USER_ID].numpy() for e in _read_examples(info.train_pattern)}
    vocab = set(tft_output.vocabulary_by_name(features.USER_VOCAB))
    assert vocab == train_users and info.users == len(vocab)
    for example in _read_examples(info.eval_pattern):
        expected_oov = example[features.USER_ID].numpy() not in vocab
        assert (int(example[features.USER]) == len(vocab)) == expected_oov


def test_main_reuses_a_finished_identical_output(preprocessed, capsys):
    work_dir, _, _ = preprocessed
    info_path = os.path.join(features.transformed_dir(work_dir), features.DATASET_INFO_FILE)
    before = os.path.getmtime(info_path)
    assert preprocess.main(['--work-dir', work_dir, '--seed', '3']) == 0
    assert os.path.getmtime(info_path) == before
    assert 'rows read' in capsys.readouterr().out


def test_main_refuses_to_mix_outputs_then_overwrites(preprocessed, capsys):
    work_dir, good, bad = preprocessed
    info_path = os.path.join(features.transformed_dir(work_dir), features.DATASET_INFO_FILE)
    before = os.path.getmtime(info_path)
    assert preprocess.main(['--work-dir', work_dir, '--seed', '4']) == 2
    assert '--overwrite' in capsys.readouterr().err
    assert os.path.getmtime(info_path) == before
    stray = os.path.join(features.transformed_dir(work_dir), 'train-99999-of-99999.tfrecord.gz')
    open(stray, 'w').close()
    assert preprocess.main(['--work-dir', work_dir, '--seed', '3', '--overwrite']) == 0
    assert not os.path.exists(stray)
    assert features.read_dataset_info(work_dir).rows_read == len(good) + len(bad)


def test_main_without_staged_data_says_what_to_run(work_dir, capsys):
    assert preprocess.main(['--work-dir', work_dir]) == 2
    err = capsys.readouterr().err
    assert 'data-extractor.py' in err and 'Traceback' not in err


def test_main_stops_when_the_file_does_not_match_the_dataset(work_dir, capsys):
    _stage(work_dir, ['1::2::3::4'] * 20)  # ml-1m lines staged as ml-100k
    assert preprocess.main(['--work-dir', work_dir]) == 2
    err = capsys.readouterr().err
    assert '--dataset' in err and 'wrong_field_count' in err
    assert not os.path.exists(features.transformed_dir(work_dir))


@pytest.mark.parametrize('flags, message', [
    (['--eval-percent', '0'], '--eval-percent'),
    (['--eval-percent', '100'], '--eval-percent'),
    (['--seed', '-1'], '--seed'),
])
def test_bad_flags_get_one_line(work_dir, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        preprocess.main(['--work-dir', work_dir, *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
