"""The SavedModel: raw MovieLens ids in, predicted ratings out.

The exported `tf.Module` tracks both the trained model and the TFT transform
layer (`TFTransformOutput.transform_features_layer()`, a tf_keras layer that
carries the vocabulary files as assets), so the export needs nothing else at
serving time: `tf.saved_model.load(export_dir).signatures['serving_default']
(user_id=..., movie_id=...)['rating']`.  Ids outside the vocabularies map to
the OOV rows.  Only `user_id` and `movie_id` are fed: the transform layer
prunes the outputs it cannot compute without `rating` and `timestamp`.

The export is written to a sibling temp directory and renamed into place, so
a crash mid-export never leaves a half SavedModel at `export_dir`.
"""

from __future__ import annotations

import logging

import tensorflow as tf
import tensorflow_transform as tft

from trainer import features
from trainer.model import MatrixFactorization

logger = logging.getLogger(__name__)

SIGNATURE = tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY
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


def _remove_leftover(path: str, why: str) -> None:
    if tf.io.gfile.exists(path):
        logger.warning('Removing %s (%s)', path, why)
        tf.io.gfile.rmtree(path)


def export_saved_model(model: MatrixFactorization, tft_dir: str,
                       export_dir: str, rating_min: float,
                       rating_max: float) -> str:
    """Writes the serving SavedModel, replacing an earlier export atomically.

    Args:
      model: the trained model.
      tft_dir: the TFT output (transformed/) the model was trained on.
      export_dir: where the SavedModel goes (MODEL_DIR/export or AIP_MODEL_DIR).
      rating_min: the lowest rating served.
      rating_max: the highest rating served.

    Returns:
      export_dir, without a trailing slash.
    """
    export_dir = export_dir.rstrip('/')
    tmp_dir, old_dir = export_dir + _TMP_SUFFIX, export_dir + _OLD_SUFFIX
    _remove_leftover(tmp_dir, 'an unfinished earlier export')
    _remove_leftover(old_dir, 'an export an interrupted run was replacing')
    transform_layer = tft.TFTransformOutput(tft_dir).transform_features_layer()
    module = ServingModule(model, transform_layer, rating_min, rating_max)
    tf.saved_model.save(module, tmp_dir, signatures={SIGNATURE: module.serve})
    if tf.io.gfile.exists(export_dir):
        logger.info('Replacing the previous export in %s', export_dir)
        tf.io.gfile.rename(export_dir, old_dir)
    tf.io.gfile.rename(tmp_dir, export_dir)
    if tf.io.gfile.exists(old_dir):
        tf.io.gfile.rmtree(old_dir)
    logger.info('Exported the SavedModel to %s', export_dir)
    return export_dir
