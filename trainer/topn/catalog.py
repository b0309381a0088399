"""What a recommendation can name: movie ids and titles, and who rated what in training.

Owns reading the staged movie-title file (`features.DatasetLayout` says its
name, separator and encoding) and the train split's (user, item) pairs, and
packing both in a `Catalog`, in the order of the TFT vocabularies:

- `movie_ids[i]` and `titles[i]` describe item index i (the movie vocabulary
  order); a movie the title file lacks gets its id as title.
- `seen_items[seen_row_splits[u]:seen_row_splits[u + 1]]` are the items user
  index u rated in training, sorted: a ragged tensor of int32 item indices
  with one row per user plus one empty row per OOV bucket, so a lookup with
  the OOV index (an unknown user) finds nothing.  At ml-25m's 20M train
  ratings that is 80 MB of int32, the smallest exact form: a dense
  users x movies bitmap would take 1.2 GB.
- `item_counts[i]` is the number of train ratings of item i.

The pairs come from the train split in memory (`data.load_ratings`, the
trainer's copy), never one rating at a time.  Nothing here trains or exports.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft

from trainer import data
from trainer import features

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True, eq=False)
class Catalog:
    """Movie ids and titles in vocabulary order, and each user's train items.

    Attributes:
      movie_ids: str, [num_items]: the movie vocabulary.
      titles: str, [num_items]: the title of each vocabulary movie.
      seen_items: int32, [num_train_pairs]: item indices grouped by user
        index, ascending within a user.
      seen_row_splits: int64, [num_users + NUM_OOV_BUCKETS + 1]: row u of the
        ragged tensor is seen_items[seen_row_splits[u]:seen_row_splits[u+1]].
      item_counts: int64, [num_items]: train ratings per item.
    """
    movie_ids: np.ndarray
    titles: np.ndarray
    seen_items: np.ndarray
    seen_row_splits: np.ndarray
    item_counts: np.ndarray

    @property
    def num_items(self) -> int:
        return int(self.movie_ids.size)

    @property
    def num_users(self) -> int:
        """Users in the vocabulary, OOV rows excluded."""
        return int(self.seen_row_splits.size) - 1 - features.NUM_OOV_BUCKETS

    def seen(self) -> tf.RaggedTensor:
        """The train items of every user index (OOV rows empty), as a RaggedTensor."""
        return tf.RaggedTensor.from_row_splits(
            self.seen_items, self.seen_row_splits, validate=False)


def _normalise_id(text: str) -> str:
    """An id as the ratings parser writes it to the vocabulary ('007' -> '7')."""
    text = text.strip()
    return str(int(text)) if text.isdigit() else text


def parse_titles(text: str, layout: features.DatasetLayout) -> dict[str, str]:
    """Titles by movie id from the text of a movie-title file.

    u.item (`|`) and movies.dat (`::`) hold the title in the second field;
    movies.csv is quoted CSV with a header line.  Lines without a title
    field are skipped with a warning.

    Args:
      text: the decoded file.
      layout: the dataset layout the file follows.

    Returns:
      {movie id: title}; ids as in the vocabulary (no leading zeros).
    """
    text = text.lstrip('\ufeff')
    if layout.movies_separator == ',':
        rows = list(csv.reader(io.StringIO(text)))[1:]  # drop the header
    else:
        rows = [line.rstrip('\r').split(layout.movies_separator)
                for line in text.split('\n')]
    rows = [row for row in rows if row and any(field.strip() for field in row)]
    short = [row for row in rows if len(row) < 2]
    if short:
        logger.warning('Skipping %d movie lines without a title, e.g. %r',
                       len(short), layout.movies_separator.join(short[0]))
    return {_normalise_id(row[0]): row[1].strip() for row in rows if len(row) >= 2}


def read_titles(work_dir: str, layout: features.DatasetLayout) -> dict[str, str]:
    """Titles by movie id from WORK_DIR/raw/<movies file>; {} when it was not staged."""
    path = features.join(features.raw_dir(work_dir), layout.movies_file)
    if not tf.io.gfile.exists(path):
        logger.warning('No movie titles at %s: recommendations show movie ids', path)
        return {}
    with tf.io.gfile.GFile(path, 'rb') as f:
        # A stray undecodable byte costs one character of one title, not the export.
        text = f.read().decode(layout.movies_encoding, errors='replace')
    return parse_titles(text, layout)


def group_by_user(users: np.ndarray, items: np.ndarray,
                  num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Items grouped by user as ragged (values, row_splits), items ascending per user.

    Args:
      users: user index of each pair, all in [0, num_rows).
      items: item index of each pair.
      num_rows: rows of the ragged result (users plus OOV rows).

    Returns:
      int32 values and int64 row_splits of length num_rows + 1.

    Raises:
      ValueError: if a user index is outside [0, num_rows).
    """
    users = np.asarray(users, np.int64)
    if users.size and (users.min() < 0 or users.max() >= num_rows):
        raise ValueError(f'user indices must lie in [0, {num_rows}), got '
                         f'[{users.min()}, {users.max()}]')
    order = np.lexsort((items, users))
    row_splits = np.zeros(num_rows + 1, np.int64)
    np.cumsum(np.bincount(users, minlength=num_rows), out=row_splits[1:])
    return np.asarray(items, np.int32)[order], row_splits


def build_catalog(movie_ids: list[str], titles: dict[str, str],
                  num_users: int, train_users: np.ndarray,
                  train_items: np.ndarray) -> Catalog:
    """Packs the vocabulary, titles and train pairs (see the module doc).

    Args:
      movie_ids: the movie vocabulary, in index order.
      titles: titles by movie id; missing ones fall back to the id.
      num_users: users in the vocabulary, OOV excluded.
      train_users: user index of each train rating.
      train_items: item index of each train rating.

    Returns:
      The catalog.
    """
    seen_items, seen_row_splits = group_by_user(
        train_users, train_items, num_users + features.NUM_OOV_BUCKETS)
    untitled = sum(movie_id not in titles for movie_id in movie_ids)
    if untitled and titles:
        logger.warning('%d of %d movies have no title; they are shown by id',
                       untitled, len(movie_ids))
    counts = np.bincount(np.asarray(train_items, np.int64), minlength=len(movie_ids))
    return Catalog(
        movie_ids=np.array(movie_ids, dtype=object),
        titles=np.array([titles.get(movie_id, movie_id) for movie_id in movie_ids],
                        dtype=object),
        seen_items=seen_items, seen_row_splits=seen_row_splits,
        item_counts=counts[:len(movie_ids)].astype(np.int64))


def load_catalog(work_dir: str, layout: features.DatasetLayout,
                 train: data.Ratings) -> Catalog:
    """Reads the vocabularies and the staged titles of a work dir; pairs from train.

    Args:
      work_dir: the pipeline work dir (raw/ and transformed/).
      layout: the layout the staged files follow (DatasetInfo.layout).
      train: the train split (`data.load_ratings`; the trainer's copy).

    Returns:
      The catalog.
    """
    tft_output = tft.TFTransformOutput(features.transformed_dir(work_dir))
    movie_ids = [word.decode('utf-8') if isinstance(word, bytes) else str(word)
                 for word in tft_output.vocabulary_by_name(features.MOVIE_VOCAB)]
    num_users = tft_output.vocabulary_size_by_name(features.USER_VOCAB)
    catalog = build_catalog(movie_ids, read_titles(work_dir, layout), num_users,
                            train.user.numpy(), train.item.numpy())
    logger.info('Catalog: %d movies, %d users, %d train pairs', catalog.num_items,
                catalog.num_users, catalog.seen_items.size)
    return catalog
