"""Bad input: every kind of broken MovieLens line, what preprocess.py does with it.

A corpus of broken lines is built here (never committed): wrong field counts,
non-numeric ids, empty fields, ratings off the scale, NaN/inf, half stars on a
whole-star scale, a byte-order mark, CRLF, a header in the middle, blank lines,
a truncated last line, bytes that are not UTF-8, duplicate (user, movie) pairs
and empty files.  The per-case tables use the pure parser functions; a few
runs of preprocess.main check that the counts add up, that every rejected line
is kept with its reason and that no valid row is lost.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import pathlib
import random
import zipfile

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

import preprocess
from conftest import load_script
from trainer import features
from trainer.pipeline import deduplication, hash_split, rating_parser, rating_reader

extractor = load_script('data-extractor.py')


ML_100K = features.DATASETS['ml-100k']
ML_1M = features.DATASETS['ml-1m']
ML_25M = features.DATASETS['ml-25m']
P = rating_parser


# --- One line at a time: accepted, normalised or rejected with a named reason. ------
@pytest.mark.parametrize('layout, line, expected', [
    # Accepted as is, or normalised (BOM, CR, spaces, leading zeros, '4.0').
    (ML_100K, b'196\t242\t3\t881250949', (196, 242, 3.0, 881250949)),
    (ML_100K, b'\xef\xbb\xbf196\t242\t3\t881250949', (196, 242, 3.0, 881250949)),
    (ML_100K, b'196\t242\t3\t881250949\r', (196, 242, 3.0, 881250949)),
    (ML_100K, b' 0196 \t242\t 3 \t881250949', (196, 242, 3.0, 881250949)),
    (ML_100K, b'196\t242\t3.0\t881250949', (196, 242, 3.0, 881250949)),
    (ML_25M, b'1,296,4.5,1147880044', (1, 296, 4.5, 1147880044)),
    (ML_25M, b'\xef\xbb\xbf1,296,.5,1147880044\r', (1, 296, 0.5, 1147880044)),
    (ML_1M, b'1::1193::5::978300760', (1, 1193, 5.0, 978300760)),
    # A cut inside the timestamp's digits leaves a well-formed line: accepted.
    (ML_100K, b'196\t242\t3\t8812', (196, 242, 3.0, 8812)),
    # Wrong field counts, including truncated lines and the wrong separator.
    (ML_100K, b'196\t242\t3', P.WRONG_FIELD_COUNT),
    (ML_100K, b'196\t24', P.WRONG_FIELD_COUNT),
    (ML_100K, b'196\t242\t3\t881250949\t7', P.WRONG_FIELD_COUNT),
    (ML_100K, b'196,242,3,881250949', P.WRONG_FIELD_COUNT),
    (ML_25M, b'1,296,4.', P.WRONG_FIELD_COUNT),
    (ML_1M, b'1::1193::5::', P.BAD_TIMESTAMP),
    # Ids.
    (ML_100K, b'\t242\t3\t881250949', P.EMPTY_ID),
    (ML_100K, b'196\t \t3\t881250949', P.EMPTY_ID),
    (ML_100K, b'u196\t242\t3\t881250949', P.NON_NUMERIC_ID),
    (ML_100K, b'196\t2.5\t3\t881250949', P.NON_NUMERIC_ID),
    (ML_100K, b'-196\t242\t3\t881250949', P.NON_NUMERIC_ID),
    (ML_100K, '١٩٦\t242\t3\t881250949'.encode(), P.NON_NUMERIC_ID),  # Arabic-Indic digits
    (ML_100K, b'1234567890123456789\t242\t3\t881250949', P.NON_NUMERIC_ID),  # > 18 digits
    # Ratings.
    (ML_100K, b'196\t242\t\t881250949', P.NON_NUMERIC_RATING),
    (ML_100K, b'196\t242\tfour\t881250949', P.NON_NUMERIC_RATING),
    (ML_100K, b'196\t242\t0_4\t881250949', P.NON_NUMERIC_RATING),  # float() would say 4.0
    (ML_100K, '196\t242\t٣\t881250949'.encode(), P.NON_NUMERIC_RATING),  # float() would say 3.0
    (ML_100K, b'196\t242\tnan\t881250949', P.RATING_NOT_FINITE),
    (ML_25M, b'1,296,NaN,1147880044', P.RATING_NOT_FINITE),
    (ML_25M, b'1,296,-inf,1147880044', P.RATING_NOT_FINITE),
    (ML_25M, b'1,296,Infinity,1147880044', P.RATING_NOT_FINITE),
    (ML_25M, b'1,296,1e999,1147880044', P.RATING_NOT_FINITE),
    (ML_100K, b'196\t242\t6\t881250949', P.RATING_OUT_OF_RANGE),
    (ML_100K, b'196\t242\t0\t881250949', P.RATING_OUT_OF_RANGE),
    (ML_100K, b'196\t242\t-3\t881250949', P.RATING_OUT_OF_RANGE),
    (ML_25M, b'1,296,0.0,1147880044', P.RATING_OUT_OF_RANGE),
    (ML_100K, b'196\t242\t3.5\t881250949', P.RATING_OFF_STEP),  # half star, whole scale
    (ML_25M, b'1,296,4.25,1147880044', P.RATING_OFF_STEP),
    # Timestamps.
    (ML_100K, b'196\t242\t3\t', P.BAD_TIMESTAMP),
    (ML_100K, b'196\t242\t3\t-5', P.BAD_TIMESTAMP),
    (ML_100K, b'196\t242\t3\t8.8e8', P.BAD_TIMESTAMP),
    # Whole-line cases.
    (ML_100K, b'', P.BLANK_LINE),
    (ML_100K, b' \t \r', P.BLANK_LINE),
    (ML_25M, b'userId,movieId,rating,timestamp', P.HEADER_LINE),
    (ML_100K, b'user_id\titem_id\trating\ttimestamp', P.HEADER_LINE),
    (ML_100K, b'196\t242\t3\t88125\xe99', P.NOT_UTF8),
    (ML_1M, b'\xff\xfe1\x00:\x00:\x00', P.NOT_UTF8),  # UTF-16
])
def test_each_kind_of_line_is_accepted_normalised_or_rejected_with_a_reason(
        layout, line, expected):
    parsed = rating_parser.parse_rating_lines([line], layout)
    if isinstance(expected, tuple):
        assert parsed.rejected == []
        row = parsed.valid.to_pylist()[0]
        assert (row[features.USER_ID], row[features.MOVIE_ID], row[features.RATING],
                row[features.TIMESTAMP]) == pytest.approx(expected)
        assert row[rating_parser.LINE] == line.decode('utf-8')  # kept as read
    else:
        assert parsed.valid.num_rows == 0
        [(reason, kept_line)] = parsed.rejected
        assert reason == expected
        assert kept_line == line.decode('utf-8', 'backslashreplace')
    # The per-line parser agrees wherever the line is text.
    if expected != rating_parser.NOT_UTF8:
        text = line.decode('utf-8')
        if isinstance(expected, tuple):
            assert rating_parser.parse_rating_line(text, layout) == pytest.approx(expected)
        else:
            with pytest.raises(ValueError, match=f'^{expected}$'):
                rating_parser.parse_rating_line(text, layout)


def test_a_batch_with_one_non_utf8_line_loses_none_of_the_others():
    lines = [b'1\t10\t5\t100', b'2\t2\xe9\t3\t200', b'3\t30\t4\t300', b'\xef\xbb\xbf4\t40\t1\t1']
    parsed = rating_parser.parse_rating_lines(lines, ML_100K)
    assert sorted(parsed.valid.column(features.USER_ID).to_pylist()) == [1, 3, 4]
    assert parsed.rejected == [(rating_parser.NOT_UTF8, '2\t2\\xe9\t3\t200')]


@pytest.mark.parametrize('layout, first_line, expected', [
    (ML_25M, b'userId,movieId,rating,timestamp', 1),
    (ML_25M, b'\xef\xbb\xbfuserId,movieId,rating,timestamp', 1),
    (ML_25M, b'1,296,4.5,1147880044', 0),  # a headerless csv keeps its first row
    (ML_100K, b'user_id\titem_id\trating\ttimestamp', 1),
    (ML_100K, b'196\t242\t3\t881250949', 0),
    (ML_100K, b'garbage', 0),
])
def test_only_a_real_header_at_the_top_is_skipped(layout, first_line, expected):
    assert rating_parser.count_header_lines(first_line, layout) == expected


@pytest.mark.parametrize('head, phrase', [
    ([], 'is empty'),
    ([b'userId,movieId,rating,timestamp'], 'holds a header and no ratings'),
    ([b'', b'  '], 'none of the first 2 lines'),
    ([b'1\t2\t3\t4'] * 5, 'none of the first 5 lines'),  # ml-100k staged as ml-25m
])
def test_check_sample_refuses_a_file_with_nothing_valid(head, phrase):
    with pytest.raises(preprocess.UserError, match=phrase) as error:
        preprocess.check_sample(head, 'raw/ratings.csv', ML_25M)
    assert '\n' not in str(error.value)


# --- Duplicates: keep the latest, reject the others, deterministically. ---------------
def _parsed_table(rows: list[tuple[int, int, float, int, str]]) -> pa.Table:
    columns = list(zip(*rows)) if rows else [[]] * 5
    return pa.Table.from_batches([rating_parser.make_parsed_batch(
        np.array(columns[0], np.uint64), np.array(columns[1], np.uint64),
        np.array(columns[2], np.float64), np.array(columns[3], np.int64), list(columns[4]))])


def _rows(table: pa.Table) -> list[tuple]:
    return [tuple(row.values()) for row in table.to_pylist()]


DUPLICATE_ROWS = [
    (1, 1, 2.0, 100, '1\t1\t2\t100'),
    (1, 1, 4.0, 300, '1\t1\t4\t300'),   # latest timestamp: kept
    (1, 1, 5.0, 200, '1\t1\t5\t200'),
    (2, 1, 3.0, 500, '2\t1\t3\t500'),
    (2, 1, 5.0, 500, '2\t1\t5\t500'),   # same time, higher rating: kept
    (3, 1, 2.0, 700, '3\t1\t2\t700'),
    (3, 1, 2.0, 700, '3\t1\t2\t700'),   # the very same line twice: one kept
    (4, 1, 3.0, 800, ' 4\t1\t3\t800'),
    (4, 1, 3.0, 800, '04\t1\t3\t800'),
    (4, 1, 3.0, 800, '4\t1\t3\t800'),   # same row spelled three ways: the last line sorted
    (1, 2, 1.0, 50, '1\t2\t1\t50'),     # other pairs of the same user or movie stay
    (5, 1, 1.0, 50, '5\t1\t1\t50'),
]
KEPT = [(1, 1, 4.0, 300, '1\t1\t4\t300'), (1, 2, 1.0, 50, '1\t2\t1\t50'),
        (2, 1, 5.0, 500, '2\t1\t5\t500'), (3, 1, 2.0, 700, '3\t1\t2\t700'),
        (4, 1, 3.0, 800, '4\t1\t3\t800'), (5, 1, 1.0, 50, '5\t1\t1\t50')]


def test_keep_latest_ratings_keeps_one_per_pair_by_the_documented_rule():
    kept, duplicates = deduplication.keep_latest_ratings(_parsed_table(DUPLICATE_ROWS))
    assert _rows(kept) == KEPT
    assert sorted(_rows(duplicates)) == sorted(
        set(DUPLICATE_ROWS) - set(KEPT) | {(3, 1, 2.0, 700, '3\t1\t2\t700')})
    assert kept.num_rows + duplicates.num_rows == len(DUPLICATE_ROWS)


def test_keep_latest_ratings_does_not_depend_on_row_order():
    for seed in range(5):
        rows = random.Random(seed).sample(DUPLICATE_ROWS, len(DUPLICATE_ROWS))
        kept, duplicates = deduplication.keep_latest_ratings(_parsed_table(rows))
        assert _rows(kept) == KEPT and duplicates.num_rows == len(DUPLICATE_ROWS) - len(KEPT)


def test_keep_latest_ratings_of_nothing_is_nothing():
    kept, duplicates = deduplication.keep_latest_ratings(_parsed_table([]))
    assert kept.num_rows == duplicates.num_rows == 0


def test_partition_by_bucket_puts_every_row_of_a_pair_in_one_bucket():
    rng = np.random.default_rng(0)
    users, movies = rng.integers(1, 50, 2000), rng.integers(1, 50, 2000)
    batch = rating_parser.make_parsed_batch(users, movies, np.ones(2000), np.arange(2000),
                                            [str(i) for i in range(2000)])
    buckets = {}
    for bucket, rows in deduplication.partition_by_bucket(batch, 7):
        for user, movie in zip(rows.column(features.USER_ID).to_pylist(),
                               rows.column(features.MOVIE_ID).to_pylist()):
            buckets.setdefault((user, movie), set()).add(bucket)
    assert all(len(found) == 1 for found in buckets.values())
    assert len(buckets) == len(set(zip(users.tolist(), movies.tolist())))
    assert sum(rows.num_rows for _, rows in deduplication.partition_by_bucket(batch, 7)) == 2000


def test_deduplicate_ratings_in_beam_across_batches_and_buckets():
    first, second = DUPLICATE_ROWS[::2], DUPLICATE_ROWS[1::2]
    batches = [_parsed_table(first).to_batches()[0], _parsed_table(second).to_batches()[0]]
    with BeamTestPipeline(runner=preprocess.DEFAULT_RUNNER) as p:
        unique = (p | beam.Create(batches)
                  | deduplication.DeduplicateRatings(num_buckets=3, max_batch_size=2))
        rows = unique[deduplication.DeduplicateRatings.VALID] | 'Rows' >> beam.FlatMap(
            lambda batch: [tuple(row.values()) for row in batch.to_pylist()])
        assert_that(rows, equal_to(KEPT), label='CheckKept')
        rejected = unique[deduplication.DeduplicateRatings.REJECTED] | 'Lines' >> beam.FlatMap(
            lambda block: list(csv.reader(block.split('\n'))))
        assert_that(rejected, equal_to([
            ['duplicate_rating', line] for line in ('1\t1\t2\t100', '1\t1\t5\t200',
                                                    '2\t1\t3\t500', '3\t1\t2\t700',
                                                    ' 4\t1\t3\t800', '04\t1\t3\t800')]),
            label='CheckRejected')
        totals = (unique[deduplication.DeduplicateRatings.STATS]
                  | beam.CombineGlobally(rating_reader.SumStatsFn()))
        assert_that(totals, equal_to([{'rows_accepted': 6, 'rejected:duplicate_rating': 6}]),
                    label='CheckStats')


def test_repeated_keys_and_sorted_membership():
    keys = np.array([5, 3, 9, 3, 5, 5, 1], dtype=np.uint64)
    repeated = deduplication.repeated_keys(keys)
    assert repeated.tolist() == [3, 5]
    assert deduplication.is_in_sorted(keys, repeated).tolist() == [
        True, True, False, True, True, True, False]
    assert not deduplication.is_in_sorted(keys, np.zeros(0, np.uint64)).any()


def test_only_rows_of_repeated_pairs_go_through_the_duplicate_check():
    """A first pass finds the repeated pairs; the others pass by the grouping, without lines."""
    first, second = DUPLICATE_ROWS[::2], DUPLICATE_ROWS[1::2]
    batches = [_parsed_table(first).to_batches()[0], _parsed_table(second).to_batches()[0]]
    with BeamTestPipeline(runner=preprocess.DEFAULT_RUNNER) as p:
        valid = p | beam.Create(batches)
        repeated = valid | deduplication.FindRepeatedPairs()
        unique, splits = preprocess.deduplicate_and_split(
            valid, repeated, num_buckets=3, seed=1, eval_percent=50)
        rows = ((splits[features.TRAIN], splits[features.EVAL]) | 'Both' >> beam.Flatten()
                | 'Rows' >> beam.FlatMap(lambda batch: zip(
                    batch.column(features.USER_ID).to_pylist(),
                    batch.column(features.RATING).to_pylist())))
        assert_that(rows, equal_to([([str(row[0]).encode()], [row[2]]) for row in KEPT]),
                    label='CheckKept')
        rejected = unique[deduplication.DeduplicateRatings.REJECTED] | 'Lines' >> beam.FlatMap(
            lambda block: [line for _, line in csv.reader(block.split('\n'))])
        assert_that(rejected, equal_to(['1\t1\t2\t100', '1\t1\t5\t200', '2\t1\t3\t500',
                                        '3\t1\t2\t700', ' 4\t1\t3\t800', '04\t1\t3\t800']),
                    label='CheckRejected')
        totals = (unique[deduplication.DeduplicateRatings.STATS] | 'MergeStats' >> beam.Flatten()
                  | beam.CombineGlobally(rating_reader.SumStatsFn()))
        # (1, 2) and (5, 1) are rated once: accepted without the grouping.
        assert_that(totals, equal_to([{'rows_accepted': 6, 'rejected:duplicate_rating': 6}]),
                    label='CheckStats')


@pytest.mark.parametrize('line', ['1\t2\t3\t4', '1,2,"3",4', 'a,b', '', ' x ', '1\t2\r3\t4'])
def test_rejected_rows_read_back_as_written(line):
    text = rating_parser.format_rejected([('some_reason', line), ('other', line)])
    assert text.count('\n') == 1
    assert list(csv.reader(io.StringIO(text, newline=''))) == [['some_reason', line],
                                                                ['other', line]]


# --- preprocess.main on whole files of bad input. -------------------------------------
def _valid_rows(n_users: int, n_movies: int, layout: features.DatasetLayout, seed: int
                ) -> list[tuple[int, int, float, int]]:
    rng = np.random.default_rng(seed)
    steps = int(round((layout.rating_max - layout.rating_min) / layout.rating_step))
    return [(u, m, layout.rating_min + layout.rating_step * int(rng.integers(0, steps + 1)),
             880_000_000 + 100 * u + m)
            for u in range(1, n_users + 1) for m in range(1, n_movies + 1)
            if rng.random() < 0.5]


def _line(row: tuple[int, int, float, int], layout: features.DatasetLayout) -> str:
    rating = f'{row[2]:g}' if layout.rating_step == 1 else f'{row[2]:.1f}'
    return layout.ratings_separator.join([str(row[0]), str(row[1]), rating, str(row[3])])


class Corpus:
    """Lines to write, and what preprocess must do with each.

    Valid lines carry their row; the expected output is the latest row per
    pair, by the documented rule, computed here independently.
    """

    def __init__(self, layout: features.DatasetLayout):
        self.layout = layout
        self.lines: list[bytes] = []
        self.rows: list[tuple[tuple[int, int, float, int], str]] = []  # (row, line as read)
        self.rejected: list[tuple[str, str]] = []

    def valid(self, row: tuple[int, int, float, int], line: bytes | None = None) -> None:
        line = line if line is not None else _line(row, self.layout).encode()
        self.lines.append(line)
        self.rows.append((row, line.decode('utf-8').rstrip('\r')))

    def bad(self, line: bytes, reason: str) -> None:
        self.lines.append(line)
        self.rejected.append((reason, line.decode('utf-8', 'backslashreplace').rstrip('\r')))

    def expected(self) -> tuple[dict[tuple[int, int], float], list[tuple[str, str]]]:
        """(rating per kept pair, every rejected (reason, line) incl. duplicates)."""
        best: dict[tuple[int, int], tuple] = {}
        for row, line in self.rows:
            key = (row[3], row[2], line)
            if (row[0], row[1]) not in best or key > best[(row[0], row[1])][0]:
                best[(row[0], row[1])] = (key, row, line)
        duplicates = list(self.rows)
        for _, row, line in best.values():
            duplicates.remove((row, line))
        return ({pair: row[2] for pair, (_, row, _) in best.items()},
                self.rejected + [(P.DUPLICATE_RATING, line) for _, line in duplicates])


def _every_bad_line(corpus: Corpus, user: int) -> None:
    """One line per rejection reason, on users from `user` up (no clash with valid rows)."""
    def row(*fields: bytes) -> bytes:
        return corpus.layout.ratings_separator.encode().join(fields)

    u = str(user).encode()
    corpus.bad(row(u, b'1', b'3'), P.WRONG_FIELD_COUNT)
    corpus.bad(row(u, b'1', b'3', b'5', b'9'), P.WRONG_FIELD_COUNT)
    corpus.bad(row(b'', b'1', b'3', b'5'), P.EMPTY_ID)
    corpus.bad(row(b'x' + u, b'1', b'3', b'5'), P.NON_NUMERIC_ID)
    corpus.bad(row(u, b'1', b'', b'5'), P.NON_NUMERIC_RATING)
    corpus.bad(row(u, b'1', b'nan', b'5'), P.RATING_NOT_FINITE)
    corpus.bad(row(u, b'1', b'inf', b'5'), P.RATING_NOT_FINITE)
    corpus.bad(row(u, b'1', b'9', b'5'), P.RATING_OUT_OF_RANGE)
    corpus.bad(row(u, b'1', b'3', b'soon'), P.BAD_TIMESTAMP)
    corpus.bad(row(u, b'1', b'3', b'5\xe9'), P.NOT_UTF8)
    corpus.bad(b'', P.BLANK_LINE)


def _stage(work_dir: str, layout: features.DatasetLayout, data: bytes) -> None:
    raw = os.path.join(work_dir, features.RAW_DIR)
    os.makedirs(raw, exist_ok=True)
    with open(os.path.join(raw, layout.ratings_file), 'wb') as f:
        f.write(data)
    features.write_json(os.path.join(raw, features.SOURCE_FILE), features.SourceInfo(
        dataset=layout.name, layout=layout.name, source='test', md5=''))


def _outputs(work_dir: str) -> tuple[dict[tuple[int, int], float], list[tuple[str, str]]]:
    """(rating per (user, movie) in the TFRecords, (reason, line) rows in rejected/)."""
    info = features.read_dataset_info(work_dir)
    files = sorted(glob.glob(info.train_pattern) + glob.glob(info.eval_pattern))
    spec = {key: features.TRANSFORMED_FEATURE_SPEC[key]
            for key in (features.USER_ID, features.MOVIE_ID, features.RATING)}
    written: dict[tuple[int, int], float] = {}
    count = 0
    for batch in tf.data.TFRecordDataset(files, compression_type='GZIP').batch(4096):
        parsed = tf.io.parse_example(batch, spec)
        for user, movie, rating in zip(parsed[features.USER_ID].numpy(),
                                       parsed[features.MOVIE_ID].numpy(),
                                       parsed[features.RATING].numpy()):
            written[(int(user), int(movie))] = float(rating)
            count += 1
    assert count == len(written), 'a (user, movie) pair was written twice'
    rejected = []
    for path in glob.glob(os.path.join(features.transformed_dir(work_dir),
                                       features.REJECTED_DIR, '*.csv')):
        with open(path, encoding='utf-8', newline='') as f:
            rows = list(csv.reader(f))
        assert rows[0] == ['reason', 'line']
        rejected += [tuple(row) for row in rows[1:]]
    return written, rejected


def _check_accounts(work_dir: str, corpus: Corpus, rows_read: int) -> features.DatasetInfo:
    """Counts add up, rejects are kept with reasons, no valid row is lost."""
    info = features.read_dataset_info(work_dir)
    kept, rejected = corpus.expected()
    assert info.rows_read == rows_read
    assert info.rows_read == info.rows_accepted + info.rows_rejected
    assert info.rows_accepted == info.train_ratings + info.eval_ratings == len(kept)
    reasons: dict[str, int] = {}
    for reason, _ in rejected:
        reasons[reason] = reasons.get(reason, 0) + 1
    assert info.rejected_by_reason == reasons
    written, written_rejected = _outputs(work_dir)
    assert written == kept
    assert sorted(written_rejected) == sorted(rejected)
    return info


def test_main_on_every_kind_of_bad_line(work_dir):
    """ml-100k layout: BOM, mixed LF/CRLF, a header in the middle, every reason,
    duplicates near and far apart, trailing blank lines."""
    corpus = Corpus(ML_100K)
    good = _valid_rows(30, 25, ML_100K, seed=1)
    first = good[0]
    corpus.valid(first, b'\xef\xbb\xbf' + _line(first, ML_100K).encode())
    for row in good[1:200]:
        corpus.valid(row)
    _every_bad_line(corpus, user=9000)
    corpus.bad(b'user_id\titem_id\trating\ttimestamp', P.HEADER_LINE)
    corpus.bad(b'1\t1\t3.5\t5', P.RATING_OFF_STEP)
    corpus.valid((9001, 1, 2.0, 100))
    corpus.valid((9001, 1, 4.0, 300))           # latest: kept
    corpus.valid((9002, 1, 3.0, 500))
    corpus.valid((9003, 1, 2.0, 700))
    corpus.valid((9003, 1, 2.0, 700))           # exact repeat: one kept
    corpus.valid((9004, 1, 3.0, 800), b' 9004\t1\t3\t800')
    corpus.valid((9004, 1, 3.0, 800), b'09004\t1\t3\t800')
    corpus.valid((9005, 1, 4.0, 900))
    corpus.bad(b'9005\t1\t9\t901', P.RATING_OUT_OF_RANGE)  # a bad twin is no duplicate
    for row in good[200:]:
        corpus.valid(row)
    corpus.valid((9001, 1, 5.0, 200))           # far from its pair, older: rejected
    corpus.valid((9002, 1, 5.0, 500))           # same time, higher rating: kept
    corpus.valid((first[0], first[1], 1.0, first[3] + 1))  # a later re-rating of row 1
    corpus.valid((9004, 1, 3.0, 800))           # '9004\t...' sorts last: kept
    corpus.bad(b'', P.BLANK_LINE)
    corpus.bad(b'', P.BLANK_LINE)
    ends = [b'\r\n' if i % 3 == 0 else b'\n' for i in range(len(corpus.lines))]
    _stage(work_dir, ML_100K, b''.join(line + end for line, end in zip(corpus.lines, ends)))

    assert preprocess.main(['--work-dir', work_dir]) == 0

    info = _check_accounts(work_dir, corpus, rows_read=len(corpus.lines))
    assert info.rejected_by_reason[P.DUPLICATE_RATING] == 7
    assert set(info.rejected_by_reason) == {
        P.WRONG_FIELD_COUNT, P.EMPTY_ID, P.NON_NUMERIC_ID, P.NON_NUMERIC_RATING,
        P.RATING_NOT_FINITE, P.RATING_OUT_OF_RANGE, P.RATING_OFF_STEP, P.BAD_TIMESTAMP,
        P.BLANK_LINE, P.HEADER_LINE, P.NOT_UTF8, P.DUPLICATE_RATING}


def test_main_on_a_csv_archive_with_bom_crlf_and_broken_titles(work_dir, tmp_path):
    """ml-25m layout through data-extractor.py: a BOM before the header, CRLF
    everywhere, half stars, titles that are not UTF-8 (staged byte for byte,
    never read by preprocess.py) and a last line cut mid-field without newline."""
    corpus = Corpus(ML_25M)
    for row in _valid_rows(25, 20, ML_25M, seed=2):
        corpus.valid(row)
    _every_bad_line(corpus, user=9000)
    corpus.bad(b'1,2,4.25,5', P.RATING_OFF_STEP)
    corpus.bad(b'userId,movieId,rating,timestamp', P.HEADER_LINE)
    corpus.valid((9001, 1, 0.5, 10))
    corpus.valid((9001, 1, 4.5, 11))            # latest: kept
    corpus.bad(b'9002,7,3.', P.WRONG_FIELD_COUNT)  # truncated, no newline
    header = b'\xef\xbb\xbfuserId,movieId,rating,timestamp\r\n'
    ratings = header + b'\r\n'.join(corpus.lines)
    movies = b'movieId,title,genres\n1,Am\xe9lie (2001),Comedy\n2,"Heat, \xff (1995)",Action\n'
    archive = tmp_path / 'custom-ml-25m.zip'
    with zipfile.ZipFile(archive, 'w') as out:
        out.writestr(ML_25M.ratings_member, ratings)
        out.writestr(ML_25M.movies_member, movies)

    assert extractor.main(['--work-dir', work_dir, '--dataset', 'ml-25m',
                           '--data-sources', str(archive)]) == 0
    assert preprocess.main(['--work-dir', work_dir]) == 0

    raw = pathlib.Path(features.raw_dir(work_dir))
    assert (raw / ML_25M.movies_file).read_bytes() == movies
    _check_accounts(work_dir, corpus, rows_read=len(corpus.lines))  # header not counted


def test_main_keeps_the_first_row_of_a_csv_without_header(work_dir, capsys):
    corpus = Corpus(ML_25M)
    for row in _valid_rows(12, 10, ML_25M, seed=3):
        corpus.valid(row)
    _stage(work_dir, ML_25M, b'\n'.join(corpus.lines) + b'\n')

    assert preprocess.main(['--work-dir', work_dir]) == 0

    _check_accounts(work_dir, corpus, rows_read=len(corpus.lines))
    assert 'has no header line' in capsys.readouterr().err


def _expect_one_line_error(capsys, work_dir: str, phrase: str) -> None:
    """Exit 2 and one error line (after any log lines), no traceback."""
    assert preprocess.main(['--work-dir', work_dir]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if 'error' in line.lower()]
    assert len(errors) == 1 and errors[0].startswith('preprocess.py: error: ')
    assert phrase in errors[0] and 'Traceback' not in err


@pytest.mark.parametrize('data, phrase', [
    (b'', 'is empty'),
    (b'\n\n\n', 'none of the first 3 lines'),
    (b'1::2::3::4\n' * 300, "none of the first 200 lines"),   # wrong --dataset
    (b'1\t2\t9\t4\n1\t2\tnan\t4\nx\t1\t1\t1\n', 'rating_not_finite, rating_out_of_range'),
])
def test_main_on_a_file_with_nothing_valid_stops_with_one_line(work_dir, capsys, data, phrase):
    _stage(work_dir, ML_100K, data)
    _expect_one_line_error(capsys, work_dir, phrase)
    assert not os.path.exists(features.transformed_dir(work_dir))


def test_main_with_no_training_rating_stops_with_one_line(work_dir, capsys):
    """One valid rating that the hash puts in eval: nothing to train on."""
    users = np.arange(1, 100)
    user = int(users[hash_split.assign_split(users, np.ones_like(users), 42, 20)][0])
    _stage(work_dir, ML_100K, f'{user}\t1\t3\t5\nbad\n'.encode())
    _expect_one_line_error(capsys, work_dir, 'no valid training ratings')
    assert not os.path.exists(os.path.join(features.transformed_dir(work_dir),
                                           features.DATASET_INFO_FILE))
    # The half output is not taken as good by a re-run: it is refused.
    _expect_one_line_error(capsys, work_dir, '--overwrite')
