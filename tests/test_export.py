"""Tests of trainer/serving/export.py: a SavedModel that serves raw ids on its own."""

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

from trainer import features
from trainer.pipeline import examples
from trainer.rating.model import MatrixFactorization
from trainer.serving import export
from trainer.topn import catalog

RAW_ROWS = [(user, movie, rating) for user, movie, rating in [
    ('u1', 'm1', 5.0), ('u1', 'm2', 3.0), ('u1', 'm3', 4.0), ('u2', 'm1', 4.0),
    ('u2', 'm3', 2.0), ('u3', 'm2', 1.0), ('u3', 'm1', 5.0), ('u4', 'm3', 3.0)]]


@pytest.fixture(scope='module')
def tft_dir(tmp_path_factory) -> str:
    """A TFT output of examples.preprocessing_fn analysed on RAW_ROWS."""
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
                            | tft_beam.AnalyzeDataset(examples.preprocessing_fn))
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
    user_bias = np.zeros(users + features.NUM_OOV_BUCKETS, np.float32)
    user_bias[[u1, u3]] = [3.0, -3.0]
    mf.set_weights(user_bias=user_bias, item_bias=np.arange(
        movies + features.NUM_OOV_BUCKETS, dtype=np.float32) * 0.1)
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


TITLES = {'m1': 'Amélie (2001)', 'm2': 'Léon (1994)'}  # m3 has none: shown by id


def _train_catalog(tft_dir: str) -> catalog.Catalog:
    """Every RAW_ROWS rating as a train pair; titles in TITLES."""
    tft_output = tft.TFTransformOutput(tft_dir)
    movie_ids = [word.decode() for word in tft_output.vocabulary_by_name(features.MOVIE_VOCAB)]
    users = _indices(tft_output, features.USER_VOCAB, [row[0] for row in RAW_ROWS])
    items = _indices(tft_output, features.MOVIE_VOCAB, [row[1] for row in RAW_ROWS])
    return catalog.build_catalog(
        movie_ids, TITLES, tft_output.vocabulary_size_by_name(features.USER_VOCAB),
        users.numpy(), items.numpy())


def test_the_export_alone_recommends_unrated_movies_and_falls_back(tft_dir, model, tmp_path):
    tft_copy = str(tmp_path / 'work' / 'transformed')
    shutil.copytree(tft_dir, tft_copy)
    movies = _train_catalog(tft_copy)
    export_dir = export.export_saved_model(model, tft_copy, str(tmp_path / 'work' / 'export'),
                                           1.0, 5.0, catalog=movies)
    served_dir = str(tmp_path / 'elsewhere')
    shutil.copytree(export_dir, served_dir)
    shutil.rmtree(tmp_path / 'work')  # the TFT dir and the original export

    loaded = tf.saved_model.load(served_dir)
    assert set(loaded.signatures) == {export.SIGNATURE, export.RECOMMEND_SIGNATURE}
    rating = loaded.signatures[export.SIGNATURE](
        user_id=tf.constant(['u4']), movie_id=tf.constant(['m1']))[features.RATING]
    tft_output = tft.TFTransformOutput(tft_dir)
    user = _indices(tft_output, features.USER_VOCAB, ['u4', 'u2'])
    item = _indices(tft_output, features.MOVIE_VOCAB, ['m1', 'm2'])
    np.testing.assert_allclose(rating.numpy(), np.clip(model(user[:1], item[:1]).numpy(), 1, 5),
                               rtol=1e-6)

    out = loaded.signatures[export.RECOMMEND_SIGNATURE](
        user_id=tf.constant(['u4', 'u2', 'u1', 'stranger']), k=tf.constant(2))
    ids = out[features.MOVIE_IDS].numpy().astype(str).tolist()
    scores = out[features.SCORES].numpy()
    # u4 rated only m3: m1 and m2 remain, ordered by the model's score.
    u4 = model(tf.repeat(user[:1], 2), item).numpy()
    assert ids[0] == (['m1', 'm2'] if u4[0] > u4[1] else ['m2', 'm1'])
    np.testing.assert_allclose(scores[0], np.sort(u4)[::-1], rtol=1e-6)  # unclipped
    # u2 rated m1 and m3: one movie, then padding; u1 rated all three.
    assert ids[1] == ['m2', ''] and ids[2] == ['', '']
    assert scores[1][0] == pytest.approx(float(model(user[1:], item[1:])[0]), rel=1e-6)
    assert scores[1][1] == 0.0 and scores[2].tolist() == [0.0, 0.0]
    # A stranger gets mu + b_i * n / (n + 10): m1 (3 ratings) and m3 (3) beat m2 (2).
    counts = dict(zip(movies.movie_ids, movies.item_counts))
    bias = dict(zip(movies.movie_ids, model.item_bias.numpy()))
    fallback = {m: 3.0 + bias[m] * counts[m] / (counts[m] + 10.0) for m in counts}
    assert ids[3] == sorted(fallback, key=fallback.get, reverse=True)[:2]
    np.testing.assert_allclose(scores[3], sorted(fallback.values(), reverse=True)[:2], rtol=1e-6)
    assert out[features.FALLBACK].numpy().tolist() == [False, False, False, True]
    titles = dict(zip(sum(ids, []), sum(out[features.TITLES].numpy().tolist(), [])))
    assert titles['m1'].decode() == 'Amélie (2001)'  # latin-1 letters survive
    assert titles['m2'].decode() == 'Léon (1994)'


def test_recommend_caps_k_at_the_catalogue_and_refuses_k_below_one(tft_dir, model, tmp_path):
    export_dir = export.export_saved_model(model, tft_dir, str(tmp_path / 'export'), 1.0, 5.0,
                                           catalog=_train_catalog(tft_dir))
    recommend = tf.saved_model.load(export_dir).signatures[export.RECOMMEND_SIGNATURE]
    out = recommend(user_id=tf.constant(['stranger', 'u4']), k=tf.constant(50))
    assert out[features.MOVIE_IDS].shape == (2, 3)
    assert sorted(out[features.TITLES].numpy()[0].astype(bytes).tolist()) == sorted(
        [b'm3', 'Amélie (2001)'.encode(), 'Léon (1994)'.encode()])
    with pytest.raises(tf.errors.InvalidArgumentError, match='k must be >= 1'):
        recommend(user_id=tf.constant(['u4']), k=tf.constant(0))


def test_a_catalogue_of_other_vocabularies_is_refused(tft_dir, model, tmp_path):
    wrong = catalog.build_catalog(['m1', 'm2'], {}, 4, np.array([0]), np.array([1]))
    with pytest.raises(ValueError, match='not the same vocabularies'):
        export.export_saved_model(model, tft_dir, str(tmp_path / 'export'), 1.0, 5.0,
                                  catalog=wrong)
    assert not os.path.exists(tmp_path / 'export')
