"""EASE (Steck, WWW 2019): the item-item top-N model's maths, its stored neighbours and scores.

The model scores user u and movie i by s_ui = sum_j x_uj B_ji, where x_u is
the user's row of the graded train matrix and B the closed form of

    min_B |X - X B|^2 + sum_j Lambda_jj |B_j|^2   subject to diag(B) = 0:

    P = (G + Lambda)^-1,   B = I - P diag(1 / diag(P)),
    G = X^T X,   Lambda = lam I + p / (1 - p) diag(G)

(B_ij = -P_ij / P_jj off the diagonal, 0 on it; B_j is row j, movie j's
weights on the others).  p is the dropout probability of EDLAE (Steck,
NeurIPS 2020, "Autoencoders that don't overfit towards the identity": the
emphasised-denoising, zero-diagonal form): training to reconstruct X from X
with each entry dropped with probability p penalises each movie's weights in
proportion to its Gram diagonal, so popular movies' weights shrink more.
p = 0 is EASE itself (Lambda = lam I).

The same penalty without the constraint diag(B) = 0 is the denoising linear
autoencoder (DLAE, the same paper): B = (G + Lambda)^-1 G = I - P Lambda, so
B_jk = -P_jk Lambda_kk off the diagonal.  Its diagonal scores only the movies a
user rated, which are never recommended, so it is stored as 0 and the two
forms rank alike but for each movie's column scale: Lambda_kk against
1 / P_kk.  `FORMS` names the two; the search tries both at every (lambda,
p) point, from one inverse (`weights_from_inverse`).  X holds
g(r) = max(r - 2, 0.2) per rated pair (`ials.preference`: 3 stars 1, 5
stars 3, 1-2 stars 0.2), so a disliked movie pulls its neighbours up less
than a loved one; 'watched' targets put 1 in every rated cell.

Each user's squared error can weigh (n_u / mean n)^-a in the fit, n_u the
user's rated pairs (`user_scale`: X's rows scaled by its square root in G
only; a user's scores are scaled alike, which leaves their ranking as it
is).  a = 0 is EASE's unweighted sum, where a user with 10 times the mean
count adds 100 times the movie pairs of an average one to G; a = 1 weighs
every user's error by 1 / n_u.  The search chooses a on validation.

The inverse is dense, movies x movies in float64: 8 bytes x movies^2 for the
Gram matrix and as much for its inverse, and O(movies^3) time.  The Gram
matrix is summed over dense blocks of users, one BLAS product each (0.4 s at
generated 1M).  Above
`max_movies` the model keeps the most-rated movies only (ties by index); the
others get no neighbours, so they score 0 for every user and are not
recommended by EASE.  At 5,000 movies the two matrices take 400 MB.

Serving stores all of B, dense in float32, when the catalogue holds at most
DENSE_MAX_MOVIES movies (64 MiB; 11 MB at 1,682 movies): a user's scores
are then their row of X times B, one matmul, exactly the closed form's.
Past that (or with an explicit count, `stored_count`) it stores, per movie
j, its `neighbours` largest |B_jk|, as a sparse matrix (`sparse_weights`:
16 + 4 bytes per entry), one sparse x dense product (`scores`).  The cut
is checked by `neighbour_recall`, the share of the dense model's top-k the
stored neighbours reproduce.  It costs more than its recall suggests: on
generated 100k (lambda 400) 200 neighbours per movie scored eval NDCG@10
0.3894 against the dense 0.3996, and 400 still 0.3913 (docs/model.md).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import tensorflow as tf

from trainer import config
from trainer.topn import ials

logger = logging.getLogger(__name__)

# The stored neighbours per movie past DENSE_MAX_MOVIES (fewer when the model holds fewer).
DEFAULT_NEIGHBOURS = 200
# Up to this many catalogue movies B is stored whole, dense float32 (64 MiB at most).
DENSE_MAX_MOVIES = 4_096
# EASE keeps at most this many movies (the most rated); see the module doc.
DEFAULT_MAX_MOVIES = 5_000
# 'ease': the zero-diagonal closed form (EASE, EDLAE with dropout); 'dlae': unconstrained.
FORMS = config.EASE_FORMS
# Users x movies per dense float32 block of the Gram matrix's products (64 MiB).
_GRAM_BLOCK_CELLS = 16_777_216


def pair_values(ratings: np.ndarray, target: str = 'rating') -> np.ndarray:
    """x of each rated pair: g(r) ('rating') or 1 ('watched'), float32 (see the module doc)."""
    return ials.targets(ratings, target)


def movie_subset(item_counts: np.ndarray, max_movies: int) -> np.ndarray:
    """The movie indices EASE keeps, ascending: all, or the max_movies most rated."""
    item_counts = np.asarray(item_counts)
    if item_counts.size <= max_movies:
        return np.arange(item_counts.size)
    order = np.argsort(-item_counts, kind='stable')
    return np.sort(order[:max_movies])


def user_scale(users: np.ndarray, num_users: int, exponent: float) -> np.ndarray:
    """Each user's row scale in the Gram matrix, (n_u / mean n)^(-exponent / 2), float64
    [num_users] (n_u: the user's rated pairs; users with none get 1): the user's squared
    error then weighs (n_u / mean n)^-exponent in the fit (see the module doc)."""
    counts = np.bincount(np.asarray(users, np.int64), minlength=num_users).astype(np.float64)
    scale = np.ones(num_users)
    if exponent == 0.0 or not np.any(counts):
        return scale
    rated = counts > 0
    scale[rated] = (counts[rated] / counts[rated].mean()) ** (-exponent / 2.0)
    return scale


def gram(users: np.ndarray, items: np.ndarray, values: np.ndarray, num_users: int,
         subset: np.ndarray, num_items: int, row_scale: np.ndarray | None = None) -> np.ndarray:
    """X^T X over the subset's movies, float64 [E, E], X's rows scaled by row_scale (None:
    1): dense float32 blocks of users, one BLAS product each, summed in float64."""
    column = np.full(num_items, -1, np.int64)
    column[subset] = np.arange(subset.size)
    keep = column[items] >= 0
    rows, cols = np.asarray(users, np.int64)[keep], column[items[keep]]
    vals = np.asarray(values, np.float64)[keep]
    if row_scale is not None:
        vals = vals * np.asarray(row_scale, np.float64)[rows]
    order = np.argsort(rows, kind='stable')
    rows, cols, vals = rows[order], cols[order], vals[order].astype(np.float32)
    out = np.zeros((subset.size, subset.size), np.float64)
    block_users = max(1, _GRAM_BLOCK_CELLS // max(subset.size, 1))
    starts = np.searchsorted(rows, np.arange(0, num_users + block_users, block_users))
    for first, begin, end in zip(range(0, num_users, block_users), starts[:-1], starts[1:]):
        if begin == end:
            continue
        block = np.zeros((min(block_users, num_users - first), subset.size), np.float32)
        block[rows[begin:end] - first, cols[begin:end]] = vals[begin:end]
        out += block.T @ block
    return out


def penalty(gram_matrix: np.ndarray, lam: float, dropout: float = 0.0) -> np.ndarray:
    """Lambda's diagonal, lam + p / (1 - p) G_jj, float64 [E] (see the module doc)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f'dropout {dropout} is not in [0, 1)')
    return lam + dropout / (1.0 - dropout) * np.diag(np.asarray(gram_matrix, np.float64))


def penalised_inverse(gram_matrix: np.ndarray, lam: float,
                      dropout: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(P, Lambda's diagonal): P = (G + Lambda)^-1, float64 (see the module doc)."""
    diagonal = penalty(gram_matrix, lam, dropout)
    inverse = np.array(gram_matrix, np.float64, copy=True)
    inverse[np.diag_indices_from(inverse)] += diagonal
    return np.linalg.inv(inverse), diagonal


def weights_from_inverse(inverse: np.ndarray, diagonal: np.ndarray,
                         form: str = 'ease') -> np.ndarray:
    """B of either form from `penalised_inverse`, its diagonal 0, float64: 'ease'
    B = I - P diag(1 / diag(P)); 'dlae' B = I - P Lambda (see the module doc)."""
    if form not in FORMS:
        raise ValueError(f'form {form!r} is not one of {FORMS}')
    scale = 1.0 / np.diag(inverse) if form == 'ease' else np.asarray(diagonal, np.float64)
    weights = -inverse * scale[None, :]
    weights[np.diag_indices_from(weights)] = 0.0
    return weights


def weights_from_gram(gram_matrix: np.ndarray, lam: float, dropout: float = 0.0,
                      form: str = 'ease') -> np.ndarray:
    """B of the given form (`weights_from_inverse`), P = (G + Lambda)^-1, Lambda = lam I
    + p / (1 - p) diag(G) with p = dropout (0 and 'ease': EASE), float64 (see the
    module doc)."""
    return weights_from_inverse(*penalised_inverse(gram_matrix, lam, dropout), form)


def stored_count(requested: int, num_items: int) -> int:
    """Neighbours stored per movie: requested, or for 0 (the default) all of them (a
    dense B, `Neighbours.dense`) up to DENSE_MAX_MOVIES catalogue movies, else
    DEFAULT_NEIGHBOURS."""
    if requested:
        return requested
    return max(num_items - 1, 1) if num_items <= DENSE_MAX_MOVIES else DEFAULT_NEIGHBOURS


@dataclasses.dataclass(frozen=True)
class Neighbours:
    """Each movie's strongest EASE weights, or all of B, as `scores` reads them.

    Attributes:
      index: int32 [num_items, M]: movie j's neighbours k (movie indices);
        [num_items, 0] when B is stored dense.
      weight: float32 [num_items, M]: B_jk; 0 pads movies outside the model.
      lam: the ridge lambda B was solved with.
      movies: the movies in the model (all, or the most rated).
      dense: float32 [num_items, num_items]: all of B (0 outside the model), or None.
      dropout: EDLAE's dropout probability p B was solved with (0: EASE).
      form: 'ease' (diag(B) = 0 while fitting) or 'dlae' (`FORMS`).
      user_exponent: a in the users' weights (n_u / mean n)^-a of the fit (`user_scale`).
    """
    index: np.ndarray
    weight: np.ndarray
    lam: float
    movies: int
    dense: np.ndarray | None = None
    dropout: float = 0.0
    form: str = 'ease'
    user_exponent: float = 0.0

    @property
    def count(self) -> int:
        """Neighbours per movie (all but itself when B is stored dense)."""
        return max(self.movies - 1, 1) if self.dense is not None else self.index.shape[1]


def neighbours(weights: np.ndarray, subset: np.ndarray, num_items: int, count: int,
               lam: float, dropout: float = 0.0, form: str = 'ease',
               user_exponent: float = 0.0) -> Neighbours:
    """The count largest |B_jk| of each row j of B (subset coordinates), in movie indices;
    all of B, dense, when count covers every other movie of a catalogue of at most
    DENSE_MAX_MOVIES."""
    if count >= subset.size - 1 and num_items <= DENSE_MAX_MOVIES:
        dense = np.zeros((num_items, num_items), np.float32)
        dense[np.ix_(subset, subset)] = weights
        return Neighbours(np.zeros((num_items, 0), np.int32), np.zeros((num_items, 0), np.float32),
                          float(lam), int(subset.size), dense, float(dropout), form,
                          float(user_exponent))
    count = max(1, min(count, subset.size - 1))
    strongest = np.argpartition(-np.abs(weights), count - 1, axis=1)[:, :count]
    index = np.zeros((num_items, count), np.int32)
    weight = np.zeros((num_items, count), np.float32)
    index[subset] = subset[strongest]
    weight[subset] = np.take_along_axis(weights, strongest, axis=1)
    return Neighbours(index, weight, float(lam), int(subset.size), dropout=float(dropout),
                      form=form, user_exponent=float(user_exponent))


def fit(users: np.ndarray, items: np.ndarray, ratings: np.ndarray, num_users: int,
        num_items: int, lam: float, target: str = 'rating',
        max_movies: int = DEFAULT_MAX_MOVIES,
        count: int = DEFAULT_NEIGHBOURS, dropout: float = 0.0,
        form: str = 'ease', user_exponent: float = 0.0) -> Neighbours:
    """EASE on rated pairs, cut to each movie's `count` strongest neighbours (all: dense);
    dropout p > 0: EDLAE's penalty; form 'dlae': without diag(B) = 0; user_exponent a:
    each user's error weighs (n_u / mean n)^-a (see the module doc)."""
    started = time.perf_counter()
    subset = movie_subset(np.bincount(items, minlength=num_items), max_movies)
    weights = weights_from_gram(
        gram(users, items, pair_values(ratings, target), num_users, subset, num_items,
             user_scale(users, num_users, user_exponent)), lam, dropout, form)
    out = neighbours(weights, subset, num_items, count, lam, dropout, form, user_exponent)
    logger.info('EASE (%s form) on %d of %d movies, lambda %g, dropout %g, user exponent %g, '
                '%d neighbours each: %.1f s', form, subset.size, num_items, lam, dropout,
                user_exponent, out.count,
                time.perf_counter() - started)
    return out


def user_values(users: np.ndarray, items: np.ndarray, ratings: np.ndarray,
                target: str = 'rating') -> np.ndarray:
    """x of each train pair in `catalog.group_by_user`'s order (by user, then item)."""
    order = np.lexsort((items, users))
    return pair_values(np.asarray(ratings)[order], target)


def sparse_weights(stored: Neighbours) -> tuple[np.ndarray, np.ndarray]:
    """The stored neighbours as B's nonzero entries: int64 [nnz, 2] (j, k) in row order
    and float32 [nnz] weights, for `scores` (all nonzero entries of a dense B)."""
    if stored.dense is not None:
        rows, columns = np.nonzero(stored.dense)
        return (np.stack([rows, columns], axis=1).astype(np.int64),
                stored.dense[rows, columns].astype(np.float32))
    rows = np.repeat(np.arange(stored.index.shape[0], dtype=np.int64), stored.index.shape[1])
    columns = stored.index.reshape(-1).astype(np.int64)
    weights = stored.weight.reshape(-1)
    keep = weights != 0
    rows, columns, weights = rows[keep], columns[keep], weights[keep]
    order = np.lexsort((columns, rows))
    return np.stack([rows[order], columns[order]], axis=1), weights[order].astype(np.float32)


def scores(indices: tf.Tensor, weights: tf.Tensor, seen: tf.RaggedTensor,
           seen_values: tf.RaggedTensor, user: tf.Tensor,
           num_items: int | tf.Tensor) -> tf.Tensor:
    """s_u = x_u B over the stored neighbours, [B, num_items]: the users' rows of X
    scattered into a dense block, then one sparse x dense product with B's nonzeros
    (E x neighbours multiply-adds per user; memory: two [B, num_items] blocks).

    Args:
      indices, weights: `sparse_weights` of the stored neighbours.
      seen: every user's train movies (`Catalog.seen()`; OOV rows empty).
      seen_values: x of each of them, the same row splits (`user_values`).
      user: int user indices [B].
      num_items: vocabulary movies.
    """
    user = tf.cast(user, tf.int64)
    rated, values = tf.gather(seen, user), tf.gather(seen_values, user)
    num_items = tf.cast(num_items, tf.int64)
    where = tf.stack([rated.value_rowids(), tf.cast(rated.flat_values, tf.int64)], axis=1)
    x = tf.scatter_nd(where, values.flat_values, tf.stack([tf.size(user, tf.int64), num_items]))
    b = tf.sparse.SparseTensor(indices, weights, tf.stack([num_items, num_items]))
    # (B^T x^T)^T = x B.
    return tf.transpose(tf.sparse.sparse_dense_matmul(b, x, adjoint_a=True, adjoint_b=True))


def dense_matrix_scores(dense: tf.Tensor, seen: tf.RaggedTensor,
                        seen_values: tf.RaggedTensor, user: tf.Tensor,
                        num_items: int | tf.Tensor) -> tf.Tensor:
    """s_u = x_u B with all of B stored dense [n, n] (`Neighbours.dense`), [B, num_items]:
    the users' rows of X scattered into a dense block, then one matmul (n^2 multiply-adds
    per user); columns past n (none in an export) score 0."""
    user = tf.cast(user, tf.int64)
    rated, values = tf.gather(seen, user), tf.gather(seen_values, user)
    num_items = tf.cast(num_items, tf.int64)
    size = tf.cast(tf.shape(dense)[0], tf.int64)
    where = tf.stack([rated.value_rowids(), tf.cast(rated.flat_values, tf.int64)], axis=1)
    x = tf.scatter_nd(where, values.flat_values,
                      tf.stack([tf.size(user, tf.int64), tf.maximum(num_items, size)]))
    out = tf.matmul(x[:, :size], dense)
    return tf.pad(out, [[0, 0], [0, tf.maximum(num_items - size, 0)]])[:, :num_items]


def dense_scores(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """X B in numpy, for checks: [users, movies] rows of x times the dense weights."""
    return np.asarray(x, np.float64) @ np.asarray(weights, np.float64)


def neighbour_recall(x: np.ndarray, weights: np.ndarray, stored: Neighbours,
                     k: int) -> float:
    """Share of the dense top-k (unrated movies) that the stored neighbours' top-k hold."""
    dense = dense_scores(x, weights)
    cut = np.zeros_like(dense)
    if stored.dense is not None:
        cut = dense_scores(x, stored.dense)
    for j in range(stored.index.shape[0] if stored.dense is None else 0):
        cut[:, stored.index[j]] += x[:, [j]] * stored.weight[j][None, :]
    rated = x != 0
    dense[rated], cut[rated] = -np.inf, -np.inf
    top_dense = np.argsort(-dense, axis=1, kind='stable')[:, :k]
    top_cut = np.argsort(-cut, axis=1, kind='stable')[:, :k]
    return float(np.mean([np.intersect1d(a, b).size / k for a, b in zip(top_dense, top_cut)]))
