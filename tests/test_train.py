"""Tests of trainer/rating/train.py and trainer/rating/optimizers.py on small planted data."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from trainer import config, data, features, history
from trainer.pipeline import synthetic
from trainer.rating import model, optimizers, train

# 150 users x 120 movies, 7,000 ratings: biases and rank-3 factors plus N(0, 0.5^2) noise.
PLANTED = synthetic.SyntheticConfig(num_users=150, num_movies=120,
                                    num_ratings=7_000, seed=4, noise_std=0.5, model='rank3')
FAST = dict(num_factors=8, batch_size=128, learning_rate=0.01, num_epochs=4,
            l2=0.05, eval_batch_size=1024, final_model='best', posterior_samples=0)
# What the planted factors must be worth in eval RMSE: a trained model beats its
# own biases (factors zeroed) by at least this (0.06-0.1 when the factors train).
BY_FACTORS = 0.03


def _example(user: int, item: int, rating: float) -> bytes:
    feature = {
        features.USER: tf.train.Feature(int64_list=tf.train.Int64List(value=[user])),
        features.ITEM: tf.train.Feature(int64_list=tf.train.Int64List(value=[item])),
        features.RATING: tf.train.Feature(float_list=tf.train.FloatList(value=[rating])),
    }
    return tf.train.Example(
        features=tf.train.Features(feature=feature)).SerializeToString()


def _write_split(work_dir: str, split: str, users, items, ratings) -> None:
    path = (features.split_prefix(work_dir, split) + '-00000-of-00001'
            + features.TFRECORD_SUFFIX)
    with tf.io.TFRecordWriter(path, options='GZIP') as writer:
        for row in zip(users.tolist(), items.tolist(), ratings.tolist()):
            writer.write(_example(*row))


@pytest.fixture(scope='module')
def planted(tmp_path_factory) -> tuple[features.DatasetInfo, int, int]:
    """Transformed TFRecords of PLANTED (80/20 split), its DatasetInfo and vocab sizes.

    Indices are id - 1; eval ids unseen in train map to the OOV row.
    """
    return _planted_split(str(tmp_path_factory.mktemp('planted')), PLANTED)


def _planted_split(work_dir: str, planted_config: synthetic.SyntheticConfig
                   ) -> tuple[features.DatasetInfo, int, int]:
    ratings = synthetic.generate(planted_config)
    num_users, num_movies = planted_config.num_users, planted_config.num_movies
    is_eval = np.random.default_rng(0).random(ratings.ratings.size) < 0.2
    train_users = np.isin(np.arange(num_users), ratings.user_ids[~is_eval] - 1)
    train_items = np.isin(np.arange(num_movies), ratings.movie_ids[~is_eval] - 1)
    users = np.where(train_users[ratings.user_ids - 1], ratings.user_ids - 1, num_users)
    items = np.where(train_items[ratings.movie_ids - 1], ratings.movie_ids - 1, num_movies)
    os.makedirs(features.transformed_dir(work_dir))
    for split, mask in ((features.TRAIN, ~is_eval), (features.EVAL, is_eval)):
        _write_split(work_dir, split, users[mask], items[mask], ratings.ratings[mask])
    train_mean = float(ratings.ratings[~is_eval].mean())
    eval_ratings = ratings.ratings[is_eval].astype(np.float64)
    info = features.DatasetInfo(
        dataset='synthetic', layout='ml-100k', seed=0, eval_percent=20.0,
        rows_read=ratings.ratings.size, rows_accepted=ratings.ratings.size,
        rows_rejected=0, rejected_by_reason={},
        train_ratings=int((~is_eval).sum()), eval_ratings=int(is_eval.sum()),
        users=num_users, movies=num_movies,
        train_mean_rating=train_mean,
        global_mean_eval_rmse=float(np.sqrt(np.mean((eval_ratings - train_mean) ** 2))),
        rating_min=1.0, rating_max=5.0,
        train_pattern=features.split_pattern(work_dir, features.TRAIN),
        eval_pattern=features.split_pattern(work_dir, features.EVAL))
    return info, num_users, num_movies


def _run(planted, model_dir: str, **overrides) -> train.TrainResult:
    info, num_users, num_movies = planted
    settings = {**FAST, **overrides}
    run_config = config.make_config(work_dir='unused', model_dir=model_dir,
                                    **settings)
    return train.train(run_config, info, num_users, num_movies)


@pytest.fixture(scope='module')
def four_epochs(planted, tmp_path_factory) -> train.TrainResult:
    """One uninterrupted run of FAST, shared by several checks."""
    return _run(planted, str(tmp_path_factory.mktemp('four') / 'model'))


def _eval_rmse(result: train.TrainResult, info: features.DatasetInfo,
               with_factors: bool = True) -> float:
    """The trained model's eval RMSE computed by hand, optionally from its biases alone."""
    ratings = data.load_ratings(info.eval_pattern)
    user, item = ratings.user.numpy(), ratings.item.numpy()
    trained = result.model
    prediction = (trained.global_mean.numpy() + trained.user_bias.numpy()[user]
                  + trained.item_bias.numpy()[item])
    if with_factors:
        prediction += np.sum(trained.user_factors.numpy()[user]
                             * trained.item_factors.numpy()[item], axis=1)
    error = np.clip(prediction, info.rating_min, info.rating_max) - ratings.rating.numpy()
    return float(np.sqrt(np.mean(error ** 2)))


def _metrics(result: train.TrainResult) -> np.ndarray:
    row = dataclasses.asdict(result.final)
    return np.array([row[name] for name in features.LOSS_LOG_COLUMNS[1:-1]])


def test_loss_log_columns_are_the_epoch_metrics_fields():
    assert tuple(field.name for field in dataclasses.fields(history.EpochMetrics)) \
        == features.LOSS_LOG_COLUMNS


def test_training_beats_the_global_mean_and_the_loss_falls(planted, four_epochs):
    info, _, _ = planted
    history = four_epochs.history
    assert [row.epoch for row in history] == [1, 2, 3, 4]
    assert four_epochs.final.eval_rmse < 0.85 * info.global_mean_eval_rmse
    # The factors, not the biases alone, earn part of that: the same model
    # without them scores clearly worse.
    assert _eval_rmse(four_epochs, info) == pytest.approx(four_epochs.final.eval_rmse, rel=1e-4)
    assert (four_epochs.final.eval_rmse
            < _eval_rmse(four_epochs, info, with_factors=False) - BY_FACTORS)
    train_mse = [row.train_mse for row in history]
    assert train_mse == sorted(train_mse, reverse=True)
    assert history[-1].eval_rmse < history[0].eval_rmse
    assert four_epochs.ratings_trained == 4 * four_epochs.fit_ratings
    assert four_epochs.fit_ratings + four_epochs.validation_ratings == info.train_ratings
    assert four_epochs.validation_ratings == round(0.1 * info.train_ratings)


def test_the_same_seed_gives_the_same_model(planted, four_epochs, tmp_path):
    again = _run(planted, str(tmp_path / 'again'))
    np.testing.assert_allclose(_metrics(again), _metrics(four_epochs), rtol=1e-6)
    np.testing.assert_allclose(again.model.item_factors.numpy(),
                               four_epochs.model.item_factors.numpy(), rtol=1e-6)
    other = _run(planted, str(tmp_path / 'other'), seed=1)
    assert not np.allclose(_metrics(other), _metrics(four_epochs), rtol=1e-4)


def test_resuming_continues_the_run_and_keeps_one_log_row_per_epoch(
        planted, four_epochs, tmp_path):
    model_dir = str(tmp_path / 'model')
    first = _run(planted, model_dir, num_epochs=2)
    assert first.initial_epoch == 0
    log_path = os.path.join(model_dir, features.LOSS_LOG_FILE)
    # A run that died after logging epoch 3 but before its checkpoint.
    with open(log_path, 'a', encoding='utf-8') as f:
        f.write('3' + ',9' * (len(features.LOSS_LOG_COLUMNS) - 1) + '\n')
    resumed = _run(planted, model_dir, num_epochs=4)
    assert resumed.initial_epoch == 2
    assert resumed.ratings_trained == 2 * resumed.fit_ratings
    logged = history.read_loss_log(log_path)
    assert [row.epoch for row in logged] == [1, 2, 3, 4]
    assert logged == resumed.history
    assert resumed.best_epoch == four_epochs.best_epoch
    # Each epoch's shuffle is seeded by (seed, epoch) and the checkpoint holds
    # the optimiser slots and step, so the resumed run repeats the same float
    # operations in the same order: only the last bits may differ.
    np.testing.assert_allclose(_metrics(resumed), _metrics(four_epochs), rtol=1e-6)


def test_resuming_with_another_optimizer_is_refused(planted, tmp_path):
    model_dir = str(tmp_path / 'model')
    _run(planted, model_dir, num_epochs=1, optimizer='adam')
    with pytest.raises(train.ResumeError, match='--overwrite'):
        _run(planted, model_dir, num_epochs=2, optimizer='adagrad')
    fresh = _run(planted, model_dir, num_epochs=1, optimizer='adagrad',
                 overwrite=True)
    assert fresh.initial_epoch == 0
    assert [row.epoch for row in fresh.history] == [1]


def test_a_finished_run_is_not_trained_again(planted, tmp_path):
    model_dir = str(tmp_path / 'model')
    done = _run(planted, model_dir, num_epochs=1)
    again = _run(planted, model_dir, num_epochs=1)
    assert again.initial_epoch == 1 and again.ratings_trained == 0
    assert [row.epoch for row in again.history] == [1]
    assert again.final.eval_rmse == pytest.approx(done.final.eval_rmse, rel=1e-6)


@pytest.mark.parametrize('name, learning_rate', [
    ('sgd', 2.0), ('adagrad', 1.0), ('adam', 0.01)])
def test_each_optimizer_trains(planted, tmp_path, name, learning_rate):
    info, _, _ = planted
    result = _run(planted, str(tmp_path / name), optimizer=name,
                  learning_rate=learning_rate, num_epochs=10, init_stddev=0.3)
    assert result.final.eval_rmse < 0.9 * info.global_mean_eval_rmse
    # Biases alone reach 0.78-0.79 here; each optimiser must train the factors too.
    assert result.final.eval_rmse < _eval_rmse(result, info, with_factors=False) - BY_FACTORS


@pytest.mark.parametrize('name', sorted(optimizers.OPTIMIZERS))
def test_optimizers_update_only_touched_rows_and_sum_duplicates(name):
    table = tf.Variable(tf.ones([4, 2]))
    optimizer = optimizers.make_optimizer(name, {'table': table}, 0.1)
    gradient = tf.IndexedSlices(tf.constant([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]),
                                tf.constant([2, 0, 2]))
    optimizer.apply_gradients({'table': gradient}, {'table': table})
    summed = {0: 2.0, 2: 4.0}  # row 2 appears twice: 1 + 3
    expected = {  # one step from zero slots, for a summed gradient g
        'sgd': lambda g: 1.0 - 0.1 * g,
        'adagrad': lambda g: 1.0 - 0.1 * g / (np.sqrt(0.1 + g * g) + 1e-7),
        'adam': lambda g: 1.0 - 0.1 * g / (abs(g) + 1e-7),
    }[name]
    np.testing.assert_allclose(
        table.numpy(),
        [[expected(summed[0])] * 2, [1.0] * 2, [expected(summed[2])] * 2, [1.0] * 2], rtol=1e-5)
    assert int(optimizer.iterations.numpy()) == 1


def test_dense_gradients_are_refused():
    with pytest.raises(TypeError, match='tf.gather'):
        optimizers.combine_duplicates(tf.ones([3]))


def test_a_mirrored_strategy_over_two_devices_matches_the_default(planted, tmp_path):
    """The step is strategy-compatible: two CPU replicas give the same model."""
    info, num_users, num_movies = planted
    script = textwrap.dedent(f'''
        import json, sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices('CPU')[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from trainer import config, features
        from trainer.rating import train
        info = features.DatasetInfo(**json.loads(sys.argv[1]))
        results = []
        for name, strategy in (
                ('default', None),
                ('mirrored', tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1']))):
            run_config = config.make_config(
                work_dir='unused', model_dir=sys.argv[2] + '/' + name,
                num_factors=4, batch_size=256, num_epochs=2)
            result = train.train(run_config, info, {num_users}, {num_movies}, strategy)
            results.append([result.final.train_rmse, result.final.eval_rmse])
        print(json.dumps(results))
    ''')
    process = subprocess.run(
        [sys.executable, '-c', script, features.to_json(info), str(tmp_path)],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True, text=True, timeout=300, check=False)
    assert process.returncode == 0, process.stderr[-3000:]
    default, mirrored = np.array(json.loads(process.stdout.strip().splitlines()[-1]))
    # Replicas sum their half-batch gradients in another order: float noise only.
    np.testing.assert_allclose(mirrored, default, rtol=1e-4)


def test_a_loss_log_with_other_columns_is_refused(tmp_path):
    path = tmp_path / features.LOSS_LOG_FILE
    path.write_text('epoch,loss\n1,0.5\n', encoding='utf-8')
    with pytest.raises(train.ResumeError, match='--overwrite'):
        history.read_loss_log(str(path))
    path.write_text(','.join(features.LOSS_LOG_COLUMNS) + '\n1,0.5\n', encoding='utf-8')
    with pytest.raises(train.ResumeError, match='cut off.*--overwrite'):
        history.read_loss_log(str(path))
    assert history.read_loss_log(str(tmp_path / 'absent.csv')) == ()


def test_padding_a_gradient_is_undone_after_the_all_reduce():
    gradient = tf.IndexedSlices(tf.constant([[1.0, 2.0], [3.0, 4.0]]),
                                tf.constant([3, 0], tf.int64), tf.constant([5, 2], tf.int64))
    padded = train.pad_rows(gradient, 4)
    assert padded.values.shape == (4, 2)
    assert padded.indices.numpy().tolist() == [3, 0, 5, 5]  # 5: out of range
    restored = train.drop_padding(padded, tf.constant(0.5))
    assert restored.indices.numpy().tolist() == [3, 0]
    np.testing.assert_allclose(restored.values.numpy(), [[0.5, 1.0], [1.5, 2.0]])


def test_resuming_on_other_data_is_refused(planted, tmp_path):
    model_dir = str(tmp_path / 'model')
    _run(planted, model_dir, num_epochs=1)
    info, users, items = planted
    resplit = (dataclasses.replace(info, seed=info.seed + 1), users, items)
    with pytest.raises(train.ResumeError, match='seed changed.*--overwrite'):
        _run(resplit, model_dir, num_epochs=2)
    again = _run(resplit, model_dir, num_epochs=1, overwrite=True)
    assert again.initial_epoch == 0


# Validation RMSE by epoch: best at 3, then three epochs without improvement.
# Eval RMSE is best at epoch 6: a loop that peeked at eval would keep epoch 6.
PLANTED_VALIDATION = [1.0, 0.9, 0.85, 0.851, 0.87, 0.86, 0.5]
PLANTED_EVAL = [1.0, 0.95, 0.9, 0.9, 0.88, 0.7, 0.7]


def test_early_stopping_keeps_the_best_validation_epoch_and_ignores_eval(
        planted, tmp_path, monkeypatch):
    """A planted validation curve decides; the eval split never does."""
    real_scorer, real_build_state = train.make_scorer, train.state_lib.build_state
    calls = {'validation': 0, 'eval': 0}
    held = {}

    def planted_scorer(model, rating_min, rating_max, chunk_size, kernel='tf'):
        score = real_scorer(model, rating_min, rating_max, chunk_size, kernel)

        def fake(ratings):
            metrics = score(ratings)
            for name, curve in (('validation', PLANTED_VALIDATION), ('eval', PLANTED_EVAL)):
                if len(ratings) == held[name] and calls[name] < len(curve):
                    metrics = {**metrics, 'rmse': curve[calls[name]]}
                    calls[name] += 1
                    break
            return metrics
        return fake

    def remember_splits(config, info):
        splits = real_load_splits(config, info)
        held.update(validation=len(splits.validation), eval=len(splits.eval))
        return splits

    snapshots = {}

    def capture_state(*args, **kwargs):
        held['state'] = real_build_state(*args, **kwargs)
        return held['state']

    real_load_splits = train.load_splits
    monkeypatch.setattr(train, 'make_scorer', planted_scorer)
    monkeypatch.setattr(train, 'load_splits', remember_splits)
    monkeypatch.setattr(train.state_lib, 'build_state', capture_state)
    info, num_users, num_movies = planted
    run_config = config.make_config(work_dir='unused', model_dir=str(tmp_path / 'model'),
                                    **{**FAST, 'num_epochs': 20})
    result = train.train(
        run_config, info, num_users, num_movies,
        on_epoch_end=lambda row: snapshots.setdefault(
            row.epoch, held['state'].model.user_embedding.numpy().copy()))
    assert [row.epoch for row in result.history] == [1, 2, 3, 4, 5, 6]
    assert result.best_epoch == 3 and result.stopped_early
    np.testing.assert_array_equal(result.model.user_embedding.numpy(), snapshots[3])
    assert not np.array_equal(snapshots[6], snapshots[3])
    # A re-run resumes the stopped run and trains no further.
    monkeypatch.setattr(train, 'make_scorer', real_scorer)
    again = train.train(run_config, info, num_users, num_movies)
    assert again.ratings_trained == 0 and again.best_epoch == 3
    np.testing.assert_array_equal(again.model.user_embedding.numpy(), snapshots[3])


def test_the_fused_epochs_order_and_scoring_keep_the_model_of_shuffled_copies(
        planted, tmp_path, monkeypatch):
    """Training through the permutation and scoring with the C++ op give, bit
    for bit, the model that shuffled copies and TensorFlow scoring gave: the
    same best epoch, the same refit; the scores agree to float32 rounding."""
    settings = dict(num_epochs=6, final_model='refit', early_stopping_patience=2)
    now = _run(planted, str(tmp_path / 'now'), **settings)
    real_make_epoch, real_scorer = train.fused.make_epoch, train.make_scorer

    def copies_epoch(*args, **kwargs):
        epoch = real_make_epoch(*args, **kwargs)
        return lambda *columns: epoch(*columns)  # no reads_order: `data.shuffle` copies
    monkeypatch.setattr(train.fused, 'make_epoch', copies_epoch)
    monkeypatch.setattr(train, 'make_scorer', lambda *args: real_scorer(*args[:4], 'tf'))
    before = _run(planted, str(tmp_path / 'before'), **settings)
    assert now.refit and before.refit and now.best_epoch == before.best_epoch
    for name in ('user_embedding', 'item_embedding'):
        np.testing.assert_array_equal(getattr(now.model, name).numpy(),
                                      getattr(before.model, name).numpy())
        np.testing.assert_array_equal(getattr(now.search_model, name).numpy(),
                                      getattr(before.search_model, name).numpy())
    assert len(now.history) == len(before.history) > 2
    for got, want in zip(now.history, before.history):
        assert got.train_rmse == want.train_rmse
        assert got.validation_rmse == pytest.approx(want.validation_rmse, abs=1e-6)
        assert got.eval_rmse == pytest.approx(want.eval_rmse, abs=1e-6)
    assert now.final.eval_rmse == pytest.approx(before.final.eval_rmse, abs=1e-6)


def test_without_a_validation_slice_the_last_epoch_is_kept(planted, tmp_path):
    result = _run(planted, str(tmp_path / 'model'), validation_percent=0.0, num_epochs=3)
    assert result.validation_ratings == 0 and result.best_epoch == 3
    assert not result.stopped_early
    assert all(np.isnan(row.validation_rmse) for row in result.history)


def test_the_learning_rate_decays_each_epoch(planted, tmp_path):
    """With a vanishing decay, epochs after the first barely move the model."""
    def user_rows(name: str, epochs: int, decay: float) -> np.ndarray:
        result = _run(planted, str(tmp_path / name), num_epochs=epochs,
                      learning_rate_decay=decay, validation_percent=0.0)
        return result.model.user_embedding.numpy()

    first = user_rows('one', 1, 1e-6)
    np.testing.assert_allclose(user_rows('frozen', 3, 1e-6), first, atol=1e-5)
    assert np.abs(user_rows('constant', 3, 1.0) - first).max() > 1e-2


def test_a_refit_retrains_on_all_train_ratings_for_the_best_epoch_count(
        planted, tmp_path):
    model_dir = str(tmp_path / 'model')
    refit = _run(planted, model_dir, final_model='refit', num_epochs=6)
    assert refit.refit and refit.fit_ratings == planted[0].train_ratings
    assert 1 <= refit.best_epoch <= 6
    assert np.isnan(refit.final.validation_rmse)  # in-sample after a refit
    # The same as training on the whole split for that many epochs: the
    # same initial factors and the same seeded shuffles.
    direct = _run(planted, str(tmp_path / 'direct'), validation_percent=0.0,
                  num_epochs=refit.best_epoch)
    np.testing.assert_array_equal(refit.model.user_embedding.numpy(),
                                  direct.model.user_embedding.numpy())
    assert refit.final.eval_rmse == direct.final.eval_rmse
    # A re-run resumes both phases and trains nothing more.
    again = _run(planted, model_dir, final_model='refit', num_epochs=6)
    assert again.ratings_trained == 0 and again.refit
    np.testing.assert_array_equal(again.model.user_embedding.numpy(),
                                  refit.model.user_embedding.numpy())


def test_posterior_averaging_starts_from_the_trained_model_and_repeats(
        planted, four_epochs, tmp_path):
    model_dir = str(tmp_path / 'model')
    averaged = _run(planted, model_dir, posterior_samples=20, posterior_burn_in=5)
    # It started from exactly the model that training without it exports.
    assert averaged.posterior['before'] == dataclasses.asdict(four_epochs.final)
    assert averaged.posterior['samples'] == 20 and averaged.posterior['burn_in'] == 5
    assert not np.allclose(averaged.model.user_embedding.numpy(),
                           four_epochs.model.user_embedding.numpy(), atol=1e-3)
    assert averaged.final.validation_rmse != four_epochs.final.validation_rmse
    # A re-run restores the trained model, trains nothing, and averages to the same tables.
    again = _run(planted, model_dir, posterior_samples=20, posterior_burn_in=5)
    assert again.ratings_trained == 0
    np.testing.assert_array_equal(again.model.user_embedding.numpy(),
                                  averaged.model.user_embedding.numpy())
    assert again.final == averaged.final
    # Without the C++ op the same chain runs in numpy, float rounding apart.
    in_numpy = _run(planted, str(tmp_path / 'numpy'), posterior_samples=20,
                    posterior_burn_in=5, training_kernel='tf')
    assert in_numpy.posterior['kernel'] == 'numpy'
    assert in_numpy.final.eval_rmse == pytest.approx(averaged.final.eval_rmse, abs=1e-3)


# Users who pick the movies they like: which movies a user rated tells their taste.
CHOOSY = dataclasses.replace(PLANTED, num_users=300, num_movies=200, num_ratings=12_000,
                             selection_bias=3.0)


@pytest.fixture(scope='module')
def choosy(tmp_path_factory) -> tuple[features.DatasetInfo, int, int]:
    return _planted_split(str(tmp_path_factory.mktemp('choosy')), CHOOSY)


def test_implicit_feedback_learns_from_which_movies_users_chose(choosy, tmp_path):
    settings = dict(num_epochs=12, final_model='refit', validation_percent=10.0)
    plain = _run(choosy, str(tmp_path / 'plain'), **settings)
    implicit = _run(choosy, str(tmp_path / 'implicit'), implicit_feedback=True, **settings)
    assert implicit.final.eval_rmse < plain.final.eval_rmse - 0.01, (
        implicit.final.eval_rmse, plain.final.eval_rmse)
    # The exported model is plain: the implicit sums are folded into the user factors.
    assert not implicit.model.implicit_feedback
    assert set(implicit.model.parameters()) == set(model.PARAMETER_NAMES)


def test_implicit_feedback_folds_exactly_resumes_and_repeats(planted, tmp_path):
    settings = dict(implicit_feedback=True, num_epochs=4, validation_percent=10.0)
    whole = _run(planted, str(tmp_path / 'whole'), **settings)
    best = whole.history[whole.best_epoch - 1]
    # Scored after folding, the model predicts what the implicit model did in training.
    assert whole.final.eval_rmse == pytest.approx(best.eval_rmse, abs=1e-6)
    assert whole.final.validation_rmse == pytest.approx(best.validation_rmse, abs=1e-6)
    again = _run(planted, str(tmp_path / 'again'), **settings)
    np.testing.assert_allclose(_metrics(again), _metrics(whole), rtol=0, atol=1e-6)
    resumed_dir = str(tmp_path / 'resumed')
    _run(planted, resumed_dir, **{**settings, 'num_epochs': 2})
    resumed = _run(planted, resumed_dir, **settings)
    assert resumed.initial_epoch == 2
    np.testing.assert_allclose(_metrics(resumed), _metrics(whole), rtol=0, atol=1e-6)
    # A plain model's checkpoints do not hold the implicit table.
    with pytest.raises(train.ResumeError, match='--overwrite'):
        _run(planted, str(tmp_path / 'whole'), **{**settings, 'implicit_feedback': False,
                                                  'num_epochs': 6})


def test_implicit_feedback_refuses_several_replicas():
    class TwoReplicas:  # all that make_train_epoch reads before it refuses
        num_replicas_in_sync = 2
    implicit = model.MatrixFactorization(5, 5, 2, 3.0, 0.1, seed=0, implicit_feedback=True)
    optimizer = optimizers.make_optimizer('sgd', implicit.parameters(), 0.01)
    with pytest.raises(train.Unsupported, match='one replica'):
        train.make_train_epoch(TwoReplicas(), implicit, optimizer,
                               model.penalty_weights(2, 0.1, 0.01), 128, 1.0, 5.0)


def _per_rating_squared_errors(scored_model: model.MatrixFactorization,
                               ratings: data.Ratings, info: features.DatasetInfo) -> np.ndarray:
    prediction = scored_model(ratings.user, ratings.item).numpy()
    error = np.clip(prediction, info.rating_min, info.rating_max) - ratings.rating.numpy()
    return error.astype(np.float64) ** 2


def test_the_per_epoch_scores_are_seeded_samples_within_their_stated_error(
        planted, tmp_path, monkeypatch):
    """Each epoch's eval RMSE on a 400-rating sample lies within 3 standard errors
    of the full split's; the stated error is the one measured; validation and
    the final model are scored in full."""
    real_build_state, held = train.state_lib.build_state, {}

    def capture_state(*args, **kwargs):
        held.setdefault('state', real_build_state(*args, **kwargs))
        return held['state']

    monkeypatch.setattr(train.state_lib, 'build_state', capture_state)
    info, num_users, num_movies = planted
    full_eval = data.load_ratings(info.eval_pattern)
    validation = train.load_splits(
        config.make_config(work_dir='unused', model_dir='unused'), info).validation
    per_epoch = []

    def check(row):
        squared = _per_rating_squared_errors(held['state'].model, full_eval, info)
        per_epoch.append((row.eval_rmse, squared))
        assert row.validation_rmse == pytest.approx(np.sqrt(np.mean(
            _per_rating_squared_errors(held['state'].model, validation, info))), abs=1e-5)

    result = train.train(
        config.make_config(work_dir='unused', model_dir=str(tmp_path / 'model'),
                           **{**FAST, 'epoch_eval_ratings': 400}),
        info, num_users, num_movies, on_epoch_end=check)
    assert len(full_eval) > 1_000 and len(per_epoch) == 4
    for sampled_rmse, squared in per_epoch:
        full_rmse = float(np.sqrt(squared.mean()))
        # The delta method's standard error of the RMSE of 400 of these ratings.
        measured = (squared.std() / (2 * full_rmse * np.sqrt(400))
                    * np.sqrt(1 - 400 / squared.size))
        stated = train.sampled_rmse_error(400, squared.size, full_rmse)
        assert stated == pytest.approx(measured, rel=0.3)
        assert sampled_rmse != pytest.approx(full_rmse, abs=1e-7)  # a sample, not all
        assert abs(sampled_rmse - full_rmse) < 3 * measured
    assert result.final.eval_rmse == pytest.approx(_eval_rmse(result, info), abs=1e-5)


def test_the_per_epoch_samples_are_keyed_by_the_split_seed(planted):
    info, _, _ = planted
    splits = train.load_splits(config.make_config(work_dir='unused', model_dir='unused'), info)

    def samples(seed, **overrides):
        run_config = config.make_config(work_dir='unused', model_dir='unused',
                                        **{'seed': seed, **overrides})
        return train.epoch_samples(run_config, info, splits)

    validation, eval_ = samples(0, epoch_eval_ratings=300)
    assert len(validation) == len(splits.validation) > 300 and len(eval_) == 300
    for again, first in zip(samples(7, epoch_eval_ratings=300), (validation, eval_)):
        np.testing.assert_array_equal(again.user.numpy(), first.user.numpy())
        np.testing.assert_array_equal(again.item.numpy(), first.item.numpy())
    other = train.epoch_samples(
        config.make_config(work_dir='unused', model_dir='unused', epoch_eval_ratings=300),
        dataclasses.replace(info, seed=1), splits)[1]
    assert not np.array_equal(other.item.numpy(), eval_.item.numpy())
    # In the split's (user, item) order, each a row of it.
    keys = eval_.user.numpy().astype(np.int64) * 1_000 + eval_.item.numpy()
    assert np.all(np.diff(keys) >= 0)
    full = splits.eval.user.numpy().astype(np.int64) * 1_000 + splits.eval.item.numpy()
    assert np.isin(keys, full).all()
    everything = samples(0, epoch_eval_ratings=0)
    assert [len(part) for part in everything] == [len(splits.validation), len(splits.eval)]

