"""Tests of trainer/export.py: a SavedModel that serves raw ids on its own."""

from __future__ import annotations

import os
import shutil

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from apache_beam.options.pipeline_options import PipelineOptions
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

import preprocess
from trainer import export, features
from trainer.model import MatrixFactorization

RAW_ROWS = [(user, movie, rating) for user, movie, rating in [
    ('u1', 'm1', 5.0), ('u1', 'm2', 3.0), ('u1', 'm3', 4.0), ('u2', 'm1', 4.0),
    ('u2', 'm3', 2.0), ('u3', 'm2', 1.0), ('u3', 'm1', 5.0), ('u4', 'm3', 3.0)]]


@pytest.fixture(scope='module')
def tft_dir(tmp_path_factory) -> str:
    """A TFT output of preprocess.preprocessing_fn analysed on RAW_ROWS."""
    out_dir = str(tmp_path_factory.mktemp('transformed'))
    metadata = dataset_metadata.DatasetMetadata(
        schema_utils.schema_from_feature_spec(features.RAW_FEATURE_SPEC))
    raw = [{features.USER_ID: user, features.MOVIE_ID: movie,
            features.RATING: rating, features.TIMESTAMP: 0}
           for user, movie, rating in RAW_ROWS]
    options = PipelineOptions(['--runner=FnApiRunner'])
    with beam.Pipeline(options=options) as pipeline:
        with tft_beam.Context(temp_dir=os.path.join(out_dir, 'tmp')):
            transform_fn = ((pipeline | beam.Create(raw), metadata)
                            | tft_beam.AnalyzeDataset(preprocess.preprocessing_fn))
            _ = transform_fn | tft_beam.WriteTransformFn(out_dir)
    return out_dir


def _indices(tft_output: tft.TFTransformOutput, vocab: str,
             ids: list[str]) -> tf.Tensor:
    """What the transform should give: the vocabulary position, or OOV."""
    words = [word.decode() if isinstance(word, bytes) else word
             for word in tft_output.vocabulary_by_name(vocab)]
    return tf.constant([words.index(i) if i in words else len(words) for i in ids],
                       tf.int64)


@pytest.fixture
def model(tft_dir) -> MatrixFactorization:
    """Random factors; biases large enough that some predictions leave [1, 5]."""
    tft_output = tft.TFTransformOutput(tft_dir)
    users = tft_output.vocabulary_size_by_name(features.USER_VOCAB)
    movies = tft_output.vocabulary_size_by_name(features.MOVIE_VOCAB)
    mf = MatrixFactorization(users, movies, num_factors=3, global_mean=3.0,
                             init_stddev=0.5, seed=7)
    u1 = int(_indices(tft_output, features.USER_VOCAB, ['u1'])[0])
    u3 = int(_indices(tft_output, features.USER_VOCAB, ['u3'])[0])
    mf.user_bias.scatter_update(tf.IndexedSlices(tf.constant([3.0, -3.0]),
                                                 tf.constant([u1, u3])))
    mf.item_bias.assign(tf.range(movies + features.NUM_OOV_BUCKETS, dtype=tf.float32) * 0.1)
    return mf


def test_reloaded_export_serves_raw_ids_without_the_tft_dir(tft_dir, model, tmp_path):
    tft_copy = str(tmp_path / 'transformed')
    shutil.copytree(tft_dir, tft_copy)
    export_dir = export.export_saved_model(
        model, tft_copy, str(tmp_path / 'export') + '/', rating_min=1.0,
        rating_max=5.0)
    assert export_dir == str(tmp_path / 'export')
    shutil.rmtree(tft_copy)  # the vocabularies must travel inside the export

    users = ['u1', 'u2', 'u3', 'u4', 'stranger', 'u2', 'stranger']
    movies = ['m1', 'm2', 'm3', 'm1', 'm2', 'unseen', 'unseen']
    served = tf.saved_model.load(export_dir).signatures[export.SIGNATURE](
        user_id=tf.constant(users), movie_id=tf.constant(movies))
    assert set(served) == {features.RATING}

    tft_output = tft.TFTransformOutput(tft_dir)
    user = _indices(tft_output, features.USER_VOCAB, users)
    item = _indices(tft_output, features.MOVIE_VOCAB, movies)
    assert int(user[4]) == model.user_bias.shape[0] - 1  # the OOV row
    raw = model(user, item).numpy()
    assert raw.max() > 5.0 and raw.min() < 1.0  # so clipping is exercised
    np.testing.assert_allclose(served[features.RATING].numpy(),
                               np.clip(raw, 1.0, 5.0), rtol=1e-6)
    # An unknown user on an unknown movie gets the mean plus the OOV biases.
    assert served[features.RATING].numpy()[-1] == pytest.approx(
        3.0 + float(model.item_bias[-1]), rel=1e-6)


def test_export_replaces_an_earlier_one_and_leaves_no_temp_dirs(tft_dir, model, tmp_path):
    export_dir = str(tmp_path / 'export')
    os.makedirs(export_dir + '.tmp')  # what a crashed export would leave
    export.export_saved_model(model, tft_dir, export_dir, 1.0, 5.0)
    model.global_mean.assign(2.0)
    export.export_saved_model(model, tft_dir, export_dir, 1.0, 5.0)
    assert sorted(os.listdir(tmp_path)) == ['export']
    served = tf.saved_model.load(export_dir).signatures[export.SIGNATURE](
        user_id=tf.constant(['stranger']), movie_id=tf.constant(['unseen']))
    assert served[features.RATING].numpy()[0] == pytest.approx(
        2.0 + float(model.item_bias[-1]), rel=1e-6)
