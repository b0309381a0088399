"""`tf.data` input: the transformed TFRecord shards as batches of user, item, rating.

Records are read once from the sorted shard list and cached (as serialised
examples); each training epoch shuffles them with a seed derived from the run
seed and the epoch number, so epoch k sees the same order whether the run
started fresh or resumed from a checkpoint.  Batches are parsed with one
`tf.io.parse_example` call each (batch, then parse), keeping only the keys
the model reads.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft

from trainer import features

# The keys the model reads; the raw ids stay unparsed (the export maps them itself).
MODEL_KEYS = (features.USER, features.ITEM, features.RATING)
MODEL_FEATURE_SPEC = {key: features.TRANSFORMED_FEATURE_SPEC[key]
                      for key in MODEL_KEYS}


def list_shards(file_pattern: str) -> list[str]:
    """The files matching a pattern, sorted so the read order is reproducible.

    Raises:
      FileNotFoundError: if nothing matches.
    """
    files = sorted(tf.io.gfile.glob(file_pattern))
    if not files:
        raise FileNotFoundError(
            f'no TFRecord shards match {file_pattern!r}; run preprocess.py first')
    return files


def read_records(file_pattern: str) -> tf.data.Dataset:
    """Serialised examples of every shard, in file order, cached in memory."""
    return tf.data.TFRecordDataset(
        list_shards(file_pattern), compression_type='GZIP').cache()


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed shuffle seed for one epoch (1-based) of a run seeded `seed`."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def parse_batch(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses a vector of serialised examples into user, item, rating vectors."""
    return tf.io.parse_example(serialized, MODEL_FEATURE_SPEC)


def make_batches(records: tf.data.Dataset, batch_size: int,
                 shuffle_seed: int | None = None,
                 shuffle_buffer: int = 0) -> tf.data.Dataset:
    """Batches of parsed features from `read_records` output.

    Args:
      records: serialised examples.
      batch_size: examples per batch; the last batch may be smaller.
      shuffle_seed: None to keep file order, else the seed of this pass's shuffle.
      shuffle_buffer: the shuffle buffer in examples (used with a seed).

    Returns:
      A dataset of {user: int64 [B], item: int64 [B], rating: float32 [B]}.

    Raises:
      ValueError: if a size is not positive.
    """
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size!r}')
    if shuffle_seed is not None:
        if shuffle_buffer < 1:
            raise ValueError(
                f'shuffle_buffer must be >= 1, got {shuffle_buffer!r}')
        records = records.shuffle(shuffle_buffer, seed=shuffle_seed,
                                  reshuffle_each_iteration=False)
    # Workers of a multi-worker strategy shard by element, not by file: the
    # splits are often one shard each, and every worker shuffles with the
    # same seed, so their element-wise shards are disjoint.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return (records.batch(batch_size)
            .map(parse_batch, num_parallel_calls=tf.data.AUTOTUNE,
                 deterministic=True)
            .prefetch(tf.data.AUTOTUNE)
            .with_options(options))


def make_dataset(file_pattern: str, batch_size: int,
                 shuffle_seed: int | None = None,
                 shuffle_buffer: int = 0) -> tf.data.Dataset:
    """`make_batches(read_records(file_pattern), ...)`, for one-off use."""
    return make_batches(read_records(file_pattern), batch_size,
                        shuffle_seed=shuffle_seed, shuffle_buffer=shuffle_buffer)


def read_vocabulary_sizes(tft_dir: str) -> tuple[int, int]:
    """(users, movies) in the TFT vocabularies, OOV buckets excluded."""
    tft_output = tft.TFTransformOutput(tft_dir)
    return (tft_output.vocabulary_size_by_name(features.USER_VOCAB),
            tft_output.vocabulary_size_by_name(features.MOVIE_VOCAB))
