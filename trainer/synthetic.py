"""Synthetic MovieLens-format ratings with a planted answer, and their zip archive.

Owns the planted model, the choice of who rates which movie, and writing a zip
in the GroupLens layout of any `features.DATASETS` entry, so every stage can be
tested end to end without MovieLens files (which may not be redistributed).
The computation is numpy only and vectorised; `features` is imported for the
layouts alone.

Planted model (defaults in `SyntheticConfig`)::

    signal = global_mean + user_bias[u] + item_bias[i] + user_factors[u] . item_factors[i]
    rating = clip(round_to_step(signal + noise), rating_min, rating_max)
    oracle = clip(signal, rating_min, rating_max)

with user_bias ~ N(0, 0.4), item_bias ~ N(0, 0.5), rank-3 factors whose
entries are N(0, factor_std), factor_std = sqrt(0.6 / sqrt(3)), so the dot
product has standard deviation `interaction_std` = 0.6, and noise ~ N(0, 0.9).
On the default 100k ratings (ml-100k layout, seed 0) ratings average 3.55 with
standard deviation 1.12 (ml-100k: 3.53 and 1.13), the noise floor (RMSE of
`oracle` against the ratings) is 0.854 and predicting the mean scores 1.12.

Why these scales: a biased MF must estimate (rank + 1) numbers per user and
movie, which costs about (rank + 1) * (users + movies) / train_ratings of the
noise variance. With ml-100k's sizes, rank 3 keeps that near 5% of RMSE:
ALS with the planted rank and a ridge penalty of 4 per parameter reaches
1.051x the noise floor of held-out ratings when 80% of the ratings train it
and 1.042x with 90% (planting rank 4 instead: 1.062x; rank 2: 1.044x).
Noise std 1.0 instead of 0.9 moved that ratio by under 1%: the rank sets it.
`oracle` is not quite the best predictor: near the ends of the scale clipping
the noisy rating pulls its mean inwards, so E[rating] scores 0.849, 0.7% less.

Who rates what: each user rates at least min(20, num_ratings // num_users)
movies (like MovieLens' 20), at most half the movies; the rest follow a
lognormal user activity (sigma 1.1) and movie popularity (sigma 1.3), giving
the long tails of MovieLens: a few users and movies with hundreds of ratings,
many movies with a handful. Every (user, movie) pair occurs at most once.

By default who rates what is independent of the ratings, so which movies a
user rated says nothing about their taste. Real users pick movies they expect
to like, which is what an SVD++-style implicit-feedback term exploits;
`selection_bias` s > 0 plants that: each user's movies are the counts[u] best
of SELECTION_CANDIDATES times as many drawn by popularity, ranked by
s * (item_bias + user_factors . item_factors) plus Gumbel noise, i.e. drawn
without replacement with probability proportional to exp(s * score).  At
s = 0 the draws and bytes are those of the unbiased generator.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import posixpath
import urllib.parse
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from trainer import features

MIN_RATINGS_PER_USER = 5
MOVIELENS_RATINGS_PER_USER = 20
# Sampling rounds drawn by popularity before the remaining deficits are drawn
# uniformly: a heavy user who already has every popular movie would otherwise
# need many rounds to find unseen tail movies.
_POPULARITY_ROUNDS = 4
# With selection_bias, each user's movies are picked from this many times as
# many candidates (at most SELECTION_MAX_SHARE of all movies).
SELECTION_CANDIDATES = 3
SELECTION_MAX_SHARE = 0.75
_CHUNK_ROWS = 1_000_000
_ZIP_DATE_TIME = (2000, 1, 1, 0, 0, 0)
# 1997-09-20 .. 1998-04-23, the span of ml-100k.
_FIRST_TIMESTAMP = 874_724_710
_LAST_TIMESTAMP = 893_286_638
_MEAN_ACTIVE_SECONDS = 30 * 24 * 3600
_GENRES = (
    'Action', 'Adventure', 'Animation', "Children's", 'Comedy', 'Crime',
    'Documentary', 'Drama', 'Fantasy', 'Film-Noir', 'Horror', 'Musical',
    'Mystery', 'Romance', 'Sci-Fi', 'Thriller', 'War', 'Western')
# Titles as real MovieLens files spell them: non-ASCII letters, commas and
# double quotes (which movies.csv must quote). Movies 1.. get those that the
# layout's encoding can represent; the rest are 'Movie <id> (<year>)'.
_SPECIAL_TITLES = (
    "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)",
    'City of Lost Children, The (Cité des enfants perdus, La) (1995)',
    'Crouching Tiger, Hidden Dragon (Wo hu cang long) (2000)',
    'Léon: The Professional (a.k.a. The Professional) (Léon) (1994)',
    '"Great Performances" Cats (1998)',
    "Kiki's Delivery Service (魔女の宅急便) (1989)",
)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Sizes, seed, layout and planted-model parameters of a synthetic data set.

    Attributes:
      num_users: users, ids 1..num_users; each rates at least 5 movies.
      num_movies: movies, ids 1..num_movies (some may have no rating).
      num_ratings: exact number of ratings; at most half of all pairs.
      seed: seeds every random draw; the same config gives the same bytes.
      layout: the features.DATASETS key whose formats, rating scale, step
        and title encoding the data follow.
      rank: the number of planted latent factors.
      global_mean: the planted mean before rounding and clipping.
      user_bias_std: standard deviation of the planted user biases.
      item_bias_std: standard deviation of the planted movie biases.
      interaction_std: standard deviation of user_factors . item_factors.
      noise_std: standard deviation of the Gaussian noise on each rating.
      user_activity_sigma: lognormal sigma of how many movies a user rates.
      movie_popularity_sigma: lognormal sigma of how often a movie is picked.
      selection_bias: how strongly users pick movies they like (0: not at
        all; see the module doc).
    """
    num_users: int = 943
    num_movies: int = 1682
    num_ratings: int = 100_000
    seed: int = 0
    layout: str = features.ML_100K.name
    rank: int = 3
    global_mean: float = 3.6
    user_bias_std: float = 0.4
    item_bias_std: float = 0.5
    interaction_std: float = 0.6
    noise_std: float = 0.9
    user_activity_sigma: float = 1.1
    movie_popularity_sigma: float = 1.3
    selection_bias: float = 0.0

    def __post_init__(self) -> None:
        if self.layout not in features.DATASETS:
            raise ValueError(f'layout {self.layout!r} is not one of '
                             f'{sorted(features.DATASETS)}')
        if self.num_users < 1 or self.num_movies < 2 * MIN_RATINGS_PER_USER:
            raise ValueError(
                f'need num_users >= 1 and num_movies >= {2 * MIN_RATINGS_PER_USER}, '
                f'got {self.num_users} and {self.num_movies}')
        low = MIN_RATINGS_PER_USER * self.num_users
        high = self.num_users * (self.num_movies // 2)
        if not low <= self.num_ratings <= high:
            raise ValueError(
                f'num_ratings {self.num_ratings} must lie in [{low}, {high}]: at least '
                f'{MIN_RATINGS_PER_USER} per user, at most half the movies per user')
        if self.rank < 1 or min(self.user_bias_std, self.item_bias_std,
                                self.interaction_std, self.noise_std) < 0:
            raise ValueError('rank must be >= 1 and every std >= 0')
        if not 0 <= self.selection_bias < float('inf'):
            raise ValueError(f'selection_bias must be >= 0, got {self.selection_bias!r}')

    @property
    def factor_std(self) -> float:
        """Per-entry std of both factor matrices giving `interaction_std`."""
        return float(np.sqrt(self.interaction_std / np.sqrt(self.rank)))


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticRatings:
    """Generated ratings, one array element per rating.

    Attributes:
      user_ids: int32, 1-based user ids.
      movie_ids: int32, 1-based movie ids; pairs with user_ids are unique.
      ratings: float32, on the layout's scale and step.
      timestamps: int64 Unix seconds.
      oracle: float32, the noiseless planted prediction clipped to the scale.
      titles: one title per movie; titles[movie_id - 1].
      genres: '|'-joined genres per movie, indexed like titles.
      truth: noise floor, global-mean RMSE, config and planted scales.
    """
    user_ids: np.ndarray
    movie_ids: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    oracle: np.ndarray
    titles: list[str]
    genres: list[str]
    truth: dict[str, Any]


def generate(config: SyntheticConfig) -> SyntheticRatings:
    """Draws ratings from the planted model of `config` (see the module doc)."""
    layout = features.DATASETS[config.layout]
    streams = [np.random.default_rng(s)
               for s in np.random.SeedSequence(config.seed).spawn(6)]
    counts_rng, pairs_rng, model_rng, noise_rng, extras_rng, selection_rng = streams
    counts = sample_user_counts(counts_rng, config)
    popularity = model_rng.lognormal(0.0, config.movie_popularity_sigma, config.num_movies)
    planted = planted_model(model_rng, config)
    if config.selection_bias:
        candidates = np.minimum(SELECTION_CANDIDATES * counts,
                                int(SELECTION_MAX_SHARE * config.num_movies))
        users, movies = sample_pairs(pairs_rng, np.maximum(candidates, counts),
                                     popularity / popularity.sum())
        users, movies = select_liked(selection_rng, config.selection_bias, planted,
                                     counts, users, movies)
    else:
        users, movies = sample_pairs(pairs_rng, counts, popularity / popularity.sum())
    signal = planted_signal(planted, config, users, movies)
    noisy = signal + noise_rng.normal(0.0, config.noise_std, signal.shape)
    ratings = np.clip(np.round(noisy / layout.rating_step) * layout.rating_step,
                      layout.rating_min, layout.rating_max).astype(np.float32)
    oracle = np.clip(signal, layout.rating_min, layout.rating_max).astype(np.float32)
    titles, genres = make_titles(extras_rng, config.num_movies, layout.movies_encoding)
    return SyntheticRatings(
        user_ids=(users + 1).astype(np.int32), movie_ids=(movies + 1).astype(np.int32),
        ratings=ratings, timestamps=sample_timestamps(extras_rng, counts),
        oracle=oracle, titles=titles, genres=genres,
        truth=make_truth(config, ratings, oracle))


def sample_user_counts(rng: np.random.Generator, config: SyntheticConfig) -> np.ndarray:
    """How many movies each user rates: a floor plus lognormal activity, capped."""
    floor = min(MOVIELENS_RATINGS_PER_USER, config.num_ratings // config.num_users)
    cap = config.num_movies // 2
    activity = rng.lognormal(0.0, config.user_activity_sigma, config.num_users)
    counts = floor + rng.multinomial(
        config.num_ratings - floor * config.num_users, activity / activity.sum())
    overflow = int(np.maximum(counts - cap, 0).sum())
    while overflow:  # hand what the capped users drew to the others
        counts = np.minimum(counts, cap)
        room = np.where(counts < cap, activity, 0.0)
        counts = counts + rng.multinomial(overflow, room / room.sum())
        overflow = int(np.maximum(counts - cap, 0).sum())
    return counts


def sample_pairs(rng: np.random.Generator, counts: np.ndarray,
                 popularity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Draws counts[u] distinct movies per user u, by popularity.

    Each round draws every user's missing movies with replacement and keeps
    the pairs not seen yet, so rounds shrink fast and no loop runs per rating.

    Returns:
      0-based (users, movies), sorted by user then movie.
    """
    num_movies = popularity.size
    accepted = np.empty(0, np.int64)  # sorted keys user * num_movies + movie
    missing = counts.astype(np.int64)
    draws = 0
    while missing.any():
        users = np.repeat(np.arange(counts.size, dtype=np.int64), missing)
        probabilities = popularity if draws < _POPULARITY_ROUNDS else None
        keys = np.sort(users * num_movies + rng.choice(num_movies, users.size, p=probabilities))
        keys = keys[np.r_[True, keys[1:] != keys[:-1]]]  # np.unique hashes: slower
        position = np.searchsorted(accepted, keys)
        seen = np.zeros(keys.size, bool)
        if accepted.size:
            seen = accepted[np.minimum(position, accepted.size - 1)] == keys
        keys, position = keys[~seen], position[~seen]
        accepted = np.insert(accepted, position, keys)
        missing -= np.bincount(keys // num_movies, minlength=counts.size)
        draws += 1
    return accepted // num_movies, accepted % num_movies


def planted_model(rng: np.random.Generator, config: SyntheticConfig) -> dict[str, np.ndarray]:
    """Draws the planted biases and factors (0-based rows)."""
    return {
        'user_bias': rng.normal(0.0, config.user_bias_std, config.num_users),
        'item_bias': rng.normal(0.0, config.item_bias_std, config.num_movies),
        'user_factors': rng.normal(0.0, config.factor_std, (config.num_users, config.rank)),
        'item_factors': rng.normal(0.0, config.factor_std, (config.num_movies, config.rank))}


def _interaction(planted: dict[str, np.ndarray], users: np.ndarray,
                 movies: np.ndarray) -> np.ndarray:
    """user_factors . item_factors per pair, one column at a time to bound memory."""
    user_factors, item_factors = planted['user_factors'], planted['item_factors']
    total = np.zeros(users.size)
    for factor in range(user_factors.shape[1]):
        total += user_factors[users, factor] * item_factors[movies, factor]
    return total


def planted_signal(planted: dict[str, np.ndarray], config: SyntheticConfig,
                   users: np.ndarray, movies: np.ndarray) -> np.ndarray:
    """The noiseless planted rating of each (user, movie) pair, unclipped."""
    return (config.global_mean + planted['user_bias'][users] + planted['item_bias'][movies]
            + _interaction(planted, users, movies))


def select_liked(rng: np.random.Generator, strength: float, planted: dict[str, np.ndarray],
                 counts: np.ndarray, users: np.ndarray,
                 movies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keeps each user's counts[u] candidates they like best, with Gumbel noise.

    Gumbel-top-k: the k largest of strength * score + Gumbel noise are a
    draw without replacement with probabilities proportional to
    exp(strength * score), score = item_bias + user_factors . item_factors.

    Args:
      users, movies: the candidates, 0-based, sorted by user.

    Returns:
      The kept 0-based (users, movies), sorted by user then movie.
    """
    score = planted['item_bias'][movies] + _interaction(planted, users, movies)
    key = strength * score + rng.gumbel(size=users.size)
    order = np.lexsort((-key, users))  # by user, best first
    first = np.searchsorted(users, np.arange(counts.size))  # users is sorted
    rank = np.arange(users.size) - first[users[order]]
    kept = order[rank < counts[users[order]]]
    kept = kept[np.lexsort((movies[kept], users[kept]))]
    return users[kept], movies[kept]


def sample_timestamps(rng: np.random.Generator, counts: np.ndarray) -> np.ndarray:
    """Unix times: each user rates within an active spell inside ml-100k's span."""
    start = rng.integers(_FIRST_TIMESTAMP, _LAST_TIMESTAMP, counts.size)
    spell = rng.exponential(_MEAN_ACTIVE_SECONDS, counts.size)
    offset = rng.random(int(counts.sum())) * np.repeat(spell, counts)
    return np.minimum(np.repeat(start, counts) + offset.astype(np.int64), _LAST_TIMESTAMP)


def make_titles(rng: np.random.Generator, num_movies: int,
                encoding: str) -> tuple[list[str], list[str]]:
    """Movie titles (some non-ASCII, some with commas) and '|'-joined genres."""
    special = [title for title in _SPECIAL_TITLES if _encodable(title, encoding)]
    years = rng.integers(1930, 2001, num_movies)
    titles = [f'Movie {movie_id} ({year})' for movie_id, year in
              zip(range(1, num_movies + 1), years.tolist())]
    titles[:len(special)] = special[:num_movies]
    picks = rng.random((num_movies, len(_GENRES))) < 0.12
    picks[np.arange(num_movies), rng.integers(0, len(_GENRES), num_movies)] = True
    genres = ['|'.join(g for g, on in zip(_GENRES, row) if on) for row in picks.tolist()]
    return titles, genres


def _encodable(text: str, encoding: str) -> bool:
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return False
    return True


def config_fields(config: SyntheticConfig) -> dict[str, Any]:
    """The config as a dict; selection_bias only when set, so unbiased data
    keep the truth.json bytes and staged source they had before it existed."""
    fields = dataclasses.asdict(config)
    if not config.selection_bias:
        del fields['selection_bias']
    return fields


def make_truth(config: SyntheticConfig, ratings: np.ndarray,
               oracle: np.ndarray) -> dict[str, Any]:
    """The planted answer: noise floor, baseline RMSE, config and scales."""
    ratings64 = ratings.astype(np.float64)
    mean = float(ratings64.mean())
    truth = config_fields(config)
    truth.update(
        factor_std=config.factor_std,
        noise_floor_rmse=float(np.sqrt(np.mean((oracle - ratings64) ** 2))),
        global_mean_rmse=float(np.sqrt(np.mean((ratings64 - mean) ** 2))),
        rating_mean=mean,
        rating_std=float(ratings64.std()))
    return truth


def write_archive(path: str, config: SyntheticConfig) -> dict[str, Any]:
    """Writes a zip laid out like the GroupLens archive of `config.layout`.

    Members: the layout's ratings and movies files plus `<folder>/truth.json`.
    Member dates are fixed, so the same config gives the same bytes.

    Args:
      path: a local file path for the zip.
      config: what to generate.

    Returns:
      The truth dict, as also stored in truth.json.
    """
    layout = features.DATASETS[config.layout]
    data = generate(config)
    folder = posixpath.dirname(layout.ratings_member)
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(_zip_info(folder + '/'), b'')
        with archive.open(_zip_info(layout.ratings_member), 'w', force_zip64=True) as stream:
            for chunk in format_ratings(data, layout):
                stream.write(chunk)
        archive.writestr(_zip_info(layout.movies_member),
                         format_movies(data, layout).encode(layout.movies_encoding))
        archive.writestr(_zip_info(posixpath.join(folder, features.TRUTH_FILE)),
                         features.to_json(data.truth))
    return data.truth


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    # Level 1 deflates 25M ratings five times faster than the default 6, for
    # a 15% larger temp file. ZipInfo has no public setter before Python 3.13.
    info._compresslevel = 1  # pylint: disable=protected-access
    info.create_system = 3  # Unix, whatever machine writes the zip
    info.external_attr = (0o40755 if name.endswith('/') else 0o100644) << 16
    return info


def format_ratings(data: SyntheticRatings,
                   layout: features.DatasetLayout) -> Iterator[bytes]:
    """The ratings file, in chunks of bytes, as the layout writes it.

    Whole-star layouts write '4', half-star layouts '4.0' and '3.5'. Lines are
    built as byte matrices (digits right-aligned, padding dropped), which is
    far faster than formatting 25M lines one by one.
    """
    if layout.ratings_header:
        yield layout.ratings_separator.join(_CSV_RATING_COLUMNS).encode() + b'\n'
    separator = np.frombuffer(layout.ratings_separator.encode(), np.uint8)
    half_stars = layout.rating_step != int(layout.rating_step)
    for begin in range(0, data.ratings.size, _CHUNK_ROWS):
        rows = slice(begin, begin + _CHUNK_ROWS)
        stars = data.ratings[rows].astype(np.float64)
        rating = [_digits(np.floor(stars).astype(np.int64))]
        if half_stars:
            tenths = np.round((stars - np.floor(stars)) * 10).astype(np.int64)
            rating += [np.frombuffer(b'.', np.uint8), _digits(tenths)]
        fields = [[_digits(data.user_ids[rows])], [_digits(data.movie_ids[rows])],
                  rating, [_digits(data.timestamps[rows])]]
        parts = []
        for field in fields:
            parts += field + [separator]
        parts[-1] = np.frombuffer(b'\n', np.uint8)
        yield _join_columns(parts, stars.size)


_CSV_RATING_COLUMNS = ('userId', 'movieId', 'rating', 'timestamp')
_CSV_MOVIE_COLUMNS = ('movieId', 'title', 'genres')


def _digits(values: np.ndarray) -> np.ndarray:
    """ASCII digits of non-negative ints as an (n, width) uint8 matrix, 0-padded left."""
    values = values.astype(np.int64)
    width = len(str(int(values.max()))) if values.size else 1
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    digits = ((values[:, None] // powers) % 10 + ord('0')).astype(np.uint8)
    padding = values[:, None] < powers
    padding[:, -1] = False  # 0 is written as '0'
    digits[padding] = 0
    return digits


def _join_columns(parts: list[np.ndarray], rows: int) -> bytes:
    """Lays digit matrices and constant byte strings side by side, drops padding."""
    matrix = np.hstack([part if part.ndim == 2 else np.broadcast_to(part, (rows, part.size))
                        for part in parts])
    flat = matrix.ravel()
    return flat[flat != 0].tobytes()


def format_movies(data: SyntheticRatings, layout: features.DatasetLayout) -> str:
    """The movie-title file as the layout writes it (u.item, movies.dat or movies.csv)."""
    movie_ids = range(1, len(data.titles) + 1)
    if layout.movies_separator == ',':
        text = io.StringIO()
        writer = csv.writer(text, lineterminator='\n')
        writer.writerow(_CSV_MOVIE_COLUMNS)
        writer.writerows(zip(movie_ids, data.titles, data.genres))
        return text.getvalue()
    if layout.movies_separator == '|':
        return ''.join(_u_item_line(movie_id, title, genres) for movie_id, title, genres
                       in zip(movie_ids, data.titles, data.genres))
    return ''.join(f'{movie_id}::{title}::{genres}\n' for movie_id, title, genres
                   in zip(movie_ids, data.titles, data.genres))


def _u_item_line(movie_id: int, title: str, genres: str) -> str:
    """id|title|release date|video release date|IMDb URL|unknown|18 genre flags."""
    year = title.rstrip(')')[-4:]
    url = 'http://us.imdb.com/M/title-exact?' + urllib.parse.quote(title)
    chosen = set(genres.split('|'))
    flags = ['0'] + ['1' if genre in chosen else '0' for genre in _GENRES]
    return '|'.join([str(movie_id), title, f'01-Jan-{year}', '', url, *flags]) + '\n'
