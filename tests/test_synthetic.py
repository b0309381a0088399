"""Tests of trainer/pipeline/synthetic.py: counts, scales, planted answer, archive layout."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import pathlib
import posixpath
import zipfile

import numpy as np
import pytest

from trainer import features
from trainer.pipeline import synthetic

SMALL = dict(num_users=40, num_movies=60, num_ratings=900)
SMALL_RANK = synthetic.SyntheticConfig().rank
MEDIUM = dict(num_users=200, num_movies=400, num_ratings=20_000)


@pytest.fixture(scope='module')
def default_data(default_synthetic) -> synthetic.SyntheticRatings:
    return default_synthetic


@pytest.fixture(scope='module')
def rank3_data() -> synthetic.SyntheticRatings:
    return synthetic.generate(synthetic.SyntheticConfig(model=synthetic.RANK3))


def planted_of(config: synthetic.SyntheticConfig) -> dict[str, np.ndarray]:
    """The planted biases and factors, drawn from the stream `generate` uses."""
    model_rng = np.random.default_rng(np.random.SeedSequence(config.seed).spawn(6)[2])
    model_rng.lognormal(0.0, config.movie_popularity_sigma, config.num_movies)
    return synthetic.planted_model(model_rng, config)


def read_member(path: pathlib.Path, member: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(member)


def parse_ratings(text: str, layout: features.DatasetLayout) -> list[list[str]]:
    lines = text.splitlines()
    if layout.ratings_header:
        assert lines[0] == 'userId,movieId,rating,timestamp'
        lines = lines[1:]
    return [line.split(layout.ratings_separator) for line in lines]


def parse_titles(text: str, layout: features.DatasetLayout) -> list[str]:
    if layout.movies_separator == ',':
        rows = list(csv.reader(io.StringIO(text)))
        assert rows[0] == ['movieId', 'title', 'genres']
        assert all(len(row) == 3 for row in rows[1:])
        return [row[1] for row in rows[1:]]
    rows = [line.split(layout.movies_separator) for line in text.splitlines()]
    assert {len(row) for row in rows} == {24 if layout.movies_separator == '|' else 3}
    return [row[1] for row in rows]


def test_same_seed_gives_same_bytes(tmp_path: pathlib.Path) -> None:
    paths = [tmp_path / name for name in ('a.zip', 'b.zip', 'c.zip')]
    synthetic.write_archive(str(paths[0]), synthetic.SyntheticConfig(**SMALL, seed=3))
    synthetic.write_archive(str(paths[1]), synthetic.SyntheticConfig(**SMALL, seed=3))
    synthetic.write_archive(str(paths[2]), synthetic.SyntheticConfig(**SMALL, seed=4))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()


@pytest.mark.parametrize('sizes', [
    SMALL,
    dict(num_users=10, num_movies=10, num_ratings=50),  # every user at the floor and cap
    dict(num_users=943, num_movies=1682, num_ratings=100_000),
])
def test_exact_counts_unique_pairs_and_user_floor(sizes: dict[str, int]) -> None:
    data = synthetic.generate(synthetic.SyntheticConfig(**sizes))

    assert data.ratings.size == sizes['num_ratings']
    for column in (data.user_ids, data.movie_ids, data.timestamps, data.oracle):
        assert column.shape == data.ratings.shape
    pairs = data.user_ids.astype(np.int64) * (sizes['num_movies'] + 1) + data.movie_ids
    assert np.unique(pairs).size == pairs.size
    per_user = np.bincount(data.user_ids, minlength=sizes['num_users'] + 1)[1:]
    floor = min(20, sizes['num_ratings'] // sizes['num_users'])
    assert per_user.min() >= floor
    assert per_user.max() <= sizes['num_movies'] // 2
    assert data.movie_ids.min() >= 1 and data.movie_ids.max() <= sizes['num_movies']
    assert len(data.titles) == sizes['num_movies']


@pytest.mark.parametrize('layout_name', sorted(features.DATASETS))
def test_archive_follows_layout_scale_and_step(
        tmp_path: pathlib.Path, layout_name: str) -> None:
    layout = features.DATASETS[layout_name]
    config = synthetic.SyntheticConfig(**SMALL, layout=layout_name)
    path = tmp_path / 'synthetic.zip'

    truth = synthetic.write_archive(str(path), config)

    data = synthetic.generate(config)
    folder = posixpath.dirname(layout.ratings_member)
    with zipfile.ZipFile(path) as archive:
        assert set(archive.namelist()) == {
            folder + '/', layout.ratings_member, layout.movies_member,
            f'{folder}/{features.TRUTH_FILE}'}
    assert json.loads(read_member(path, f'{folder}/{features.TRUTH_FILE}')) == truth
    rows = parse_ratings(read_member(path, layout.ratings_member).decode('ascii'), layout)
    assert len(rows) == config.num_ratings
    written = np.array([float(row[2]) for row in rows])
    np.testing.assert_array_equal(written, data.ratings)
    np.testing.assert_array_equal([int(row[0]) for row in rows], data.user_ids)
    np.testing.assert_array_equal([int(row[3]) for row in rows], data.timestamps)
    steps = (written - layout.rating_min) / layout.rating_step
    np.testing.assert_allclose(steps, np.round(steps))
    assert written.min() >= layout.rating_min and written.max() <= layout.rating_max
    if layout.rating_step == 1.0:
        assert all(row[2].isdigit() for row in rows)  # '4', as u.data writes it
    else:
        assert all(len(row[2]) == 3 and row[2][1] == '.' for row in rows)  # '4.0', '3.5'
        assert {row[2][2] for row in rows} == {'0', '5'}


@pytest.mark.parametrize('layout_name', sorted(features.DATASETS))
def test_titles_survive_the_layout_encoding(
        tmp_path: pathlib.Path, layout_name: str) -> None:
    layout = features.DATASETS[layout_name]
    config = synthetic.SyntheticConfig(**SMALL, layout=layout_name)
    path = tmp_path / 'synthetic.zip'
    synthetic.write_archive(str(path), config)

    text = read_member(path, layout.movies_member).decode(layout.movies_encoding)

    titles = parse_titles(text, layout)
    assert titles == synthetic.generate(config).titles
    assert any(not title.isascii() for title in titles)
    if layout.movies_separator == ',':
        assert any(',' in title for title in titles)
        assert any('"' in title for title in titles)


def test_noise_floor_is_sane(rank3_data: synthetic.SyntheticRatings) -> None:
    truth = rank3_data.truth
    ratings = rank3_data.ratings.astype(np.float64)
    noise_std = synthetic.SyntheticConfig(model=synthetic.RANK3).noise_std

    assert truth['noise_floor_rmse'] == pytest.approx(
        np.sqrt(np.mean((rank3_data.oracle - ratings) ** 2)))
    assert truth['global_mean_rmse'] == pytest.approx(ratings.std())
    assert truth['noise_floor_rmse'] < 0.8 * truth['global_mean_rmse']
    # Rounding adds step**2 / 12 of variance, clipping takes some away.
    assert 0.9 * noise_std < truth['noise_floor_rmse'] < np.sqrt(noise_std ** 2 + 1 / 12)
    assert truth['rating_mean'] == pytest.approx(3.5, abs=0.1)
    assert truth['rating_std'] == pytest.approx(1.1, abs=0.1)
    assert truth['num_ratings'] == 100_000 and truth['rank'] == 3


@pytest.mark.parametrize('data_name', ['default_data', 'rank3_data'])
def test_popularity_and_activity_have_long_tails(data_name: str, request) -> None:
    data = request.getfixturevalue(data_name)
    per_movie = np.sort(np.bincount(data.movie_ids)[1:])[::-1]
    per_user = np.bincount(data.user_ids)[1:]

    top_tenth = per_movie[:per_movie.size // 10].sum() / per_movie.sum()
    assert top_tenth > 0.3
    assert per_movie[0] > 300  # ml-100k's most rated movie has 583
    assert per_user.max() > 5 * np.median(per_user)
    assert per_user.min() >= 20


def test_rank3_popularity_has_a_tail_of_rarely_rated_movies(
        rank3_data: synthetic.SyntheticRatings) -> None:
    
    per_movie = np.bincount(rank3_data.movie_ids)[1:]
    assert (per_movie <= 3).sum() > 10


@pytest.mark.parametrize('layout_name', ['ml-100k', 'ml-1m', 'ml-25m'])
def test_movielens_histogram_is_the_archive_s(layout_name: str) -> None:
    data = synthetic.generate(synthetic.SyntheticConfig(**MEDIUM, layout=layout_name))
    layout = features.DATASETS[layout_name]
    stars = np.round((data.ratings - layout.rating_min) / layout.rating_step).astype(int)
    target = synthetic.rating_shares(layout)
    shares = np.bincount(stars, minlength=target.size) / stars.size
    # Quantile cut points: each share is the archive's up to ties, whatever the size.
    np.testing.assert_allclose(shares, target, atol=0.002)
    stars_values = layout.rating_min + layout.rating_step * np.arange(target.size)
    assert data.ratings.mean() == pytest.approx(float(target @ stars_values), abs=0.01)
    assert data.truth['rating_mean'] == pytest.approx(float(data.ratings.mean()))


def test_movielens_published_means() -> None:
    """The counts reproduce the archives' published means and totals."""
    for name, mean, total in (('ml-100k', 3.53, 100_000), ('ml-1m', 3.58, 1_000_209),
                              ('ml-25m', 3.53, 25_000_095)):
        layout = features.DATASETS[name]
        shares = synthetic.rating_shares(layout)
        stars = layout.rating_min + layout.rating_step * np.arange(shares.size)
        assert float(shares @ stars) == pytest.approx(mean, abs=0.005)
        assert sum(synthetic.RATING_COUNTS[name]) == total


def test_movielens_spectrum_has_many_weak_factors() -> None:
    config = synthetic.SyntheticConfig()
    variances = np.asarray(synthetic.generate(
        synthetic.SyntheticConfig(**SMALL)).truth['factor_variances'])

    assert config.rank >= 32 and variances.size == SMALL_RANK
    assert np.all(np.diff(variances) < 0)
    assert variances.sum() == pytest.approx(config.interaction_std ** 2, rel=1e-4)
    assert variances[0] < 0.35 * variances.sum()  # no factor dominates
    assert variances[:3].sum() < 0.6 * variances.sum()  # rank 3 leaves most of it


def test_movielens_oracle_is_the_expected_rating(
        default_data: synthetic.SyntheticRatings) -> None:
    truth = default_data.truth
    ratings = default_data.ratings.astype(np.float64)
    # E[rating | signal] is unbiased and beats predicting the mean by far.
    assert default_data.oracle.mean() == pytest.approx(ratings.mean(), abs=0.01)
    assert truth['noise_floor_rmse'] == pytest.approx(
        np.sqrt(np.mean((default_data.oracle - ratings) ** 2)))
    assert 0.6 < truth['noise_floor_rmse'] < 0.8 * truth['global_mean_rmse']
    assert default_data.ratings.min() == 1 and default_data.ratings.max() == 5


def test_movielens_users_watch_what_they_like(
        default_data: synthetic.SyntheticRatings) -> None:
    config = synthetic.SyntheticConfig()
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(0).spawn(7)]
    streams[2].lognormal(0.0, config.movie_popularity_sigma, config.num_movies)
    planted = synthetic.planted_model(streams[2], config)
    users, movies = default_data.user_ids - 1, default_data.movie_ids - 1
    rated = np.einsum('ij,ij->i', planted['user_factors'][users],
                      planted['item_factors'][movies]).mean()
    # Over all pairs the taste term averages 0; selection_bias 0.5 gives the
    # rated pairs 0.08 at seed 0.
    assert rated > 0.05
    ranking = default_data.truth['ranking']
    assert ranking['users'] > 800
    # Taste-driven exposure: knowing taste ranks far better than popularity.
    assert ranking['ndcg_at_10'] > 1.3 * ranking['popularity_ndcg_at_10'] > 0.05


def test_movielens_followers_watch_their_franchise_together(
        default_data: synthetic.SyntheticRatings) -> None:
    config = synthetic.SyntheticConfig()
    planted = synthetic.planted_state(config)['planted']
    users, movies = default_data.user_ids - 1, default_data.movie_ids - 1
    sizes = np.bincount(planted['franchise'][planted['franchise'] >= 0])
    assert sizes.min() >= synthetic.FRANCHISE_SIZES[0]
    assert sizes.max() <= synthetic.FRANCHISE_SIZES[1]
    assert abs(sizes.sum() / config.num_movies - config.franchise_share) < 0.01
    follows = np.bincount(planted['fan_user'], minlength=config.num_users)
    assert abs(follows.mean() - config.franchises_per_user) < 0.5
    affinity = synthetic.franchise_affinity(planted, users, movies)
    followed = affinity > 0
    # A follower watches a large share of the franchise (0.42 at seed 0),
    # far above the density of the whole matrix (0.063), and rates it higher.
    watched = followed.sum() / sizes[planted['fan_franchise']].sum()
    density = users.size / (config.num_users * config.num_movies)
    assert watched > 4 * density
    assert default_data.ratings[followed].mean() > default_data.ratings[~followed].mean() + 0.5
    # The interest weighs in the choice: its mean over rated pairs is far
    # above its mean over all pairs (0).
    assert synthetic.interest(planted, users, movies).mean() > 1.0


@pytest.mark.parametrize('selection_bias', [0.0, 0.5])
def test_exposure_probability_matches_the_generator_s_draws(selection_bias: float) -> None:
    # Planted answer: how often the generator itself gives each movie to a
    # user, over 2,000 redraws of that user's movies with their count fixed.
    config = synthetic.SyntheticConfig(selection_bias=selection_bias)
    state = synthetic.planted_state(config)
    counts, planted = state['counts'], state['planted']
    picked = np.argsort(counts)[[5, counts.size // 2, int(counts.size * 0.9)]]
    redraws = 2000
    copies = np.repeat(picked, redraws)
    copied = synthetic.planted_rows(planted, copies)
    users, movies = synthetic.sample_exposure(
        np.random.default_rng(1), np.random.default_rng(2),
        dataclasses.replace(config, num_users=copies.size), counts[copies],
        state['popularity'], copied)
    drawn = np.zeros((picked.size, config.num_movies))
    np.add.at(drawn, (users // redraws, movies), 1.0 / redraws)
    taste = (planted['item_bias'][None, :] + planted['user_factors'][picked].astype(float)
             @ planted['item_factors'].astype(float).T)
    affinity = synthetic.franchise_affinity(planted, picked[:, None],
                                            np.arange(config.num_movies)[None, :])
    interest = planted['user_interest'][picked].astype(float) @ planted['item_interest'].T
    assert (affinity > 0).sum(1).min() > 10  # each follows franchises
    approximated = synthetic.exposure_probability(config, state['popularity'],
                                                  counts[picked], taste, affinity, interest)
    np.testing.assert_allclose(approximated.sum(1), counts[picked], rtol=1e-4)
    for row in range(picked.size):
        assert np.corrcoef(drawn[row], approximated[row])[0, 1] > 0.99, counts[picked[row]]
        # Measured at seed 0 (20, 60 and 235 ratings): largest gaps 0.095,
        # 0.129 and 0.230, mean gaps 0.0006, 0.0029 and 0.0116; without
        # selection the mean gap at 235 ratings is 0.0159 (under 0.08 and 0.01
        # with the pool of 3x and popularity sigma 1.15 before franchises).
        # The approximation leaves out the uniform rounds that top up a large
        # pool (`sample_pairs`), which over-rates a few of the likeliest movies.
        gap = np.abs(drawn[row] - approximated[row])
        assert gap.max() < 0.25 and gap.mean() < 0.02, counts[picked[row]]


def test_holdout_relevance_is_the_chance_of_a_relevant_held_out_movie() -> None:
    config = synthetic.SyntheticConfig(**SMALL)
    state = synthetic.planted_state(config)
    thresholds = np.array(synthetic.generate(config).truth['thresholds'])
    block = np.array([0, 7])
    got = synthetic.holdout_relevance(config, state['planted'], state['popularity'],
                                      state['counts'], state['user_noise'], thresholds,
                                      block, 0.2)
    planted = state['planted']
    taste = planted['user_factors'][block].astype(float) @ planted['item_factors'].astype(float).T
    affinity = np.zeros((block.size, config.num_movies))  # the followed franchises, by hand
    for row, user in enumerate(block):
        for franchise, value in zip(planted['fan_franchise'][planted['fan_user'] == user],
                                    planted['fan_affinity'][planted['fan_user'] == user]):
            affinity[row, planted['franchise'] == franchise] = value
    assert (affinity > 0).any()
    interest = planted['user_interest'][block].astype(float) @ planted['item_interest'].T
    rated = synthetic.exposure_probability(config, state['popularity'], state['counts'][block],
                                           planted['item_bias'][None, :] + taste, affinity,
                                           interest)
    signal = (config.global_mean + planted['user_bias'][block, None]
              + planted['item_bias'][None, :] + taste + config.franchise_rating * affinity)
    # Rated >= 4 stars: the latent value passes the third cut point.
    like = synthetic.normal_cdf((signal - thresholds[2]) / state['user_noise'][block, None])
    expected = 0.2 * rated / (1 - 0.8 * rated) * like
    np.testing.assert_allclose(np.exp(got), expected, rtol=1e-6, atol=1e-12)


def test_planted_state_redraws_what_generate_drew(
        default_data: synthetic.SyntheticRatings) -> None:
    config = synthetic.config_from_truth(default_data.truth)
    assert config == synthetic.SyntheticConfig()
    state = synthetic.planted_state(config)
    np.testing.assert_array_equal(state['counts'],
                                  np.bincount(default_data.user_ids - 1,
                                              minlength=config.num_users))
    np.testing.assert_array_equal(state['planted']['user_factors'],
                                  planted_of(config)['user_factors'])
    with pytest.raises(ValueError, match='movielens'):
        synthetic.planted_state(synthetic.SyntheticConfig(**SMALL, model=synthetic.RANK3))
    rank3 = synthetic.generate(synthetic.SyntheticConfig(**SMALL, model=synthetic.RANK3))
    assert synthetic.config_from_truth(rank3.truth).model == synthetic.RANK3


def test_movielens_timestamps_order_each_user_s_ratings(
        default_data: synthetic.SyntheticRatings) -> None:
    seconds = default_data.timestamps
    keys = np.lexsort((seconds, default_data.user_ids))
    same_user = np.diff(default_data.user_ids[keys]) == 0
    assert np.all(np.diff(seconds[keys])[same_user] > 0)  # distinct within a user
    first, last = synthetic.RATING_SPANS['ml-100k']
    assert seconds.min() >= first and seconds.max() <= last


def test_truth_json_holds_the_planted_ranking(tmp_path: pathlib.Path) -> None:
    path = tmp_path / 'a.zip'
    truth = synthetic.write_archive(str(path), synthetic.SyntheticConfig(**SMALL))
    stored = json.loads(read_member(path, 'ml-100k/' + features.TRUTH_FILE))
    assert stored['model'] == synthetic.MOVIELENS
    assert stored['ranking']['ndcg_at_10'] == pytest.approx(truth['ranking']['ndcg_at_10'])
    assert len(stored['thresholds']) == 4


def test_timestamps_are_plausible(rank3_data: synthetic.SyntheticRatings) -> None:
    seconds = rank3_data.timestamps
    assert seconds.dtype == np.int64
    assert seconds.min() >= 874_724_710 and seconds.max() <= 893_286_638


@pytest.mark.parametrize('overrides, message', [
    (dict(layout='ml-7k'), 'layout'),
    (dict(num_users=10, num_ratings=40), 'num_ratings 40'),
    (dict(num_users=10, num_movies=10, num_ratings=51), 'num_ratings 51'),
    (dict(num_movies=9), 'num_movies'),
    (dict(noise_std=-0.1), 'std'),
    (dict(selection_bias=-0.5), 'selection_bias must be >= 0'),
    (dict(selection_bias=float('nan')), 'selection_bias must be >= 0'),
    (dict(selection_bias=float('inf')), 'selection_bias must be >= 0'),
])
def test_bad_config_is_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synthetic.SyntheticConfig(**overrides)


def test_zero_selection_bias_draws_the_unbiased_pairs() -> None:
    config = synthetic.SyntheticConfig(**MEDIUM, model=synthetic.RANK3, seed=5)
    streams = [np.random.default_rng(seed) for seed in np.random.SeedSequence(5).spawn(6)]
    counts = synthetic.sample_user_counts(streams[0], config)
    popularity = streams[2].lognormal(0.0, config.movie_popularity_sigma, config.num_movies)
    users, movies = synthetic.sample_pairs(streams[1], counts, popularity / popularity.sum())

    data = synthetic.generate(dataclasses.replace(config, selection_bias=0.0))

    np.testing.assert_array_equal(data.user_ids, users + 1)
    np.testing.assert_array_equal(data.movie_ids, movies + 1)
    default = synthetic.generate(config)
    for name in ('user_ids', 'movie_ids', 'ratings', 'timestamps', 'oracle'):
        np.testing.assert_array_equal(getattr(data, name), getattr(default, name))
    # Unbiased archives keep the truth.json (and so the MD5) they had before the field.
    assert 'selection_bias' not in data.truth


def test_selection_bias_plants_users_rating_what_they_like() -> None:
    unbiased = synthetic.SyntheticConfig(**MEDIUM, model=synthetic.RANK3)
    biased = dataclasses.replace(unbiased, selection_bias=2.0)
    planted = planted_of(unbiased)  # selection_bias does not change the planted model
    all_pairs = float((planted['user_factors'] @ planted['item_factors'].T).mean())

    def interaction(data: synthetic.SyntheticRatings) -> float:
        users, movies = data.user_ids - 1, data.movie_ids - 1
        return float(np.mean(np.sum(
            planted['user_factors'][users] * planted['item_factors'][movies], axis=1)))

    plain, chosen = synthetic.generate(unbiased), synthetic.generate(biased)

    signal = synthetic.planted_signal(planted, biased, chosen.user_ids - 1,
                                      chosen.movie_ids - 1)
    np.testing.assert_allclose(chosen.oracle, np.clip(signal, 1, 5), rtol=1e-6)
    assert chosen.ratings.mean() > plain.ratings.mean() + 0.2
    assert chosen.oracle.mean() > plain.oracle.mean() + 0.2
    assert abs(interaction(plain) - all_pairs) < 0.05
    assert interaction(chosen) > all_pairs + 0.1
    assert chosen.truth['selection_bias'] == 2.0
    assert chosen.truth['rating_mean'] == pytest.approx(float(chosen.ratings.mean()))


def test_selection_bias_keeps_counts_unique_pairs_and_order() -> None:
    plain = synthetic.generate(synthetic.SyntheticConfig(**MEDIUM, model=synthetic.RANK3))
    chosen = synthetic.generate(synthetic.SyntheticConfig(**MEDIUM, model=synthetic.RANK3, selection_bias=2.0))

    users = MEDIUM['num_users'] + 1
    np.testing.assert_array_equal(np.bincount(chosen.user_ids, minlength=users),
                                  np.bincount(plain.user_ids, minlength=users))
    keys = chosen.user_ids.astype(np.int64) * (MEDIUM['num_movies'] + 1) + chosen.movie_ids
    assert np.all(np.diff(keys) > 0)  # unique pairs, sorted by user then movie
    assert chosen.movie_ids.min() >= 1 and chosen.movie_ids.max() <= MEDIUM['num_movies']
    assert not np.array_equal(chosen.movie_ids, plain.movie_ids)


def test_same_seed_gives_same_bytes_with_selection_bias(tmp_path: pathlib.Path) -> None:
    paths = [tmp_path / name for name in ('a.zip', 'b.zip', 'c.zip')]
    biased = synthetic.SyntheticConfig(**SMALL, selection_bias=1.5)
    synthetic.write_archive(str(paths[0]), biased)
    synthetic.write_archive(str(paths[1]), biased)
    synthetic.write_archive(str(paths[2]), dataclasses.replace(biased, selection_bias=0.0))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert read_member(paths[0], 'ml-100k/u.data') != read_member(paths[2], 'ml-100k/u.data')


def test_a_truth_json_from_before_franchises_redraws_that_generator() -> None:
    # A movielens truth.json written before franchises and interest existed
    # lacks their fields: bench/ranking.py must redraw the planted model it
    # was generated from, without franchises, interest or the larger pool.
    before = dict(movie_popularity_sigma=1.15, selection_bias=1.0,
                  **synthetic.EXPOSURE_LEGACY)
    truth = synthetic.generate(synthetic.SyntheticConfig(**SMALL, **before)).truth
    for name in synthetic.EXPOSURE_DEFAULTS:
        del truth[name]
    config = synthetic.config_from_truth(truth)
    assert config == synthetic.SyntheticConfig(**SMALL, **before)
    assert config.selection_candidates == synthetic.SELECTION_CANDIDATES
    planted = synthetic.planted_state(config)['planted']
    assert 'fan_user' not in planted and 'user_interest' not in planted
    assert 'fan_user' in synthetic.planted_state(synthetic.SyntheticConfig(**SMALL))['planted']
