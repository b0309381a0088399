"""Input: the transformed TFRecord shards, as in-memory rating columns.

The trainer reads each split once (`load_ratings`, run beside the shards'
gzip check by `load_checked`) into three columns (int32 user and item
indices, float32 ratings): 12 bytes a rating, 300 MB for 25M ratings,
sorted by (user, item) so that row positions depend on the ratings alone.
Each shard is read by the C++ op `ReadRatingShard` (`read_ratings.cc`, built
with the fused epoch by `trainer.ops.kernels`), which decodes only the keys the
model reads: 8.5 s for a 20M-rating shard, where `tf.data` with
`tf.io.parse_example` in batches of 65536, the fallback where the op cannot
be built, takes about 25 s (about 1 us a record of iteration).
Every epoch then takes a seeded permutation of those columns (`shuffle`, seed
derived from the run seed and the epoch number, so epoch k sees the same
order whether the run started fresh or resumed), and the training loop slices
batches from it inside one `tf.function`: no per-batch input pipeline, no
parsing after the first read.  `split_validation` carves the validation
slice from the train split by a seeded permutation of row positions.  The
evaluations after training (ranking, eval predictions) use the same copies.

Broken input is named, never trained on: `list_shards` refuses an empty
shard file or a gap in a -SSSSS-of-NNNNN shard set, `check_shards` refuses a
shard that is not one complete gzip stream (truncated or corrupt), and after
a read error (which `tf.data` reports without a file name)
`find_unreadable_shard` reads each shard on its own to say which one fails.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from concurrent import futures

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft

from trainer import features
from trainer.ops import kernels

# The keys the model reads; the raw ids stay unparsed (the export maps them itself).
MODEL_KEYS = (features.USER, features.ITEM, features.RATING)
MODEL_FEATURE_SPEC = {key: features.TRANSFORMED_FEATURE_SPEC[key]
                      for key in MODEL_KEYS}


class ShardError(Exception):
    """A TFRecord shard is missing, empty or unreadable; the message names it."""


# Beam names shards PREFIX-00003-of-00008.tfrecord.gz.
_SHARD_NAME = re.compile(r'(.*)-(\d{5})-of-(\d{5})' + re.escape(features.TFRECORD_SUFFIX))
_REDO = 're-run preprocess.py with --overwrite'
# Examples per batch when a shard is read on its own to check it.
_CHECK_BATCH = 65536
# zlib window bits that accept the gzip wrapper, and bytes read at a time.
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_READ_BYTES = 1 << 20


def list_shards(file_pattern: str) -> list[str]:
    """The files matching a pattern, sorted so the read order is reproducible.

    Raises:
      FileNotFoundError: if nothing matches.
      ShardError: a shard of the set (-SSSSS-of-NNNNN) is missing or a file
        is empty (every finished gzip shard holds at least its header).
    """
    files = sorted(tf.io.gfile.glob(file_pattern))
    if not files:
        raise FileNotFoundError(
            f'no TFRecord shards match {file_pattern!r}; run preprocess.py first')
    for path in files:
        if tf.io.gfile.stat(path).length == 0:
            raise ShardError(f'{path} is empty (a cut-off write?); {_REDO}')
    names = [_SHARD_NAME.fullmatch(path) for path in files]
    if all(names):
        prefix, _, total = names[0].groups()
        expected = [f'{prefix}-{index:05d}-of-{total}{features.TFRECORD_SUFFIX}'
                    for index in range(int(total))]
        missing = sorted(set(expected) - set(files)) or sorted(set(files) - set(expected))
        if missing:
            raise ShardError(f'{missing[0]} is missing or from another run: {file_pattern} '
                             f'matches {len(files)} files, not the {total} of one '
                             f'output; {_REDO}')
    return files


def check_shards(file_patterns: tuple[str, ...]) -> None:
    """Checks, before training, that every shard is one complete gzip stream.

    `tf.data` reads a gzip shard cut short without an error whenever the cut
    falls on a record boundary (about one cut in eight), so a truncated
    shard would silently train on part of the data; the gzip trailer (CRC
    and length) catches every cut.  Costs one decompression pass, about
    0.4 s per million ratings.

    Raises:
      FileNotFoundError: a pattern matches nothing.
      ShardError: naming the first shard that is missing, empty, truncated
        or corrupt.
    """
    for pattern in file_patterns:
        for path in list_shards(pattern):
            problem = _gzip_problem(path)
            if problem:
                raise ShardError(f'{path} is {problem}; {_REDO}')


def _gzip_problem(path: str) -> str | None:
    """What is wrong with a gzip file (decompressed and discarded), or None."""
    decompressor = zlib.decompressobj(wbits=_GZIP_WBITS)
    with tf.io.gfile.GFile(path, 'rb') as f:
        try:
            while chunk := f.read(_READ_BYTES):
                while chunk:  # bytes after a gzip member start another member
                    if decompressor.eof:
                        decompressor = zlib.decompressobj(wbits=_GZIP_WBITS)
                    decompressor.decompress(chunk)
                    chunk = decompressor.unused_data if decompressor.eof else b''
        except zlib.error as error:
            return f'corrupt (gzip: {error})'
    return None if decompressor.eof else 'truncated (the gzip stream stops early)'


def find_unreadable_shard(file_patterns: tuple[str, ...]) -> ShardError | None:
    """Reads every shard on its own; the first that fails, as a ShardError.

    Called after a read error, which `tf.data` reports without the file
    name; costs one pass over the data.
    """
    for pattern in file_patterns:
        for path in list_shards(pattern):
            try:
                tf.data.TFRecordDataset(path, compression_type='GZIP').batch(
                    _CHECK_BATCH).map(parse_batch).reduce(
                        np.int64(0), _count_batch)
            except tf.errors.OpError as error:
                return ShardError(f'{path} cannot be read ({_first_line(error)}); {_REDO}')
    return None


@tf.autograph.experimental.do_not_convert
def _count_batch(count: tf.Tensor, batch: dict[str, tf.Tensor]) -> tf.Tensor:
    return count + tf.size(batch[features.RATING], out_type=tf.int64)


def _first_line(error: tf.errors.OpError) -> str:
    """The gist of a TF error: no function-node prefix, no op suffix."""
    message = re.sub(r'\{\{[^}]*\}\}\s*', '', error.message).split('\n')[0]
    return message.split(' [Op:')[0].strip()


@dataclasses.dataclass(frozen=True)
class Ratings:
    """One split in memory, in (user, item) order or shuffled; columns of equal length.

    Attributes:
      user: int32 [N] user vocabulary indices.
      item: int32 [N] item vocabulary indices.
      rating: float32 [N].
    """
    user: tf.Tensor
    item: tf.Tensor
    rating: tf.Tensor

    def __len__(self) -> int:
        return int(self.rating.shape[0])

    def take(self, positions: tf.Tensor) -> 'Ratings':
        """The rows at positions, in that order."""
        return Ratings(*(tf.gather(column, positions) for column in
                         (self.user, self.item, self.rating)))


# Examples parsed per call when a split is loaded, and shards read at once.
_LOAD_BATCH = 65536
_PARALLEL_SHARDS = 4
# Seeds the validation slice's permutation apart from the epochs' shuffles.
_VALIDATION_STREAM = 0x7A11D
# ... and the per-epoch eval sample apart from both.
_SAMPLE_STREAM = 0x5A3B1


def load_ratings(file_pattern: str) -> Ratings:
    """Every rating of the shards matching file_pattern, sorted by (user, item).

    Shards are read and parsed in parallel (decompression is one thread per
    file).  The rows are then put in one canonical order, by user and item
    index (a pair occurs once per split), so everything keyed by row position
    (the validation slice, each epoch's permutation) depends on the ratings
    alone, not on how a runner sharded or ordered the preprocessing output:
    Dataflow may write the same examples in another order on every run.

    Raises:
      FileNotFoundError: if nothing matches.
      ShardError: if a shard is missing or empty (see `list_shards`).
    """
    files = list_shards(file_pattern)
    try:
        parts = _read_with_op(kernels.load(), files)
    except kernels.KernelUnavailable:  # the trainer says why when it picks its epoch
        parts = _read_with_tf_data(files)
    user, item, rating = (tf.concat(column or [tf.zeros([0], dtype)], axis=0)
                          for column, dtype in zip(parts, (tf.int32, tf.int32, tf.float32)))
    ratings = Ratings(user, item, rating)
    return ratings.take(canonical_order(ratings.user.numpy(), ratings.item.numpy()))


# Column parts in file order: [user parts], [item parts], [rating parts].
_Parts = tuple[list[tf.Tensor], list[tf.Tensor], list[tf.Tensor]]


def _read_with_op(ops, files: list[str]) -> _Parts:
    """Each shard by the `ReadRatingShard` op, shards in parallel threads."""
    with futures.ThreadPoolExecutor(_PARALLEL_SHARDS) as pool:
        shards = list(pool.map(ops.read_rating_shard, files))
    return tuple([shard[column] for shard in shards] for column in range(3))


def _read_with_tf_data(files: list[str]) -> _Parts:
    """Each shard by `tf.data` in batches parsed by `tf.io.parse_example`."""
    def read_shard(index: tf.Tensor, path: tf.Tensor) -> tf.data.Dataset:
        return (tf.data.TFRecordDataset(path, compression_type='GZIP')
                .batch(_LOAD_BATCH)
                .map(lambda serialized: (index, parse_batch(serialized))))

    batches = (tf.data.Dataset.from_tensor_slices((tf.range(len(files)), files))
               .interleave(read_shard, cycle_length=_PARALLEL_SHARDS,
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .prefetch(tf.data.AUTOTUNE))
    by_shard = [[] for _ in files]
    for index, batch in batches:  # interleaved: put each batch back with its shard
        by_shard[int(index)].append(batch)
    dtypes = (tf.int32, tf.int32, tf.float32)
    return tuple([tf.cast(batch[key], dtype) for shard in by_shard for batch in shard]
                 for key, dtype in zip(MODEL_KEYS, dtypes))


def load_checked(file_patterns: tuple[str, ...]) -> list[Ratings]:
    """`load_ratings` of each pattern, with `check_shards` of all of them alongside.

    The check and the loads run in threads (zlib and `tf.data` work outside
    the GIL), so on two cores the check costs no wall time and a small split
    loads beside a large one.  A broken shard is reported by the check, as a
    ShardError naming it, before any read error of a load.

    Raises:
      FileNotFoundError: a pattern matches nothing.
      ShardError: a shard is missing, empty, truncated or corrupt.
    """
    with futures.ThreadPoolExecutor(len(file_patterns) + 1) as pool:
        check = pool.submit(check_shards, file_patterns)
        loads = [pool.submit(load_ratings, pattern) for pattern in file_patterns]
        check.result()
        return [load.result() for load in loads]


def canonical_order(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Positions that sort rows by (user, item); about 2 s for 25M rows."""
    keys = users.astype(np.int64) * (int(items.max(initial=0)) + 1) + items
    return np.argsort(keys, kind='stable').astype(np.int32)


def _permutation(size: int, seed: tuple[int, int]) -> tf.Tensor:
    return tf.random.experimental.stateless_shuffle(
        tf.range(size, dtype=tf.int32), seed=seed)


def shuffle(ratings: Ratings, seed: int) -> Ratings:
    """The rows in a seeded uniform random order (the same on every worker)."""
    return ratings.take(_permutation(len(ratings), (seed, 0)))


def split_validation(ratings: Ratings, percent: float,
                     seed: int) -> tuple[Ratings, Ratings]:
    """(fit, validation): round(percent% of rows) chosen by a seeded permutation.

    Both parts keep the input's order.  The choice depends only on the row
    count, the percent and the seed (and, through `load_ratings`' canonical
    order, on which ratings there are), so every worker, every resumed run
    and every re-run of preprocessing carves the same slice.

    Raises:
      ValueError: if percent is outside [0, 100).
    """
    if not 0 <= percent < 100:
        raise ValueError(f'validation percent must be in [0, 100), got {percent!r}')
    size = len(ratings)
    count = int(round(size * percent / 100))
    chosen = _permutation(size, (seed, _VALIDATION_STREAM))
    return (ratings.take(tf.sort(chosen[count:])),
            ratings.take(tf.sort(chosen[:count])))


def sample(ratings: Ratings, max_ratings: int, seed: int, stream: int = 0) -> Ratings:
    """A seeded uniform sample of at most max_ratings rows, in the input's order.

    All rows when there are no more than max_ratings, or max_ratings is 0.
    The choice depends only on the row count, max_ratings, the seed and the
    stream (one per split sampled), as `split_validation`'s does.
    """
    size = len(ratings)
    if max_ratings <= 0 or size <= max_ratings:
        return ratings
    chosen = _permutation(size, (seed, _SAMPLE_STREAM + stream))
    return ratings.take(tf.sort(chosen[:max_ratings]))


def frequency_weights(ratings: Ratings, user_rows: int, item_rows: int,
                      exponent: float) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-row penalty weights n^-exponent (n = the row's ratings, at least 1).

    Scaled so that their mean over the ratings' rows is 1, on each side: the
    L2 strength keeps its meaning whatever the exponent.  exponent 0 gives
    ones.

    Returns:
      (user weights [user_rows], item weights [item_rows]), float32.
    """
    def side(indices: tf.Tensor, rows: int) -> tf.Tensor:
        counts = tf.math.bincount(indices, minlength=rows, maxlength=rows,
                                  dtype=tf.float32)
        weights = tf.pow(tf.maximum(counts, 1.0), -exponent)
        mean = tf.reduce_sum(counts * weights) / tf.maximum(tf.reduce_sum(counts), 1.0)
        return weights / tf.where(mean > 0, mean, 1.0)

    return side(ratings.user, user_rows), side(ratings.item, item_rows)


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed shuffle seed for one epoch (1-based) of a run seeded `seed`."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def parse_batch(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses a vector of serialised examples into user, item, rating vectors."""
    return tf.io.parse_example(serialized, MODEL_FEATURE_SPEC)


def read_vocabulary_sizes(tft_dir: str) -> tuple[int, int]:
    """(users, movies) in the TFT vocabularies, OOV buckets excluded."""
    tft_output = tft.TFTransformOutput(tft_dir)
    return (tft_output.vocabulary_size_by_name(features.USER_VOCAB),
            tft_output.vocabulary_size_by_name(features.MOVIE_VOCAB))
