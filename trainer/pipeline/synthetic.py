"""Synthetic MovieLens-format ratings with a planted answer, and their zip archive.

Owns the planted model, the choice of who rates which movie, and writing a zip
in the GroupLens layout of any `features.DATASETS` entry, so every stage can be
tested end to end without MovieLens files (which may not be redistributed).
The computation is numpy only and vectorised; `features` is imported for the
layouts alone.

Two planted models (`SyntheticConfig.model`, data-extractor.py's
--synthetic-model); fields left None take the model's `MODEL_DEFAULTS`.

movielens (the default), calibrated to the real archives (docs/data.md
lists every statistic and its source)::

    signal = global_mean + user_bias[u] + item_bias[i] + sum_k user_factors[u, k] * item_factors[i, k]
             + franchise_rating * affinity[u, franchise(i)]
    rating = rating_min + step * #{j : signal + noise > threshold_j}
    oracle = E[rating | signal]

with 48 factors whose terms' variances fall as k^-spectrum_decay (1.2) and
sum to interaction_std^2 (0.65^2), biases N(0, 0.5) and N(0, 0.65), noise
N(0, 0.8 s_u) with a mean-1 lognormal s_u per user (sigma 0.3).  The thresholds are the quantiles of signal + noise at the real
archive's cumulative star shares (`RATING_COUNTS`), so the histogram is
ml-100k's, ml-1m's or ml-25m's; `oracle` is the Bayes predictor, so the
noise floor is exact.  Users rate at least 20 movies, chosen by popularity,
by taste, by interest and by franchise (below: 20x as many candidates
drawn by popularity, plus the franchises the user follows, ranked by
popularity x exp(0.5 taste + interest + 5 affinity)); half the movies form
franchises of 2-8 and each user follows about 12, with an affinity that
raises both the chance of watching the franchise and its ratings
(`planted_fandom`), the item-item structure that makes EASE lead on real
MovieLens; the interest is low-rank and weighs in who watches what only
(`planted_exposure`).  Each user's time stamps are distinct, inside the
archive's span.  truth.json adds the thresholds, the
factor variances and `ranking`, the planted ranking ceiling
(`planted_ranking`).

rank3, the earlier model (same bytes as before the movielens model existed)::

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
# movielens draws who rates what for blocks of users holding about this many
# candidate pairs (bounds memory; the draws do not depend on it below it).
_EXPOSURE_BLOCK_PAIRS = 1 << 22
_CHUNK_ROWS = 1_000_000
# --synthetic-model choices: the calibrated default and the earlier rank-3 model.
MOVIELENS = 'movielens'
RANK3 = 'rank3'
SYNTHETIC_MODELS = (MOVIELENS, RANK3)
# Each model's defaults for the SyntheticConfig fields left None.
MODEL_DEFAULTS: dict[str, dict[str, float]] = {
    RANK3: dict(rank=3, global_mean=3.6, user_bias_std=0.4, item_bias_std=0.5,
                interaction_std=0.6, noise_std=0.9, user_activity_sigma=1.1,
                movie_popularity_sigma=1.3, selection_bias=0.0),
    MOVIELENS: dict(rank=48, global_mean=3.6, user_bias_std=0.5, item_bias_std=0.65,
                    interaction_std=0.65, noise_std=0.8, user_activity_sigma=1.4,
                    movie_popularity_sigma=2.0, selection_bias=0.5),
}
# What the movielens model plants in who watches what beyond taste
# (`planted_exposure`): franchises (sequels, series, near-duplicates), the
# share of the catalogue in one, how many franchises a user follows on
# average, and how a follower's affinity weighs in their choice of movies and
# in their ratings; and a low-rank interest that weighs in the choice of
# movies only.  rank3 has neither.  A truth.json written before they existed
# lacks these fields and means none (`config_from_truth`).
EXPOSURE_DEFAULTS: dict[str, float] = dict(
    franchise_share=0.5, franchises_per_user=12.0, franchise_selection=5.0,
    franchise_rating=1.0, interest_rank=8, interest_std=2.5, selection_candidates=20.0)
# The same fields for rank3 and for a movielens truth.json written before
# they existed: none of it, and the pool of SELECTION_CANDIDATES.
EXPOSURE_LEGACY: dict[str, float] = {**{name: 0.0 for name in EXPOSURE_DEFAULTS},
                                     'selection_candidates': SELECTION_CANDIDATES}
# Franchise sizes are drawn uniformly from this range (inclusive).
FRANCHISE_SIZES = (2, 8)
# A follower's affinity: gamma distributed, mean 1 (shape x scale).
_AFFINITY_SHAPE = 2.0
# Rating counts per star of the real archives (0.5 to 5 stars for half-star
# layouts), which the movielens model reproduces as shares; docs/data.md
# gives the sources.  They sum to each archive's published rating count.
RATING_COUNTS: dict[str, tuple[int, ...]] = {
    'ml-100k': (6110, 11370, 27145, 34174, 21201),
    'ml-1m': (56174, 107557, 261197, 348971, 226310),
    'ml-25m': (393068, 776815, 399490, 1640868, 1262797, 4896928, 3177318, 6639798,
               2200539, 3612474),
}
# The first and last rating times of each archive (Unix seconds); other
# layouts take the ml-25m span.
RATING_SPANS: dict[str, tuple[int, int]] = {
    'ml-100k': (874_724_710, 893_286_638),
    'ml-1m': (956_705_158, 1_046_454_590),
    'ml-25m': (789_652_009, 1_574_327_703),
}
# The planted ranking ceiling: users sampled, share of their ratings held out.
RANKING_USERS = 1000
RANKING_HOLDOUT = 0.2
RANKING_K = 10
RELEVANT_RATING = 4.0
_RANKING_BLOCK = 128
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
      model: the planted model, 'movielens' or 'rank3' (SYNTHETIC_MODELS).
      spectrum_decay: movielens: factor k's share of the interaction
        variance falls as k^-spectrum_decay.
      user_noise_sigma: movielens: each user's noise std is noise_std times
        a lognormal factor with this sigma (and mean 1): some users rate
        consistently, others erratically.
      franchise_share: movielens: the share of movies that belong to a
        franchise (0: none, the generator before franchises).
      franchises_per_user: movielens: how many franchises a user follows,
        on average (Poisson).
      franchise_selection: movielens: weight of a follower's affinity in the
        log odds of picking the franchise's movies.
      franchise_rating: movielens: weight of a follower's affinity in the
        planted rating of the franchise's movies.
      interest_rank: movielens: factors of the interest that weighs in who
        watches what but not in ratings.
      selection_candidates: movielens: each user's movies are picked from
        this many times as many candidates drawn by popularity (rank3:
        SELECTION_CANDIDATES).
      interest_std: movielens: standard deviation of user_interest .
        item_interest, a term of the log odds of picking a movie (0: none).
    """
    num_users: int = 943
    num_movies: int = 1682
    num_ratings: int = 100_000
    seed: int = 0
    layout: str = features.ML_100K.name
    rank: int | None = None
    global_mean: float | None = None
    user_bias_std: float | None = None
    item_bias_std: float | None = None
    interaction_std: float | None = None
    noise_std: float | None = None
    user_activity_sigma: float | None = None
    movie_popularity_sigma: float | None = None
    selection_bias: float | None = None
    model: str = MOVIELENS
    spectrum_decay: float = 1.2
    user_noise_sigma: float = 0.3
    franchise_share: float | None = None
    franchises_per_user: float | None = None
    franchise_selection: float | None = None
    franchise_rating: float | None = None
    interest_rank: int | None = None
    interest_std: float | None = None
    selection_candidates: float | None = None

    def __post_init__(self) -> None:
        if self.model not in MODEL_DEFAULTS:
            raise ValueError(f'model {self.model!r} is not one of {sorted(MODEL_DEFAULTS)}')
        for name, value in MODEL_DEFAULTS[self.model].items():
            if getattr(self, name) is None:  # frozen: fill the model's default once
                object.__setattr__(self, name, value)
        for name, value in EXPOSURE_DEFAULTS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value if self.model == MOVIELENS else
                                   EXPOSURE_LEGACY[name])
        if self.model == RANK3 and self.franchise_share:
            raise ValueError('franchises need the movielens model; rank3 has none')
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
        if not 0 <= self.user_noise_sigma <= 2:
            raise ValueError(f'user_noise_sigma must lie in [0, 2], got {self.user_noise_sigma!r}')
        if not 0 <= self.spectrum_decay <= 4:
            raise ValueError(f'spectrum_decay must lie in [0, 4], got {self.spectrum_decay!r}')
        if not 0 <= self.franchise_share <= 1:
            raise ValueError(f'franchise_share must lie in [0, 1], got {self.franchise_share!r}')
        if not min(self.franchises_per_user, self.franchise_selection,
                   self.franchise_rating, self.interest_rank, self.interest_std) >= 0:
            raise ValueError('franchises_per_user, franchise_selection, franchise_rating, '
                             'interest_rank and interest_std must be >= 0')
        if not 1 <= self.selection_candidates <= 100:
            raise ValueError(f'selection_candidates must lie in [1, 100], '
                             f'got {self.selection_candidates!r}')
        if self.model == RANK3 and self.selection_candidates != SELECTION_CANDIDATES:
            raise ValueError(f'rank3 picks from {SELECTION_CANDIDATES} times as many candidates')
        if self.model == RANK3 and self.interest_std:
            raise ValueError('an interest term needs the movielens model; rank3 has none')

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
    if config.model == RANK3:
        return _generate_rank3(config)
    return _generate_movielens(config)


def _streams(seed: int, count: int) -> list[np.random.Generator]:
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(count)]


def sample_exposure(pairs_rng: np.random.Generator, selection_rng: np.random.Generator,
                    config: SyntheticConfig, counts: np.ndarray, popularity: np.ndarray,
                    planted: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Who rates what: by popularity, then (selection_bias > 0) by taste."""
    if not config.selection_bias:
        return sample_pairs(pairs_rng, counts, popularity / popularity.sum())
    candidates = np.minimum(np.round(config.selection_candidates * counts).astype(np.int64),
                            int(SELECTION_MAX_SHARE * config.num_movies))
    pool = np.maximum(candidates, counts)
    if config.model != MOVIELENS:
        users, movies = sample_pairs(pairs_rng, pool, popularity / popularity.sum())
        return select_liked(selection_rng, config.selection_bias, planted, counts, users,
                            movies)
    # movielens: users in blocks of about _EXPOSURE_BLOCK_PAIRS candidates, so
    # a large pool (selection_candidates x 25M ratings) never sits in memory.
    # The candidate draw cannot show popularity to a user whose pool holds
    # most movies; movielens ranks the pool by popularity too, so heavy
    # users do not rate the tail as often as the head.
    log_popularity = np.log(popularity)
    block = np.cumsum(pool) // _EXPOSURE_BLOCK_PAIRS
    bounds = np.flatnonzero(np.r_[True, block[1:] != block[:-1], True])
    kept = []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        users, movies = sample_pairs(pairs_rng, pool[begin:end], popularity / popularity.sum())
        users = users + begin
        if 'fan_user' in planted:  # a follower's pool holds the whole franchise
            users, movies = _with_followed(planted, config.num_movies, users, movies,
                                           begin, end)
        kept.append(select_liked(selection_rng, config.selection_bias, planted, counts, users,
                                 movies, log_popularity, config.franchise_selection))
    return (np.concatenate([users for users, _ in kept]),
            np.concatenate([movies for _, movies in kept]))


def _with_followed(planted: dict[str, np.ndarray], num_movies: int, users: np.ndarray,
                   movies: np.ndarray, begin: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """The candidate pairs plus every movie of each franchise its user follows
    (users begin..end-1), each pair once, sorted by user then movie."""
    members = np.argsort(planted['franchise'], kind='stable')
    members = members[planted['franchise'][members] >= 0]
    sizes = np.bincount(planted['franchise'][members],
                        minlength=int(planted['franchise'].max()) + 1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    fans = slice(*np.searchsorted(planted['fan_user'], [begin, end]))
    fan_franchise = planted['fan_franchise'][fans]
    fan_sizes = sizes[fan_franchise]
    fan_rows = np.repeat(np.arange(fan_sizes.size), fan_sizes)
    within = np.arange(fan_rows.size) - np.repeat(np.cumsum(fan_sizes) - fan_sizes, fan_sizes)
    followed = members[starts[fan_franchise][fan_rows] + within]
    keys = np.concatenate([users.astype(np.int64) * num_movies + movies,
                           planted['fan_user'][fans][fan_rows].astype(np.int64) * num_movies
                           + followed])
    keys = np.unique(keys)
    return keys // num_movies, keys % num_movies


def _draw_model(config: SyntheticConfig) -> dict[str, Any]:
    """The streams, counts, popularity and planted model: all but who rates what."""
    # SeedSequence children depend on their index only, so the rank-3 streams
    # are those it drew from spawn(6).
    # spawn(8)'s first seven children are spawn(7)'s: the franchise stream
    # leaves every other draw as it was.
    streams = dict(zip(('counts', 'pairs', 'model', 'noise', 'extras', 'selection',
                        'ranking', 'franchise'), _streams(config.seed, 8)))
    counts = sample_user_counts(streams['counts'], config)
    popularity = streams['model'].lognormal(0.0, config.movie_popularity_sigma,
                                            config.num_movies)
    planted = planted_model(streams['model'], config)
    planted.update(planted_exposure(streams['franchise'], config, popularity))
    return dict(streams=streams, counts=counts, popularity=popularity, planted=planted)


def planted_exposure(rng: np.random.Generator, config: SyntheticConfig,
                     popularity: np.ndarray) -> dict[str, np.ndarray]:
    """What weighs in who watches what beyond taste (movielens), drawn once.

    An interest, user_interest . item_interest (interest_rank factors of
    equal variance, the product's std interest_std), adds to the log odds
    of picking a movie: what people watch follows a few strong directions
    (genres, eras, audiences) that ratings do not.  Then `planted_fandom`.
    Empty when both are off (the generator before them: same draws).
    """
    planted = {}
    if config.franchise_share:
        planted.update(planted_fandom(rng, config, popularity))
    if config.interest_std and config.interest_rank:
        scale = np.sqrt(config.interest_std / np.sqrt(config.interest_rank))
        for name, rows in (('user_interest', config.num_users),
                           ('item_interest', config.num_movies)):
            planted[name] = (rng.standard_normal((rows, config.interest_rank))
                             * scale).astype(np.float32)
    return planted


def planted_fandom(rng: np.random.Generator, config: SyntheticConfig,
                   popularity: np.ndarray) -> dict[str, np.ndarray]:
    """Franchises and who follows them (movielens), drawn once.

    franchise_share of the movies, in random order, form franchises of
    FRANCHISE_SIZES[0]..FRANCHISE_SIZES[1] movies (uniform sizes).  Each
    user follows Poisson(franchises_per_user) distinct franchises, drawn by
    their members' mean popularity, with an affinity a ~ Gamma(2, 1/2)
    (mean 1, always > 0) per followed franchise.  A follower's candidate
    pool holds every movie of the franchise, its log weight in the choice of
    movies gains franchise_selection * a and its planted rating
    franchise_rating * a: followers watch the franchise together and rate it
    alike, which no low-rank taste captures and an item-item model finds.

    Returns:
      'franchise': int64 [num_movies], each movie's franchise or -1;
      'fan_user', 'fan_franchise', 'fan_affinity': one entry per (user,
      followed franchise), sorted by user then franchise.
    """
    low, high = FRANCHISE_SIZES
    in_franchises = int(round(config.franchise_share * config.num_movies))
    sizes = rng.integers(low, high + 1, max(in_franchises // low, 1))
    sizes = sizes[np.cumsum(sizes) <= in_franchises]
    order = rng.permutation(config.num_movies)
    franchise = np.full(config.num_movies, -1, np.int64)
    franchise[order[:sizes.sum()]] = np.repeat(np.arange(sizes.size), sizes)
    empty = np.zeros(0, np.int64)
    if not sizes.size:
        return dict(franchise=franchise, fan_user=empty, fan_franchise=empty,
                    fan_affinity=np.zeros(0))
    appeal = (np.bincount(franchise[franchise >= 0], popularity[franchise >= 0], sizes.size)
              / sizes)
    follows = np.minimum(rng.poisson(config.franchises_per_user, config.num_users),
                         sizes.size)
    fan_user, fan_franchise = sample_pairs(rng, follows, appeal / appeal.sum())
    affinity = rng.gamma(_AFFINITY_SHAPE, 1.0 / _AFFINITY_SHAPE, fan_user.size)
    return dict(franchise=franchise, fan_user=fan_user, fan_franchise=fan_franchise,
                fan_affinity=affinity)


def planted_rows(planted: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The planted model of the users `rows` (0-based, repeats allowed), as
    users 0..len(rows)-1: their biases, factors and followed franchises."""
    out = {name: table[rows] if name.startswith('user') else table
           for name, table in planted.items() if not name.startswith('fan_')}
    if 'fan_user' in planted:
        first = np.searchsorted(planted['fan_user'], rows)
        last = np.searchsorted(planted['fan_user'], rows, side='right')
        take = np.concatenate([np.arange(a, b) for a, b in zip(first, last)] + [[]]).astype(
            np.int64)
        out['fan_user'] = np.repeat(np.arange(rows.size), last - first)
        out['fan_franchise'] = planted['fan_franchise'][take]
        out['fan_affinity'] = planted['fan_affinity'][take]
    return out


def interest(planted: dict[str, np.ndarray], users: np.ndarray,
             movies: np.ndarray) -> np.ndarray:
    """user_interest . item_interest of each (user, movie) pair (0 without)."""
    if 'user_interest' not in planted:
        return np.zeros(users.shape)
    return _interaction({'user_factors': planted['user_interest'],
                         'item_factors': planted['item_interest']}, users, movies)


def franchise_affinity(planted: dict[str, np.ndarray], users: np.ndarray,
                       movies: np.ndarray) -> np.ndarray:
    """Each (user, movie) pair's affinity: the user's for the movie's
    franchise if they follow it, else 0 (float64, users and movies broadcast)."""
    if 'fan_user' not in planted or not planted['fan_user'].size:
        return np.zeros(np.broadcast(users, movies).shape)
    franchise = planted['franchise'][movies]
    count = int(planted['franchise'].max()) + 1
    fan_keys = planted['fan_user'].astype(np.int64) * count + planted['fan_franchise']
    keys = users.astype(np.int64) * count + franchise
    position = np.minimum(np.searchsorted(fan_keys, keys), fan_keys.size - 1)
    found = (franchise >= 0) & (fan_keys[position] == keys)
    return np.where(found, planted['fan_affinity'][position], 0.0)


def _draw_exposure(config: SyntheticConfig) -> dict[str, Any]:
    """`_draw_model`'s draws plus who rates what (users, movies)."""
    drawn = _draw_model(config)
    users, movies = sample_exposure(drawn['streams']['pairs'], drawn['streams']['selection'],
                                    config, drawn['counts'], drawn['popularity'],
                                    drawn['planted'])
    return dict(drawn, users=users, movies=movies)


def planted_state(config: SyntheticConfig) -> dict[str, Any]:
    """What `holdout_relevance` needs of a movielens data set, redrawn from its config.

    Costs a fraction of `generate`: who rates what is not drawn again.

    Returns:
      {'planted', 'popularity', 'counts', 'user_noise'}, 0-based rows.
    """
    if config.model != MOVIELENS:
        raise ValueError(f'the planted ranking needs the {MOVIELENS} model, not {config.model!r}')
    drawn = _draw_model(config)
    return dict(planted=drawn['planted'], popularity=drawn['popularity'],
                counts=drawn['counts'],
                user_noise=user_noise_scales(drawn['streams']['noise'], config))


def _generate_rank3(config: SyntheticConfig) -> SyntheticRatings:
    layout = features.DATASETS[config.layout]
    drawn = _draw_exposure(config)
    noise_rng, extras_rng = drawn['streams']['noise'], drawn['streams']['extras']
    counts, planted = drawn['counts'], drawn['planted']
    users, movies = drawn['users'], drawn['movies']
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


def _generate_movielens(config: SyntheticConfig) -> SyntheticRatings:
    layout = features.DATASETS[config.layout]
    drawn = _draw_exposure(config)
    streams, counts, planted = drawn['streams'], drawn['counts'], drawn['planted']
    users, movies, popularity = drawn['users'], drawn['movies'], drawn['popularity']
    noise_rng, extras_rng, ranking_rng = streams['noise'], streams['extras'], streams['ranking']
    signal = planted_signal(planted, config, users, movies)
    user_noise = user_noise_scales(noise_rng, config)
    noise_scale = user_noise[users]
    latent = signal + noise_rng.standard_normal(signal.shape) * noise_scale
    thresholds = calibrate_thresholds(latent, rating_shares(layout))
    ratings = (layout.rating_min + layout.rating_step
               * np.searchsorted(thresholds, latent)).astype(np.float32)
    del latent
    oracle = expected_rating(signal, thresholds, noise_scale, layout).astype(np.float32)
    del signal, noise_scale
    titles, genres = make_titles(extras_rng, config.num_movies, layout.movies_encoding)
    truth = make_truth(config, ratings, oracle)
    truth.update(
        thresholds=[round(float(t), 6) for t in thresholds],
        factor_variances=[round(float(v), 8) for v in factor_scales(config) ** 4],
        ranking=planted_ranking(ranking_rng, config, planted, popularity, counts, user_noise,
                                thresholds, users, movies, ratings))
    return SyntheticRatings(
        user_ids=(users + 1).astype(np.int32), movie_ids=(movies + 1).astype(np.int32),
        ratings=ratings,
        timestamps=sample_ordered_timestamps(extras_rng, users, counts, rating_span(layout)),
        oracle=oracle, titles=titles, genres=genres, truth=truth)


def rating_shares(layout: features.DatasetLayout) -> np.ndarray:
    """The share of each star value in the real archive (or the nearest one)."""
    counts = RATING_COUNTS.get(layout.name)
    if counts is None:
        counts = RATING_COUNTS['ml-1m' if layout.rating_step == 1 else 'ml-25m']
    shares = np.asarray(counts, np.float64)
    return shares / shares.sum()


def rating_span(layout: features.DatasetLayout) -> tuple[int, int]:
    """The first and last rating time of the archive (ml-25m's for others)."""
    return RATING_SPANS.get(layout.name, RATING_SPANS['ml-25m'])


def calibrate_thresholds(latent: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Cut points on the latent scale that give each star its share of ratings.

    A rating is rating_min + step * (number of cut points below its latent
    value), so the histogram is the target's up to one rating per star.
    """
    return np.quantile(latent, np.cumsum(shares)[:-1])


def normal_cdf(x: np.ndarray) -> np.ndarray:
    """Phi(x), from the erf approximation 7.1.26 of Abramowitz and Stegun
    (absolute error under 1.5e-7); numpy has no erf."""
    z = np.abs(x) / np.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741
                + t * (-1.453152027 + t * 1.061405429))))
    erf = 1.0 - poly * np.exp(-z * z)
    return 0.5 * (1.0 + np.sign(x) * erf)


def user_noise_scales(rng: np.random.Generator, config: SyntheticConfig) -> np.ndarray:
    """Each user's noise std: noise_std times a mean-1 lognormal factor."""
    sigma = config.user_noise_sigma
    return config.noise_std * np.exp(sigma * rng.standard_normal(config.num_users)
                                     - sigma ** 2 / 2)


def expected_rating(signal: np.ndarray, thresholds: np.ndarray,
                    noise_std: float | np.ndarray,
                    layout: features.DatasetLayout) -> np.ndarray:
    """E[rating | planted signal]: the best any model can predict (the oracle).

    rating_min + step * sum_j P(signal + noise > threshold_j).
    """
    total = np.zeros(signal.shape)
    for threshold in thresholds:
        total += normal_cdf((signal - threshold) / np.maximum(noise_std, 1e-12))
    return layout.rating_min + layout.rating_step * total


def sample_ordered_timestamps(rng: np.random.Generator, users: np.ndarray,
                              counts: np.ndarray, span: tuple[int, int]) -> np.ndarray:
    """Unix times, distinct within each user, inside the archive's span.

    Each user rates during an active spell (start uniform in the span, length
    exponential with mean 30 days); a user's times are distinct, so they
    order that user's ratings.

    Args:
      users: 0-based user of each rating, sorted.
    """
    first, last = span
    start = rng.integers(first, last, counts.size)
    spell = rng.exponential(_MEAN_ACTIVE_SECONDS, counts.size)
    offset = rng.random(users.size) * spell[users]
    base = np.minimum(start[users] + offset.astype(np.int64), last - counts[users])
    order = np.lexsort((base, users))
    first_row = np.searchsorted(users, np.arange(counts.size))
    within = np.arange(users.size) - first_row[users[order]]
    times = np.empty(users.size, np.int64)
    # Sorted within a user, adding the position makes equal seconds distinct
    # and keeps the order (base <= last - count, so times stay < last).
    times[order] = base[order] + within
    return times


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


def factor_scales(config: SyntheticConfig) -> np.ndarray:
    """Per-factor std of the entries of both factor matrices.

    rank3: all equal (`factor_std`).  movielens: factor k (1-based)
    contributes a share proportional to k^-spectrum_decay of the variance
    interaction_std^2 of user_factors . item_factors; an entry's std is
    the fourth root of that variance, since a factor's term is a product of
    two independent entries.
    """
    if config.model == RANK3:
        return np.full(config.rank, config.factor_std)
    weights = np.arange(1, config.rank + 1, dtype=np.float64) ** -config.spectrum_decay
    return (config.interaction_std ** 2 * weights / weights.sum()) ** 0.25


def planted_model(rng: np.random.Generator, config: SyntheticConfig) -> dict[str, np.ndarray]:
    """Draws the planted biases and factors (0-based rows)."""
    planted = {
        'user_bias': rng.normal(0.0, config.user_bias_std, config.num_users),
        'item_bias': rng.normal(0.0, config.item_bias_std, config.num_movies)}
    if config.model == RANK3:
        planted['user_factors'] = rng.normal(0.0, config.factor_std,
                                             (config.num_users, config.rank))
        planted['item_factors'] = rng.normal(0.0, config.factor_std,
                                             (config.num_movies, config.rank))
        return planted
    scales = factor_scales(config)
    for name, rows in (('user_factors', config.num_users), ('item_factors', config.num_movies)):
        planted[name] = (rng.standard_normal((rows, config.rank)) * scales).astype(np.float32)
    return planted


# Pairs per block when many factors are gathered row-wise.
_INTERACTION_BLOCK = 1 << 18


def _interaction(planted: dict[str, np.ndarray], users: np.ndarray,
                 movies: np.ndarray) -> np.ndarray:
    """user_factors . item_factors per pair, in pieces to bound memory.

    A few factors go one column at a time (the rank-3 bytes depend on that
    summation order); many go as row blocks, whose gathers read whole rows.
    """
    user_factors, item_factors = planted['user_factors'], planted['item_factors']
    total = np.zeros(users.size)
    if user_factors.shape[1] <= 4:
        for factor in range(user_factors.shape[1]):
            total += user_factors[users, factor] * item_factors[movies, factor]
        return total
    for begin in range(0, users.size, _INTERACTION_BLOCK):
        rows = slice(begin, begin + _INTERACTION_BLOCK)
        total[rows] = np.einsum('ij,ij->i', user_factors[users[rows]],
                                item_factors[movies[rows]])
    return total


def planted_signal(planted: dict[str, np.ndarray], config: SyntheticConfig,
                   users: np.ndarray, movies: np.ndarray) -> np.ndarray:
    """The noiseless planted rating of each (user, movie) pair, unclipped."""
    signal = (config.global_mean + planted['user_bias'][users] + planted['item_bias'][movies]
              + _interaction(planted, users, movies))
    if config.franchise_rating and 'fan_user' in planted:
        signal += config.franchise_rating * franchise_affinity(planted, users, movies)
    return signal


def select_liked(rng: np.random.Generator, strength: float, planted: dict[str, np.ndarray],
                 counts: np.ndarray, users: np.ndarray, movies: np.ndarray,
                 log_popularity: np.ndarray | None = None,
                 franchise_selection: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Keeps each user's counts[u] candidates they like best, with Gumbel noise.

    Gumbel-top-k: the k largest of strength * score + Gumbel noise are a
    draw without replacement with probabilities proportional to
    exp(strength * score), score = item_bias + user_factors . item_factors,
    times popularity when log_popularity is given and times
    exp(franchise_selection * affinity) for the franchises a user follows.

    Args:
      users, movies: the candidates, 0-based, sorted by user.
      log_popularity: per movie; None ranks by taste alone (rank3).

    Returns:
      The kept 0-based (users, movies), sorted by user then movie.
    """
    score = planted['item_bias'][movies] + _interaction(planted, users, movies)
    key = strength * score + rng.gumbel(size=users.size)
    if log_popularity is not None:
        key += log_popularity[movies]
    if franchise_selection and 'fan_user' in planted:
        key += franchise_selection * franchise_affinity(planted, users, movies)
    if 'user_interest' in planted:
        key += interest(planted, users, movies)
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


def planted_ranking(rng: np.random.Generator, config: SyntheticConfig,
                    planted: dict[str, np.ndarray], popularity: np.ndarray,
                    counts: np.ndarray, user_noise: np.ndarray, thresholds: np.ndarray,
                    users: np.ndarray, movies: np.ndarray,
                    ratings: np.ndarray) -> dict[str, Any]:
    """The planted ranking ceiling: NDCG@10 of the planted chance of a relevant holdout.

    For a seeded sample of RANKING_USERS users, RANKING_HOLDOUT of each
    one's ratings are held out; every movie the user did not keep is a
    candidate and the held-out movies rated >= RELEVANT_RATING are relevant
    (binary gains, ideal DCG of min(relevant, 10) hits), as the trainer's
    ranking evaluation scores a split.  Candidates are ranked by
    `holdout_relevance`, the planted model's probability that the movie is
    among the user's held-out ratings and rated >= RELEVANT_RATING, given
    that it is not among the kept ones: it knows the planted model but not
    the noise nor which movies the holdout took, so no model trained on the
    ratings should beat it by more than sampling noise.  The same users and
    holdout ranked by planted popularity alone give
    `popularity_ndcg_at_10`.
    """
    chosen = np.sort(rng.choice(config.num_users, min(RANKING_USERS, config.num_users),
                                replace=False))
    sampled = np.isin(users, chosen)
    row = np.searchsorted(chosen, users[sampled])
    item = movies[sampled]
    held = rng.random(row.size) < RANKING_HOLDOUT
    relevant = held & (ratings[sampled] >= RELEVANT_RATING)
    log_popularity = np.log(popularity / popularity.sum())
    planted_ndcg, popular_ndcg = [], []
    for begin in range(0, chosen.size, _RANKING_BLOCK):
        block = chosen[begin:begin + _RANKING_BLOCK]
        in_block = (row >= begin) & (row < begin + _RANKING_BLOCK)
        shape = (block.size, config.num_movies)
        seen = np.zeros(shape, bool)
        seen[row[in_block & ~held] - begin, item[in_block & ~held]] = True
        wanted = np.zeros(shape, bool)
        wanted[row[in_block & relevant] - begin, item[in_block & relevant]] = True
        scores = holdout_relevance(config, planted, popularity, counts, user_noise,
                                   thresholds, block, RANKING_HOLDOUT)
        planted_ndcg.append(_ndcg_at_k(scores, seen, wanted))
        popular_ndcg.append(_ndcg_at_k(np.broadcast_to(log_popularity, shape), seen, wanted))
    planted_scores, popular_scores = np.concatenate(planted_ndcg), np.concatenate(popular_ndcg)
    return {'ndcg_at_10': float(np.nanmean(planted_scores)),
            'popularity_ndcg_at_10': float(np.nanmean(popular_scores)),
            'users': int(np.isfinite(planted_scores).sum()),
            'holdout': RANKING_HOLDOUT, 'relevant_rating': RELEVANT_RATING}


def holdout_relevance(config: SyntheticConfig, planted: dict[str, np.ndarray],
                      popularity: np.ndarray, counts: np.ndarray, user_noise: np.ndarray,
                      thresholds: np.ndarray, block: np.ndarray,
                      holdout: float) -> np.ndarray:
    """log P(movie held out and rated >= RELEVANT_RATING | not kept), per (user, movie).

    The Bayes ranking of a split that holds out each rating with probability
    `holdout`, for the 0-based users `block` (movielens model).  With
    pi = `exposure_probability` (the user rated the movie) and the planted
    P(rating >= RELEVANT_RATING | signal), a movie the user did not keep was
    held out with probability holdout * pi / (1 - (1 - holdout) * pi): a
    movie the user almost surely rated but did not keep is almost surely held
    out.  Rating noise is independent of who rates what, so the two multiply.
    A followed franchise's affinity enters both (`planted_fandom`): it is
    part of the planted state, so the ranking stays the Bayes ranking.

    Returns:
      float64 [len(block), num_movies].
    """
    layout = features.DATASETS[config.layout]
    cut = thresholds[int(round((RELEVANT_RATING - layout.rating_min) / layout.rating_step)) - 1]
    taste = (planted['user_factors'][block].astype(np.float64)
             @ planted['item_factors'].astype(np.float64).T)
    affinity = franchise_affinity(planted, block[:, None],
                                  np.arange(config.num_movies)[None, :])
    signal = (config.global_mean + planted['user_bias'][block, None]
              + planted['item_bias'][None, :] + taste + config.franchise_rating * affinity)
    noise = np.maximum(user_noise[block, None], 1e-12)
    like = np.log(np.maximum(normal_cdf((signal - cut) / noise), 1e-300))
    del signal
    liking = None
    if 'user_interest' in planted:
        liking = (planted['user_interest'][block].astype(np.float64)
                  @ planted['item_interest'].astype(np.float64).T)
    rated = exposure_probability(config, popularity, counts[block],
                                 planted['item_bias'][None, :] + taste, affinity, liking)
    rated = np.clip(rated, 1e-300, 1.0 - 1e-12)
    return np.log(holdout * rated / (1.0 - (1.0 - holdout) * rated)) + like


def exposure_probability(config: SyntheticConfig, popularity: np.ndarray,
                         counts: np.ndarray, taste_score: np.ndarray,
                         affinity: np.ndarray | None = None,
                         interest_score: np.ndarray | None = None) -> np.ndarray:
    """P(the generator gives each user each movie), for a block of users.

    Follows `sample_exposure` stage by stage with the Poisson approximation
    of a draw of n distinct items with weights w: item j is in it with
    probability 1 - exp(-r w_j), r solving sum_j (1 - exp(-r w_j)) = n.
    The candidate pool is such a draw by popularity (the uniform rounds that
    top up the heaviest users are left out); the kept movies are one from the
    pool with weights popularity * exp(selection_bias * taste_score) (movielens;
    rank3 leaves popularity out), so a movie is kept with probability
    P(in pool) * (1 - exp(-r w_j)), r solving sum_j P(in pool) * (...) = n.
    A followed franchise's movies are in the pool for sure, and their weight
    gains a factor exp(franchise_selection * affinity).

    Args:
      counts: [B] ratings of each user of the block.
      taste_score: [B, num_movies] item_bias + user_factors . item_factors.
      affinity: [B, num_movies] `franchise_affinity` (> 0 where the user
        follows the movie's franchise), or None for none.
      interest_score: [B, num_movies] user_interest . item_interest, a term
        of the log weight, or None for none.

    Returns:
      float64 [B, num_movies].
    """
    share = popularity / popularity.sum()
    by_popularity = np.broadcast_to(share, taste_score.shape)
    if not config.selection_bias:
        return _inclusion(by_popularity, counts)
    pool = np.maximum(np.minimum(np.round(config.selection_candidates * counts),
                                 int(SELECTION_MAX_SHARE * config.num_movies)), counts)
    in_pool = _inclusion(by_popularity, pool)
    log_weight = config.selection_bias * taste_score
    if config.model == MOVIELENS:
        log_weight = log_weight + np.log(share)
    if affinity is not None:
        in_pool = np.where(affinity > 0, 1.0, in_pool)
        log_weight = log_weight + config.franchise_selection * affinity
    if interest_score is not None:
        log_weight = log_weight + interest_score
    weight = np.exp(log_weight - log_weight.max(axis=1, keepdims=True))
    return in_pool * _inclusion(weight, counts, in_pool)


# Bisection steps on log r for `_inclusion` (bracket 60 wide: 6e-8 at the end).
_RATE_STEPS = 30


def _inclusion(weight: np.ndarray, size: np.ndarray,
               available: np.ndarray | None = None) -> np.ndarray:
    """1 - exp(-r_u w_uj), r_u solving sum_j available_uj (1 - exp(-r_u w_uj)) = size_u.

    The Poisson approximation of the chance that a draw of size_u distinct
    items with weights w_u (without replacement) holds item j, each row
    solved by bisection on log r.
    """
    weight = weight / weight.max(axis=1, keepdims=True)
    low, high = np.full(size.shape, -20.0), np.full(size.shape, 40.0)
    for _ in range(_RATE_STEPS):
        middle = (low + high) / 2
        drawn = -np.expm1(-np.exp(middle)[:, None] * weight)
        if available is not None:
            drawn *= available
        over = drawn.sum(axis=1) > size
        low, high = np.where(over, low, middle), np.where(over, middle, high)
    return -np.expm1(-np.exp((low + high) / 2)[:, None] * weight)


def _ndcg_at_k(scores: np.ndarray, seen: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Binary-gain NDCG@RANKING_K per row, unseen columns only; nan without relevant."""
    masked = np.where(seen, -np.inf, scores)
    k = min(RANKING_K, masked.shape[1])
    top = np.argpartition(-masked, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(masked, top, 1), 1), 1)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (np.take_along_axis(wanted, top, 1) * discounts).sum(1)
    ideal = np.cumsum(discounts)[np.maximum(np.minimum(wanted.sum(1), k), 1) - 1]
    return np.where(wanted.any(1), dcg / ideal, np.nan)


def config_fields(config: SyntheticConfig) -> dict[str, Any]:
    """The config as a dict; selection_bias only when set, so unbiased data
    keep the truth.json bytes and staged source they had before it existed."""
    fields = dataclasses.asdict(config)
    if config.model == RANK3:
        del fields['model'], fields['spectrum_decay'], fields['user_noise_sigma']
        for name in EXPOSURE_DEFAULTS:
            del fields[name]
        if not config.selection_bias:
            del fields['selection_bias']
    return fields


def config_from_truth(truth: dict[str, Any]) -> SyntheticConfig:
    """The config a truth.json was written for (`config_fields` in reverse)."""
    names = [field.name for field in dataclasses.fields(SyntheticConfig)]
    fields = {name: truth[name] for name in names if name in truth}
    if 'thresholds' not in truth and 'model' not in truth:
        fields['model'] = RANK3  # rank3 truth leaves the field out
    elif 'franchise_share' not in truth:
        fields.update(EXPOSURE_LEGACY)  # written before these fields existed
    return SyntheticConfig(**fields)


def make_truth(config: SyntheticConfig, ratings: np.ndarray,
               oracle: np.ndarray) -> dict[str, Any]:
    """The planted answer: noise floor, baseline RMSE, config and scales."""
    ratings64 = ratings.astype(np.float64)
    mean = float(ratings64.mean())
    truth = config_fields(config)
    if config.model == RANK3:
        truth['factor_std'] = config.factor_std
    truth.update(
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
