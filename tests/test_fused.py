"""The fused C++ epoch against the TensorFlow-ops epoch it replaces, and its build."""

from __future__ import annotations

import functools
import logging
import pathlib
import shutil
import subprocess
import sys
import time
import zipfile
from concurrent import futures

import numpy as np
import pytest
import tensorflow as tf

from trainer import config as config_lib
from trainer import data
from trainer.ops import kernels
from trainer.rating import fused
from trainer.rating import model as model_lib
from trainer.rating import optimizers
from trainer.rating import train as train_lib

USERS, ITEMS, FACTORS, BATCH = 40, 25, 4, 64


def _ratings(count: int = 1000, seed: int = 0):
    """Few users and items: every batch repeats rows, so duplicates are summed."""
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.integers(0, USERS, count), tf.int32),
            tf.constant(rng.integers(0, ITEMS, count), tf.int32),
            tf.constant(rng.integers(1, 11, count) / 2, tf.float32))


def _weights(seed: int = 1):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.uniform(0.2, 3, USERS + 1), tf.float32),
            tf.constant(rng.uniform(0.2, 3, ITEMS + 1), tf.float32))


def _trained(kind: str, epochs: int = 2, weighted: bool = False, threads: int = 2,
             learning_rate: float = 0.05):
    """(model, optimiser, per-epoch totals) after `epochs` epochs of `kind`."""
    model = model_lib.MatrixFactorization(USERS, ITEMS, FACTORS, 3.2, 0.1, seed=7)
    optimizer = optimizers.Adam(model.parameters(), learning_rate)
    penalty = model_lib.penalty_weights(FACTORS, 0.05, 0.01)
    if kind == 'tf':
        epoch = train_lib.make_train_epoch(tf.distribute.get_strategy(), model,
                                           optimizer, penalty, BATCH, 1.0, 5.0)
    else:
        epoch = fused.make_epoch(model, optimizer, penalty, BATCH, 1.0, 5.0,
                                 threads=threads)
    user_weights, item_weights = _weights() if weighted else (None, None)
    totals = []
    for number in range(epochs):
        user, item, rating = _ratings(seed=number)
        totals.append(epoch(user, item, rating, user_weights, item_weights).numpy())
    return model, optimizer, np.array(totals)


def _tables(model) -> tuple[np.ndarray, np.ndarray]:
    return model.user_embedding.numpy(), model.item_embedding.numpy()


@pytest.mark.parametrize('weighted', [False, True])
def test_fused_epoch_trains_as_the_tensorflow_ops_do(weighted):
    reference, reference_optimizer, reference_totals = _trained('tf', weighted=weighted)
    model, optimizer, totals = _trained('fused', weighted=weighted)
    # Same updates; only the order of float32 sums inside a row differs.
    for expected, actual in zip(_tables(reference), _tables(model)):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-5)
    for name in model_lib.PARAMETER_NAMES:
        np.testing.assert_allclose(optimizer.first_moments[name].numpy(),
                                   reference_optimizer.first_moments[name].numpy(),
                                   rtol=0, atol=1e-6)
        np.testing.assert_allclose(optimizer.second_moments[name].numpy(),
                                   reference_optimizer.second_moments[name].numpy(),
                                   rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(totals, reference_totals, rtol=1e-5)
    assert optimizer.iterations.numpy() == reference_optimizer.iterations.numpy() == 2 * 16
    # The model moved: the comparison is not between two untrained models.
    untrained = model_lib.MatrixFactorization(USERS, ITEMS, FACTORS, 3.2, 0.1, seed=7)
    assert np.abs(_tables(model)[0] - _tables(untrained)[0]).max() > 0.05


def test_fused_epoch_is_the_same_for_any_thread_count_and_run():
    one = _tables(_trained('fused', threads=1)[0])
    for other in (_trained('fused', threads=3)[0], _trained('fused', threads=1)[0]):
        for expected, actual in zip(one, _tables(other)):
            np.testing.assert_array_equal(actual, expected)


def test_fused_epoch_rejects_out_of_range_indices():
    model = model_lib.MatrixFactorization(USERS, ITEMS, FACTORS, 3.2, 0.1, seed=7)
    optimizer = optimizers.Adam(model.parameters(), 0.01)
    epoch = fused.make_epoch(model, optimizer, model_lib.penalty_weights(FACTORS, 0.05, 0.01),
                             BATCH, 1.0, 5.0)
    before = _tables(model)
    bad_item = tf.constant([0, ITEMS + 1], tf.int32)  # the table has ITEMS + 1 rows
    with pytest.raises(tf.errors.InvalidArgumentError, match='item index 26 at 1'):
        epoch(tf.constant([0, 1], tf.int32), bad_item, tf.constant([3.0, 4.0]), None, None)
    for expected, actual in zip(before, _tables(model)):  # checked before any update
        np.testing.assert_array_equal(actual, expected)


def test_fused_epoch_through_an_order_trains_as_on_shuffled_copies():
    """The epoch's permutation read by the op (any thread count) gives the bits
    that training on `data.shuffle`'s copies gave."""
    user, item, rating = _ratings(3000, seed=5)
    ratings = data.Ratings(user, item, rating)
    results = []
    for threads, through_order in ((2, False), (2, True), (1, True), (3, True)):
        model = model_lib.MatrixFactorization(USERS, ITEMS, FACTORS, 3.2, 0.1, seed=7)
        optimizer = optimizers.Adam(model.parameters(), 0.05)
        epoch = fused.make_epoch(model, optimizer, model_lib.penalty_weights(FACTORS, 0.05, 0.01),
                                 BATCH, 1.0, 5.0, threads=threads)
        totals = []
        for seed in (11, 12):
            if through_order:
                totals.append(epoch(user, item, rating, *_weights(),
                                    fused.epoch_order(len(ratings), seed)).numpy())
            else:
                shuffled = data.shuffle(ratings, seed)
                totals.append(epoch(shuffled.user, shuffled.item, shuffled.rating,
                                    *_weights()).numpy())
        results.append((_tables(model), np.array(totals), optimizer.iterations.numpy()))
    (expected, expected_totals, steps), *others = results
    assert steps == 2 * 47
    for tables, totals, other_steps in others:
        for want, got in zip(expected, tables):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(totals, expected_totals, rtol=1e-12)
        assert other_steps == steps


def test_fused_epoch_trains_a_partial_order_and_rejects_a_bad_entry():
    user, item, rating = _ratings(300, seed=6)
    model = model_lib.MatrixFactorization(USERS, ITEMS, FACTORS, 3.2, 0.1, seed=7)
    optimizer = optimizers.Adam(model.parameters(), 0.05)
    epoch = fused.make_epoch(model, optimizer, model_lib.penalty_weights(FACTORS, 0.05, 0.01),
                             BATCH, 1.0, 5.0)
    totals = epoch(user, item, rating, None, None, tf.constant([5, 3, 299], tf.int32)).numpy()
    assert totals[1] == 3 and optimizer.iterations.numpy() == 1
    before = _tables(model)
    with pytest.raises(tf.errors.InvalidArgumentError, match='order entry 300 at 1'):
        epoch(user, item, rating, None, None, tf.constant([0, 300], tf.int32))
    for expected, actual in zip(before, _tables(model)):
        np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize('size', [0, 1, 2, 3, 1000, 65_537])
def test_epoch_order_is_tensorflows_stateless_shuffle(size):
    for seed in (0, 7, data.epoch_seed(3, 2)):
        expected = tf.random.experimental.stateless_shuffle(
            tf.range(size, dtype=tf.int32), seed=(seed, 0)).numpy()
        np.testing.assert_array_equal(fused.epoch_order(size, seed).numpy(), expected)
    if size > 3:  # a permutation, and not the identity
        order = fused.epoch_order(size, 7).numpy()
        assert sorted(order) == list(range(size)) and (order != np.arange(size)).any()


def _scored(model, user, item, rating, low=1.0, high=5.0):
    """(squared, absolute) error sums by numpy in float64, predictions clipped."""
    users, items = model.user_embedding.numpy(), model.item_embedding.numpy()
    prediction = (float(model.global_mean.numpy()) + users[user, -1] + items[item, -1]
                  + np.sum(users[user, :-1].astype(np.float64) * items[item, :-1], axis=1))
    error = np.clip(prediction, low, high) - rating
    return np.array([np.sum(error ** 2), np.sum(np.abs(error))])


def test_the_scoring_op_matches_numpy_and_tensorflow_on_any_thread_count():
    model = model_lib.MatrixFactorization(USERS, ITEMS, FACTORS, 3.2, 0.6, seed=3)
    user, item, rating = _ratings(40_000, seed=8)  # several chunks of 16,384
    expected = _scored(model, user.numpy(), item.numpy(), rating.numpy())
    by_threads = [fused.make_scorer(model, 1.0, 5.0, threads)(user, item, rating).numpy()
                  for threads in (1, 2, 3)]
    np.testing.assert_allclose(by_threads[0], expected, rtol=1e-6)
    for other in by_threads[1:]:
        np.testing.assert_array_equal(other, by_threads[0])
    ratings = data.Ratings(user, item, rating)
    for kernel in ('tf', 'auto'):
        metrics = train_lib.make_scorer(model, 1.0, 5.0, 1024, kernel)(ratings)
        assert metrics['mse'] == pytest.approx(expected[0] / 40_000, rel=1e-6)
        assert metrics['mae'] == pytest.approx(expected[1] / 40_000, rel=1e-6)
    # Clipping matters here: some predictions fall outside [1, 5].
    assert not np.allclose(expected, _scored(model, user.numpy(), item.numpy(),
                                             rating.numpy(), -100, 100))
    empty = tf.zeros([0], tf.int32)
    assert np.isnan(train_lib.make_scorer(model, 1.0, 5.0, 1024, 'auto')(
        data.Ratings(empty, empty, tf.zeros([0])))['rmse'])


def test_the_scoring_op_rejects_out_of_range_indices():
    model = model_lib.MatrixFactorization(USERS, ITEMS, FACTORS, 3.2, 0.1, seed=3)
    with pytest.raises(tf.errors.InvalidArgumentError, match='user index 41 at 1'):
        fused.make_scorer(model, 1.0, 5.0)(tf.constant([0, USERS + 1], tf.int32),
                                           tf.constant([0, 1], tf.int32),
                                           tf.constant([3.0, 4.0]))


def test_build_without_a_compiler_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path / 'cache'))
    with pytest.raises(kernels.KernelUnavailable, match='no C[+][+] compiler .* install g[+][+]'):
        kernels.build()


def test_a_missing_source_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, 'SOURCES', (*kernels.SOURCES, tmp_path / 'gone.cc'))
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path / 'cache'))
    with pytest.raises(kernels.KernelUnavailable, match='cannot read the op source .*gone.cc'):
        kernels.build()


def test_the_package_ships_every_op_source(tmp_path):
    """A wheel built from setup.py (what the image and Dataflow workers install)
    holds every source `build` compiles."""
    root = pathlib.Path(kernels.__file__).resolve().parents[2]
    for name in ('setup.py', 'requirements.txt'):
        shutil.copy(root / name, tmp_path / name)
    shutil.copytree(root / 'trainer', tmp_path / 'trainer',
                    ignore=shutil.ignore_patterns('__pycache__'))
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                    '--quiet', '-w', str(tmp_path / 'dist'), str(tmp_path)],
                   check=True, capture_output=True)
    wheel, = (tmp_path / 'dist').glob('*.whl')
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    assert {f'trainer/ops/{source.name}' for source in kernels.SOURCES} <= shipped


def test_a_failed_build_names_the_error_and_leaves_no_library(monkeypatch, tmp_path):
    source = tmp_path / 'fused_epoch.cc'
    source.write_text('this is not C++;\n')
    monkeypatch.setattr(kernels, 'SOURCES', (source,))
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path / 'cache'))
    with pytest.raises(kernels.KernelUnavailable, match='building fused_epoch.cc failed: .*error'):
        kernels.build()
    assert not list((tmp_path / 'cache').rglob('*.so'))


def test_a_failed_link_names_it_and_leaves_nothing_behind(monkeypatch, tmp_path):
    real_link = kernels._link_command
    monkeypatch.setattr(kernels, '_link_command', lambda compiler, objects, output: real_link(
        compiler, [*objects, tmp_path / 'missing.o'], output))
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path / 'cache'))
    with pytest.raises(kernels.KernelUnavailable, match='linking fused_epoch.cc, .* failed: .*missing'):
        kernels.build()
    assert not [path for path in (tmp_path / 'cache').rglob('*') if path.is_file()]


def test_the_library_is_cached_by_source(monkeypatch, tmp_path):
    built = kernels.build()
    assert kernels.build() == built  # cached: the same file, not rebuilt
    assert built.stat().st_size > 0
    copy = tmp_path / 'fused_epoch.cc'
    copy.write_text(kernels.SOURCES[0].read_text() + '\n// changed\n')
    monkeypatch.setattr(kernels, 'SOURCES', (copy, *kernels.SOURCES[1:]))
    assert kernels.library_path('g++').parent != built.parent


class _TwoReplicas:
    num_replicas_in_sync = 2


def _choose(kind: str, strategy=None, optimizer_name: str = 'adam', implicit: bool = False):
    config = config_lib.make_config('work', training_kernel=kind, optimizer=optimizer_name,
                                    l2=0.05, learning_rate_decay=1.0,
                                    implicit_feedback=implicit)
    model = model_lib.MatrixFactorization(USERS, ITEMS, FACTORS, 3.2, 0.1, seed=7,
                                          implicit_feedback=implicit)
    optimizer = optimizers.make_optimizer(optimizer_name, model.parameters(), 0.01)
    return train_lib.choose_train_epoch(
        config, strategy or tf.distribute.get_strategy(), model, optimizer,
        model_lib.penalty_weights(FACTORS, 0.05, 0.01), 1.0, 5.0)


@pytest.mark.parametrize('strategy, optimizer_name, implicit, reason', [
    (_TwoReplicas(), 'adam', False, 'this cluster has 2'),
    (None, 'sgd', False, 'not --optimizer sgd'),
    (None, 'adam', True, 'no implicit-feedback term'),
])
def test_auto_falls_back_to_tensorflow_ops_and_says_why(strategy, optimizer_name, implicit,
                                                        reason, monkeypatch, caplog):
    built = []
    monkeypatch.setattr(train_lib, 'make_train_epoch',
                        lambda *args, **kwargs: built.append(args) or 'tf')
    with caplog.at_level(logging.WARNING, logger='trainer.rating.train'):
        assert _choose('auto', strategy, optimizer_name, implicit) == 'tf'
    assert built and reason in caplog.text
    with pytest.raises(kernels.KernelUnavailable, match=f'{reason}.*--training-kernel auto'):
        _choose('fused', strategy, optimizer_name, implicit)


def test_auto_falls_back_when_the_kernel_cannot_be_built(monkeypatch, caplog):
    def unavailable(*args, **kwargs):
        raise kernels.KernelUnavailable('no C++ compiler (g++) on PATH; install g++')
    monkeypatch.setattr(fused, 'make_epoch', unavailable)
    with caplog.at_level(logging.WARNING, logger='trainer.rating.train'):
        epoch = _choose('auto')
    assert 'not fused: no C++ compiler' in caplog.text
    assert callable(epoch)
    with pytest.raises(kernels.KernelUnavailable, match='install g[+][+]; use --training-kernel auto'):
        _choose('fused')


def test_tf_kernel_is_used_when_asked(monkeypatch):
    monkeypatch.setattr(fused, 'make_epoch', lambda *args, **kwargs: pytest.fail('fused built'))
    assert callable(_choose('tf'))
    assert callable(_choose('auto', optimizer_name='adagrad'))


def test_fused_flag_with_another_optimizer_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        config_lib.parse_args(['--work-dir', 'w', '--training-kernel', 'fused',
                               '--optimizer', 'sgd'], environ={})
    assert exit_info.value.code == 2
    assert 'fused trains with adam, not --optimizer sgd; use --training-kernel auto' in (
        capsys.readouterr().err)


def test_module_entry_point_builds_and_prints_the_library():
    result = subprocess.run([sys.executable, '-m', 'trainer.ops.kernels'], capture_output=True,
                            text=True, check=True, cwd=pathlib.Path(__file__).parents[1])
    path = pathlib.Path(result.stdout.strip().splitlines()[-1])
    assert path == kernels.build() and path.exists()


def test_auto_falls_back_under_a_one_replica_mirrored_strategy(caplog):
    strategy = tf.distribute.MirroredStrategy(['/cpu:0'])
    with strategy.scope():
        model = model_lib.MatrixFactorization(USERS, ITEMS, FACTORS, 3.2, 0.1, seed=7)
        optimizer = optimizers.Adam(model.parameters(), 0.05)
    config = config_lib.make_config('work', l2=0.05, learning_rate_decay=1.0, batch_size=BATCH)
    penalty = model_lib.penalty_weights(FACTORS, 0.05, 0.01)
    with caplog.at_level(logging.WARNING, logger='trainer.rating.train'):
        epoch = train_lib.choose_train_epoch(config, strategy, model, optimizer, penalty,
                                             1.0, 5.0)
    assert 'not those of MirroredStrategy' in caplog.text
    user, item, rating = _ratings()
    totals = epoch(user, item, rating, None, None).numpy()  # the TensorFlow form trains
    assert totals[1] == 1000 and optimizer.iterations.numpy() == 16


def test_default_threads_stay_within_the_cpus_and_the_cap(monkeypatch):
    monkeypatch.setattr(kernels.os, 'sched_getaffinity', lambda pid: set(range(64)))
    assert kernels.default_threads() == kernels.MAX_THREADS
    monkeypatch.setattr(kernels.os, 'sched_getaffinity', lambda pid: {0})
    assert kernels.default_threads() == 1


def test_threads_loading_at_once_share_one_build(monkeypatch, tmp_path):
    # A second real library in this process would register the ops twice:
    # build and load are stand-ins that take a while and count their calls.
    monkeypatch.setattr(kernels, '_load_once', functools.cache(kernels._load_once.__wrapped__))
    builds, loads = [], []

    def slow_build():
        builds.append(1)
        time.sleep(0.5)
        return tmp_path / 'trainer_ops.so'
    monkeypatch.setattr(kernels, 'build', slow_build)
    monkeypatch.setattr(kernels.tf, 'load_op_library', lambda path: loads.append(path) or object())
    with futures.ThreadPoolExecutor(3) as pool:
        modules = list(pool.map(lambda _: kernels.load(), range(3)))
    assert len(builds) == len(loads) == 1 and all(module is modules[0] for module in modules)


def test_a_failed_build_is_not_tried_again_in_the_same_process(monkeypatch):
    monkeypatch.setattr(kernels, '_load_once', functools.cache(kernels._load_once.__wrapped__))
    builds = []

    def failing_build():
        builds.append(1)
        raise kernels.KernelUnavailable('building fused_epoch.cc failed: error: no')
    monkeypatch.setattr(kernels, 'build', failing_build)
    for _ in range(3):  # the two split loads and a training phase
        with pytest.raises(kernels.KernelUnavailable, match='building fused_epoch.cc failed'):
            kernels.load()
    assert len(builds) == 1
