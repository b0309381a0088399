"""The SavedModel: raw MovieLens ids in, predicted ratings and top-k movies out.

The exported `tf.Module` tracks both the trained model and the TFT transform
layer (`TFTransformOutput.transform_features_layer()`, a tf_keras layer that
carries the vocabulary files as assets), so the export needs nothing else at
serving time.  Ids outside the vocabularies map to the OOV rows.  Only raw
ids are fed: the transform layer prunes the outputs it cannot compute
without `rating` and `timestamp`.  Two signatures:

- `serving_default(user_id [N], movie_id [N]) -> {'rating' [N]}`: the
  predicted rating, clipped to the scale.
- `recommend(user_id [N], k []) -> {'movie_ids', 'titles', 'scores',
  'ratings' [N, k], 'fallback' [N]}` (exported when a `catalog.Catalog` is
  given): each user's k best-scored movies among those they did not rate in
  training, best first.  With a top-N model (`trainer.topn.lists`: iALS, EASE
  or a blend, chosen on validation) the list and `scores` are its scores
  (for iALS p_u . q_i; with a like term,
  `ranking.topn_scores`: log of it plus beta x the log of the rating
  model's P(rating >= 4)); without one, `scores` are
  unclipped predicted ratings (clipping would tie the top of the list at
  the scale's maximum).  `ratings` are the rating model's predictions for
  the listed movies, clipped to the scale as `serving_default` serves them.
  An unknown user gets `ranking.fallback_scores` (the learned movie bias
  shrunk by its train count) as scores and `fallback` True.  k is capped at the number of movies;
  a user with fewer than k unrated movies gets rows padded with movie id
  '', title '' and score 0.  The catalogue (ids, titles, train counts and
  every user's train movies as a ragged int32 tensor) is stored as
  variables, so it lands in the variables files, not the graph.

The export is written to a sibling temp directory and renamed into place, so
a crash mid-export never leaves a half SavedModel at `export_dir`.
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft

from trainer import features
from trainer.rating.model import MatrixFactorization
from trainer.topn import catalog as catalog_lib
from trainer.topn import lists as lists_lib
from trainer.topn import ranking

logger = logging.getLogger(__name__)

SIGNATURE = tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY
RECOMMEND_SIGNATURE = features.RECOMMEND_SIGNATURE
_TMP_SUFFIX = '.tmp'
_OLD_SUFFIX = '.old'


class ServingModule(tf.Module):
    """The model behind the transform graph, with a raw-id serving function."""

    def __init__(self, model: MatrixFactorization, transform_layer: tf.Module,
                 rating_min: float, rating_max: float) -> None:
        super().__init__(name='rating_server')
        self.model = model
        self.transform_layer = transform_layer
        self.rating_min = float(rating_min)
        self.rating_max = float(rating_max)

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.string, name=features.USER_ID),
        tf.TensorSpec([None], tf.string, name=features.MOVIE_ID)])
    def serve(self, user_id: tf.Tensor, movie_id: tf.Tensor) -> dict[str, tf.Tensor]:
        """{'rating': float32 [N]} for raw id strings, clipped to the scale."""
        transformed = self.transform_layer(
            {features.USER_ID: user_id, features.MOVIE_ID: movie_id})
        rating = self.model(transformed[features.USER], transformed[features.ITEM])
        return {features.RATING: tf.clip_by_value(
            rating, self.rating_min, self.rating_max)}


def _constant_variable(value: object, dtype: tf.DType, name: str) -> tf.Variable:
    return tf.Variable(tf.constant(value, dtype), trainable=False, name=name)


class RecommendingModule(ServingModule):
    """ServingModule plus the catalogue and a top-k `recommend` function."""

    def __init__(self, model: MatrixFactorization, transform_layer: tf.Module,
                 rating_min: float, rating_max: float,
                 catalog: catalog_lib.Catalog,
                 fallback_prior_ratings: float,
                 topn_factors: tuple[np.ndarray, np.ndarray] | None = None,
                 like: ranking.LikeTerm | None = None,
                 lists: lists_lib.ListModel | None = None) -> None:
        super().__init__(model, transform_layer, rating_min, rating_max)
        self.like = like
        rows = (catalog.num_users + features.NUM_OOV_BUCKETS,
                catalog.num_items + features.NUM_OOV_BUCKETS)
        if rows != (model.user_bias.shape[0], model.item_bias.shape[0]):
            raise ValueError(
                f'the catalogue has {catalog.num_users} users and {catalog.num_items} '
                f'movies, the model {model.user_bias.shape[0]} and '
                f'{model.item_bias.shape[0]} rows (with OOV): not the same vocabularies')
        self.num_users = catalog.num_users
        self.fallback_prior_ratings = float(fallback_prior_ratings)
        self.movie_ids = _constant_variable(
            [movie_id.encode('utf-8') for movie_id in catalog.movie_ids],
            tf.string, 'movie_ids')
        self.titles = _constant_variable(
            [title.encode('utf-8') for title in catalog.titles], tf.string, 'titles')
        self.item_counts = _constant_variable(catalog.item_counts, tf.int64,
                                              'item_counts')
        self.seen_items = _constant_variable(catalog.seen_items, tf.int32,
                                             'seen_items')
        self.seen_row_splits = _constant_variable(catalog.seen_row_splits,
                                                  tf.int64, 'seen_row_splits')
        if lists is None and topn_factors is not None:
            lists = lists_lib.ListModel('ials', *topn_factors)
        self.list_scorer = None
        if lists is not None:
            if lists.uses_ials and (lists.user_factors.shape[0],
                                    lists.item_factors.shape[0]) != rows:
                raise ValueError(
                    f'the top-N model has {lists.user_factors.shape[0]} user and '
                    f'{lists.item_factors.shape[0]} movie rows, the catalogue {rows}: '
                    'not the same vocabularies')
            if lists.uses_ease and (lists.neighbours.index.shape[0] != catalog.num_items
                                    or lists.seen_values.size != catalog.seen_items.size):
                raise ValueError(
                    f'the EASE model has {lists.neighbours.index.shape[0]} movies and '
                    f'{lists.seen_values.size} train pairs, the catalogue '
                    f'{catalog.num_items} and {catalog.seen_items.size}: not the same data')
            self.list_scorer = lists_lib.ListScorer(lists, catalog.seen_row_splits,
                                                    as_variables=True)

    def _list_scores(self, user: tf.Tensor, num_items: tf.Tensor,
                     seen: tf.RaggedTensor) -> tf.Tensor:
        """What the list is ranked by: the top-N model's scores, else predicted ratings."""
        if self.list_scorer is None:
            return ranking.score_items(self.model, user, num_items)
        return self.list_scorer(user, num_items, seen, self.model, self.like)

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.string, name=features.USER_ID),
        tf.TensorSpec([], tf.int32, name=features.RECOMMEND_K)])
    def recommend(self, user_id: tf.Tensor, k: tf.Tensor) -> dict[str, tf.Tensor]:
        """The k best unrated movies per raw user id; see the module doc."""
        tf.debugging.assert_positive(k, message='k must be >= 1')
        user = self.transform_layer({features.USER_ID: user_id})[features.USER]
        num_items = tf.size(self.movie_ids)
        fallback = user >= self.num_users
        seen = tf.RaggedTensor.from_row_splits(
            self.seen_items, self.seen_row_splits, validate=False)
        scores = tf.where(
            fallback[:, None],
            ranking.fallback_scores(self.model, self.item_counts,
                                    self.fallback_prior_ratings)[None, :],
            self._list_scores(user, num_items, seen))
        values, indices, valid = ranking.top_k_unseen(
            scores, tf.gather(seen, user), tf.minimum(k, num_items))
        listed_users = tf.broadcast_to(user[:, None], tf.shape(indices))
        ratings = tf.reshape(tf.clip_by_value(
            self.model(tf.reshape(listed_users, [-1]),
                       tf.reshape(tf.cast(indices, tf.int64), [-1])),
            self.rating_min, self.rating_max), tf.shape(indices))
        return {
            features.MOVIE_IDS: tf.where(valid, tf.gather(self.movie_ids, indices), ''),
            features.TITLES: tf.where(valid, tf.gather(self.titles, indices), ''),
            features.SCORES: tf.where(valid, values, 0.0),
            features.PREDICTED_RATINGS: tf.where(valid, ratings, 0.0),
            features.FALLBACK: fallback,
        }


def _remove_leftover(path: str, why: str) -> None:
    if tf.io.gfile.exists(path):
        logger.warning('Removing %s (%s)', path, why)
        tf.io.gfile.rmtree(path)


def export_saved_model(
        model: MatrixFactorization, tft_dir: str, export_dir: str,
        rating_min: float, rating_max: float,
        catalog: catalog_lib.Catalog | None = None,
        fallback_prior_ratings: float = ranking.FALLBACK_PRIOR_RATINGS,
        topn_factors: tuple[np.ndarray, np.ndarray] | None = None,
        like: ranking.LikeTerm | None = None,
        lists: lists_lib.ListModel | None = None) -> str:
    """Writes the serving SavedModel, replacing an earlier export atomically.

    Args:
      model: the trained model.
      tft_dir: the TFT output (transformed/) the model was trained on.
      export_dir: where the SavedModel goes (MODEL_DIR/export or AIP_MODEL_DIR).
      rating_min: the lowest rating served.
      rating_max: the highest rating served.
      catalog: movie ids, titles and train pairs in the vocabularies of
        tft_dir; with it the export also has the `recommend` signature,
        without it only `serving_default`.
      fallback_prior_ratings: the shrinkage of the unknown-user ranking
        (`ranking.fallback_scores`).
      topn_factors: the top-N model's (user, movie) factors, rows as the
        rating model's; `recommend` then serves its lists (needs catalog).
      like: with topn_factors, the rating model's part in their scores
        (`ranking.topn_scores`); None: p_u . q_i alone.
      lists: the served top-N model (`lists.ListModel`: iALS, EASE or a
        blend), in place of topn_factors.

    Returns:
      export_dir, without a trailing slash.
    """
    export_dir = export_dir.rstrip('/')
    tmp_dir, old_dir = export_dir + _TMP_SUFFIX, export_dir + _OLD_SUFFIX
    _remove_leftover(tmp_dir, 'an unfinished earlier export')
    _remove_leftover(old_dir, 'an export an interrupted run was replacing')
    transform_layer = tft.TFTransformOutput(tft_dir).transform_features_layer()
    if catalog is None:
        module = ServingModule(model, transform_layer, rating_min, rating_max)
        signatures = {SIGNATURE: module.serve}
    else:
        module = RecommendingModule(model, transform_layer, rating_min, rating_max,
                                    catalog, fallback_prior_ratings, topn_factors, like,
                                    lists)
        signatures = {SIGNATURE: module.serve, RECOMMEND_SIGNATURE: module.recommend}
    tf.saved_model.save(module, tmp_dir, signatures=signatures)
    if tf.io.gfile.exists(export_dir):
        logger.info('Replacing the previous export in %s', export_dir)
        tf.io.gfile.rename(export_dir, old_dir)
    tf.io.gfile.rename(tmp_dir, export_dir)
    if tf.io.gfile.exists(old_dir):
        tf.io.gfile.rmtree(old_dir)
    logger.info('Exported the SavedModel (%s) to %s', ', '.join(signatures),
                export_dir)
    return export_dir
