"""Shared test fixtures: a temp work dir and a loader for the hyphenated scripts."""

from __future__ import annotations

import importlib.util
import json
import logging
import pathlib
import sys
from types import ModuleType

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def load_script(name: str) -> ModuleType:
    """Imports a top-level script such as 'data-extractor.py' as a module."""
    path = REPO / name
    module_name = path.stem.replace('-', '_')
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def eval_examples(work_dir: str) -> tuple[list[bytes], list[bytes], np.ndarray]:
    """The raw user ids, movie ids and ratings of WORK_DIR's transformed eval split."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from trainer import features  # pylint: disable=import-outside-toplevel
    info = features.read_dataset_info(work_dir)
    files = sorted(tf.io.gfile.glob(info.eval_pattern))
    users, movies, ratings = [], [], []
    for record in tf.data.TFRecordDataset(files, compression_type='GZIP'):
        example = tf.io.parse_single_example(record, features.TRANSFORMED_FEATURE_SPEC)
        users.append(example[features.USER_ID].numpy())
        movies.append(example[features.MOVIE_ID].numpy())
        ratings.append(example[features.RATING].numpy())
    return users, movies, np.asarray(ratings, np.float64)


def exported_eval_rmse(export_dir: str, work_dir: str, with_factors: bool = True) -> float:
    """The eval RMSE of the exported tables, computed by hand; with_factors=False
    scores the same model from its global mean and biases alone."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from trainer import data, features  # pylint: disable=import-outside-toplevel
    reader = tf.train.load_checkpoint(f'{export_dir}/variables/variables')
    def table(name: str) -> np.ndarray:
        return reader.get_tensor(f'model/{name}/.ATTRIBUTES/VARIABLE_VALUE')
    users, items = table('user_embedding'), table('item_embedding')
    info = features.read_dataset_info(work_dir)
    ratings = data.load_ratings(info.eval_pattern)
    user_rows, item_rows = users[ratings.user.numpy()], items[ratings.item.numpy()]
    prediction = table('global_mean') + user_rows[:, -1] + item_rows[:, -1]
    if with_factors:
        prediction += np.sum(user_rows[:, :-1] * item_rows[:, :-1], axis=1)
    error = np.clip(prediction, info.rating_min, info.rating_max) - ratings.rating.numpy()
    return float(np.sqrt(np.mean(error ** 2)))


def served_rmse(signature, work_dir: str) -> float:
    """The RMSE of a serving signature's ratings on WORK_DIR's eval split."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from trainer import features  # pylint: disable=import-outside-toplevel
    users, movies, ratings = eval_examples(work_dir)
    served = signature(user_id=tf.constant(users), movie_id=tf.constant(movies))
    return float(np.sqrt(np.mean((served[features.RATING].numpy() - ratings) ** 2)))


def strict_json(text: str):
    """Parses JSON as strict readers do: NaN and Infinity are errors."""
    def refuse(constant: str):
        raise ValueError(f'{constant} is not JSON')
    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def work_dir(tmp_path: pathlib.Path) -> str:
    """An empty work dir, as a string path."""
    path = tmp_path / 'work'
    path.mkdir()
    return str(path)


@pytest.fixture(scope='session')
def default_synthetic():
    """The default generated 100k (`synthetic.SyntheticConfig()`, seed 0), generated once
    for every test file that reads it (about 5 s); its arrays are read-only."""
    import dataclasses  # pylint: disable=import-outside-toplevel
    from trainer.pipeline import synthetic  # pylint: disable=import-outside-toplevel
    generated = synthetic.generate(synthetic.SyntheticConfig())
    for field in dataclasses.fields(generated):
        value = getattr(generated, field.name)
        if isinstance(value, np.ndarray):
            value.setflags(write=False)
    return generated


@pytest.fixture(scope='session')
def gcs():
    """A real GCS emulator on 127.0.0.1 with one bucket; see tests/gcs_emulator.py."""
    import gcs_emulator  # pylint: disable=import-outside-toplevel
    yield from gcs_emulator.gcs_emulator_fixture()


@pytest.fixture(autouse=True)
def drop_main_log_handlers():
    """A main() called in-process logs to that test's captured stderr; remove its
    handler afterwards so later tests do not log to a closed stream."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in before and not type(handler).__module__.startswith('_pytest'):
            root.removeHandler(handler)
    root.setLevel(level)
