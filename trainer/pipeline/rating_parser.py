"""Rating lines -> parsed rows, or the reason each line is rejected.

Owns the rejection reasons (the keys of dataset_info.json's
rejected_by_reason and the first column of rejected/*.csv), the schema of
parsed rows (`PARSED_SCHEMA`, which keeps each line as read) and the parsers:
`parse_rating_line` for one line, `parse_rating_lines` for a batch (a strict
regular expression accepts the common case, converted column-wise with
pyarrow; only the other lines go through the per-line parser, which names the
reason), `count_header_lines` for the file's first line and
`format_rejected` for the rejected-rows CSV.

Pure numpy and pyarrow, no Beam: the launcher's sample check and the Beam
steps (trainer/pipeline/rating_reader.py) run the same code.  This module lives in
`trainer` so that Dataflow workers, which install the package, can import it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trainer import features

# Why a row was rejected: the key in dataset_info.json and the first column
# of the rejected-rows CSV.
BLANK_LINE = 'blank_line'
HEADER_LINE = 'header_line'
WRONG_FIELD_COUNT = 'wrong_field_count'
EMPTY_ID = 'empty_id'
NON_NUMERIC_ID = 'non_numeric_id'
NON_NUMERIC_RATING = 'non_numeric_rating'
RATING_NOT_FINITE = 'rating_not_finite'
RATING_OUT_OF_RANGE = 'rating_out_of_range'
RATING_OFF_STEP = 'rating_off_step'
BAD_TIMESTAMP = 'bad_timestamp'
NOT_UTF8 = 'not_utf8'
DUPLICATE_RATING = 'duplicate_rating'

# The column of parsed rows that keeps each line as read, so a duplicate found
# after parsing goes to rejected/ with its original text.
LINE = 'line'
# Parsed rows, before the duplicate check: numeric ids (so hashing and sorting
# need no string work), the rating and timestamp, and the line.
PARSED_SCHEMA = pa.schema([
    (features.USER_ID, pa.uint64()), (features.MOVIE_ID, pa.uint64()),
    (features.RATING, pa.float64()), (features.TIMESTAMP, pa.int64()),
    (LINE, pa.large_string())])

_NUM_FIELDS = 4
# Ids are decimal integers in every MovieLens release; 18 digits keep them
# inside uint64 for the vectorised split hash.
_MAX_ID_DIGITS = 18
# A rating as MovieLens writes it, and the spellings float() reads as non-finite.
_RATING_TEXT = re.compile(r'[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?', re.ASCII)
_NOT_FINITE_TEXT = ('nan', 'inf', 'infinity')


def parse_rating_line(
        line: str, layout: features.DatasetLayout) -> tuple[int, int, float, int]:
    """Parses one ratings line of the given layout.

    A UTF-8 byte-order mark, a trailing CR and spaces around fields are
    normalised away; ids are decimal integers, written back without leading
    zeros.  A rating is a plain decimal number ('4', '4.0', '3.5'; not '4_0'
    or non-ASCII digits, which Python's float() would take).

    Args:
      line: one line of the ratings file, without its newline.
      layout: the archive layout the line comes from.

    Returns:
      (user_id, movie_id, rating, timestamp).

    Raises:
      ValueError: with one of the reason constants of this module as message.
    """
    text = line.lstrip('\ufeff').rstrip('\r\n')
    if not text.strip():
        raise ValueError(BLANK_LINE)
    fields = [field.strip() for field in text.split(layout.ratings_separator)]
    if fields[0].lower() in ('userid', 'user_id', 'user'):
        raise ValueError(HEADER_LINE)
    if len(fields) != _NUM_FIELDS:
        raise ValueError(WRONG_FIELD_COUNT)
    user_text, movie_text, rating_text, timestamp_text = fields
    if not user_text or not movie_text:
        raise ValueError(EMPTY_ID)
    if not (_is_decimal(user_text) and _is_decimal(movie_text)):
        raise ValueError(NON_NUMERIC_ID)
    if rating_text.lower().lstrip('+-') in _NOT_FINITE_TEXT:
        raise ValueError(RATING_NOT_FINITE)
    if not _RATING_TEXT.fullmatch(rating_text):
        raise ValueError(NON_NUMERIC_RATING)
    rating = float(rating_text)
    check_rating(rating, layout)
    if not _is_decimal(timestamp_text):
        raise ValueError(BAD_TIMESTAMP)
    return int(user_text), int(movie_text), rating, int(timestamp_text)


def _is_decimal(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= _MAX_ID_DIGITS


def check_rating(rating: float, layout: features.DatasetLayout) -> None:
    """Raises ValueError with the reason when a rating is not on the layout's scale."""
    if not math.isfinite(rating):
        raise ValueError(RATING_NOT_FINITE)
    if not layout.rating_min <= rating <= layout.rating_max:
        raise ValueError(RATING_OUT_OF_RANGE)
    steps = (rating - layout.rating_min) / layout.rating_step
    if abs(steps - round(steps)) > 1e-6:
        raise ValueError(RATING_OFF_STEP)


def _strict_pattern(layout: features.DatasetLayout) -> str:
    """A regex that only clean lines of the layout match in full."""
    sep = re.escape(layout.ratings_separator)
    digits = r'\d{1,%d}' % _MAX_ID_DIGITS
    return f'^{digits}{sep}{digits}{sep}\\d{{1,2}}(\\.\\d+)?{sep}{digits}$'


@dataclasses.dataclass(frozen=True)
class ParsedBatch:
    """The outcome of parsing a batch of lines.

    Attributes:
      valid: a RecordBatch of the accepted rows, in PARSED_SCHEMA.
      rejected: (reason, line) for every rejected line, in input order.
    """
    valid: pa.RecordBatch
    rejected: list[tuple[str, str]]


def parse_rating_lines(lines: Sequence[str] | Sequence[bytes] | pa.Array,
                       layout: features.DatasetLayout) -> ParsedBatch:
    """Parses a batch of ratings lines, column-wise where the lines are clean.

    Lines that match the layout's strict pattern and whose rating is on the
    scale are converted with pyarrow in one go; every other line goes through
    `parse_rating_line`, which either accepts it (after normalising it) or
    names why it is rejected.  Lines given as bytes (a list, or an Arrow
    binary array as `blockio.ReadLineBlocks` emits) that are not UTF-8 are
    rejected as NOT_UTF8, shown with backslash escapes (b'\\xe9' as '\\\\xe9').
    """
    text = decode_lines(lines)
    clean = pc.fill_null(pc.match_substring_regex(text, _strict_pattern(layout)), False)
    columns = pc.split_pattern(pc.filter(text, clean), layout.ratings_separator)
    users = _column(columns, 0, pa.uint64())
    movies = _column(columns, 1, pa.uint64())
    ratings = _column(columns, 2, pa.float64())
    timestamps = _column(columns, 3, pa.int64())
    on_scale = _on_scale(ratings, layout)

    fast = np.asarray(clean.to_numpy(zero_copy_only=False), dtype=bool)
    fast[np.flatnonzero(fast)[~on_scale]] = False
    slow = np.flatnonzero(~fast)
    slow_rows, slow_lines, rejected = _parse_slowly(
        pc.take(text, pa.array(slow, pa.int64())).to_pylist(),
        _take(lines, slow), layout)
    kept_lines = pc.filter(text, pa.array(fast))
    if slow_rows:
        extra = np.array(slow_rows, dtype=object).T
        users = np.concatenate([users[on_scale], extra[0].astype(np.uint64)])
        movies = np.concatenate([movies[on_scale], extra[1].astype(np.uint64)])
        ratings = np.concatenate([ratings[on_scale], extra[2].astype(np.float64)])
        timestamps = np.concatenate([timestamps[on_scale], extra[3].astype(np.int64)])
        kept_lines = pa.concat_arrays([kept_lines, pa.array(slow_lines, pa.large_string())])
    else:
        users, movies = users[on_scale], movies[on_scale]
        ratings, timestamps = ratings[on_scale], timestamps[on_scale]
    return ParsedBatch(
        valid=make_parsed_batch(users, movies, ratings, timestamps, kept_lines),
        rejected=rejected)


def parse_id_pairs(lines: Sequence[str] | Sequence[bytes] | pa.Array,
                   layout: features.DatasetLayout) -> pa.RecordBatch:
    """The (user, movie) ids of every line `parse_rating_lines` accepts, and perhaps a few more.

    For the repeated-pairs pass, which needs only the ids: a line that starts
    with two ids as the strict pattern writes them gives them by one regular
    expression (the rest of the line is not checked, so a line rejected later
    may add its pair, which costs nothing but a row through the duplicate
    check); every other line goes through `parse_rating_lines`.

    Returns:
      A RecordBatch of uint64 USER_ID and MOVIE_ID columns.
    """
    text = decode_lines(lines)
    sep = re.escape(layout.ratings_separator)
    digits = r'\d{1,%d}' % _MAX_ID_DIGITS
    parts = pc.extract_regex(text, f'^(?P<user>{digits}){sep}(?P<movie>{digits}){sep}')
    fast = np.asarray(parts.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    found = pc.filter(parts, pa.array(fast))
    users = [np.asarray(pc.cast(found.field('user'), pa.uint64()).to_numpy(zero_copy_only=False))]
    movies = [np.asarray(pc.cast(found.field('movie'), pa.uint64()).to_numpy(zero_copy_only=False))]
    slow = np.flatnonzero(~fast)
    if len(slow):
        valid = parse_rating_lines(_take(lines, slow), layout).valid
        users.append(valid.column(features.USER_ID).to_numpy())
        movies.append(valid.column(features.MOVIE_ID).to_numpy())
    return pa.RecordBatch.from_arrays(
        [pa.array(np.concatenate(users), pa.uint64()),
         pa.array(np.concatenate(movies), pa.uint64())], [features.USER_ID, features.MOVIE_ID])


def decode_lines(lines: Sequence[str] | Sequence[bytes] | pa.Array) -> pa.Array:
    """The lines as a large_string array, null where bytes are not UTF-8.

    One validation of the whole batch in the common case; line by line only
    when the batch holds a line that is not UTF-8.
    """
    if isinstance(lines, pa.Array):
        binary = lines.cast(pa.large_binary())
    elif not lines or isinstance(lines[0], str):
        return pa.array(lines, pa.large_string())
    else:
        binary = pa.array(lines, pa.large_binary())
    try:
        return binary.cast(pa.large_string())
    except pa.ArrowInvalid:
        return pa.array([_utf8_or_none(line) for line in binary.to_pylist()],
                        pa.large_string())


def _take(lines: Sequence[str] | Sequence[bytes] | pa.Array,
          indices: np.ndarray) -> list[str] | list[bytes]:
    """The lines at `indices`, as Python values."""
    if isinstance(lines, pa.Array):
        return pc.take(lines, pa.array(indices, pa.int64())).to_pylist()
    return [lines[i] for i in indices]


def _utf8_or_none(line: bytes) -> str | None:
    try:
        return line.decode('utf-8')
    except UnicodeDecodeError:
        return None


def _column(columns: pa.Array, index: int, dtype: pa.DataType) -> np.ndarray:
    values = pc.cast(pc.list_element(columns, index), dtype)
    return np.asarray(values.to_numpy(zero_copy_only=False))


def _on_scale(ratings: np.ndarray, layout: features.DatasetLayout) -> np.ndarray:
    steps = (ratings - layout.rating_min) / layout.rating_step
    return ((ratings >= layout.rating_min) & (ratings <= layout.rating_max)
            & (np.abs(steps - np.round(steps)) <= 1e-6))


def _parse_slowly(
        texts: Sequence[str | None], originals: Sequence[str | bytes],
        layout: features.DatasetLayout,
) -> tuple[list[tuple[int, int, float, int]], list[str], list[tuple[str, str]]]:
    """The per-line path for the few lines the strict pattern did not take.

    Args:
      texts: the lines decoded, None where they are not UTF-8.
      originals: the same lines as given (str or bytes).
      layout: the layout of the lines.

    Returns:
      The accepted rows, their lines, and (reason, line) of the rejected ones.
    """
    rows, kept, rejected = [], [], []
    for text, original in zip(texts, originals):
        if text is None:
            rejected.append((NOT_UTF8, original.decode('utf-8', 'backslashreplace')))
            continue
        try:
            rows.append(parse_rating_line(text, layout))
            kept.append(text)
        except ValueError as error:
            rejected.append((str(error), text))
    return rows, kept, rejected


def make_parsed_batch(users: np.ndarray, movies: np.ndarray, ratings: np.ndarray,
                      timestamps: np.ndarray, lines: pa.Array | Sequence[str]) -> pa.RecordBatch:
    """Builds a RecordBatch of parsed rows in PARSED_SCHEMA."""
    return pa.RecordBatch.from_arrays(
        [pa.array(users, pa.uint64()), pa.array(movies, pa.uint64()),
         pa.array(ratings, pa.float64()), pa.array(timestamps, pa.int64()),
         pa.array(lines, pa.large_string())], schema=PARSED_SCHEMA)


def count_header_lines(first_line: str | bytes, layout: features.DatasetLayout) -> int:
    """1 when the file's first line is a header (in any layout), else 0.

    The header is skipped without being counted; a header anywhere else is
    rejected as HEADER_LINE.  A layout that should have a header but does not
    (say, ratings.csv cut from the middle of a file) loses no row this way.
    """
    if isinstance(first_line, bytes):
        first_line = first_line.decode('utf-8', 'replace')
    try:
        parse_rating_line(first_line, layout)
    except ValueError as error:
        return int(str(error) == HEADER_LINE)
    return 0


def format_rejected(rows: Iterable[tuple[str, str]]) -> str:
    """CSV text of (reason, line) rows, one per text line, no final newline.

    The '\\r\\n' terminator makes the csv module quote a line holding a bare CR
    (which Python 3.11 leaves unquoted with a '\\n' terminator); rows are then
    joined with '\\n', as WriteToText ends lines.  Lines never hold '\\n'.
    """
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator='\r\n').writerows(rows)
    return buffer.getvalue()[:-2].replace('\r\n', '\n')
