"""Posterior averaging: the Bayesian posterior mean of the trained model.

Owns the Gibbs sampler that turns the trained (MAP) biased matrix
factorisation into an estimate of its posterior mean.  SGD, however well
tuned, finds one point: the mode of the posterior (L2 is a Gaussian prior).
On sparse data the mode is a poor summary: a user with 20 ratings has
factors that fit those 20 ratings and are shrunk hard, while the posterior
spreads over many factor settings that explain them about as well.
Predicting with the average over that spread (Salakhutdinov and Mnih,
"Bayesian probabilistic matrix factorization using MCMC", 2008; Rendle et
al. 2019 report their best MovieLens results this way) gains what no
regularisation of the point estimate does: on the rank-3 generator's
synthetic 100k (--synthetic-model rank3, commit 0d11dd3) the exact optimum
of the L2 objective reached eval RMSE 0.9105 at best, the posterior mean
0.904 at the planted rank and 0.9065 with 16 factors.

The model is the trainer's (`model.MatrixFactorization`):
r = mu + b_u + b_i + p_u . q_i + noise, with

    noise of rating (u, i) ~ N(0, 1 / (tau alpha_u beta_i))
    each column d of a side's table ~ N(0, 1 / lambda_d)   (factors, bias)
    tau, lambda_d ~ Gamma(1, 1)                           (shape, rate)
    alpha_u ~ Gamma(a, a), beta_i ~ Gamma(b, b), a and b drawn from a grid

so every precision is sampled, not tuned.  alpha and beta (`NoisePrecisions`,
--posterior-noise user-movie, the default) let a user who rates erratically
or a movie that divides opinion have noisier ratings, which then pull the
other side's rows less; with --posterior-noise shared they stay 1.  From
the same trained model on the calibrated generator's data (the pipeline's
split), eval RMSE 0.8800 against 0.8894 with one noise level at 100k, and
0.8398 against 0.8457 at 1M.  With one noise level the chain's noise std
falls to 0.75, below what the planted noise leaves, and its running average
worsens after 60 sweeps (0.8879, then 0.8905 at 400); with a level per user
and movie it does not drift (0.8795 at 400).

The rate bounds how strongly a column can be shrunk.  A smaller one scored a
little better from a trained model (synthetic 100k, eval RMSE: rate 0.01
0.9050, 1 0.9070, 5 0.9128), but from small factors (a model trained little)
it let every factor collapse to zero, leaving the biases alone
(tests/test_posterior.py starts from factors of 0.1 and fails so); 1 is safe
from both starts.  A sweep draws all user rows given the items
(`sample_rows`), then the users' noise factors, then all item rows given the
users, then the movies' noise factors, then the remaining precisions, each
from its Gamma conditional.  The chain starts from the trained model with its
factors shrunk (START_FACTOR_SCALE), whose tables set the first precisions;
`burn_in` sweeps are dropped and the next `samples` kept.

Averaging: the prediction averaged over the kept sweeps is
mu + mean(b_u) + mean(b_i) + mean(p_u . q_i).  Each sweep contributes its
user rows' conditional mean (given the item table it was drawn from) with
that item table: the same expectation as the drawn rows, with less noise
(Rao-Blackwellisation).  The mean of the products is a sum of rank-K
matrices; it is kept as a low-rank factorisation, recompressed (an
orthonormal basis of each side from its Gram matrix, SVD of the small core) whenever it grows past COMPRESS_WIDTH columns,
and finally truncated to the model's K factors, split evenly between the
sides.  The result is an ordinary model of the same shape, so export,
ranking and serving do not change.  (Truncating the exact average of 80
sweeps of 16 factors to 16 changed eval RMSE by under 0.0005 on synthetic
100k: the posterior mean is close to low rank.)

The heavy part, every row's normal equations, Cholesky factor and draw, runs
in the C++ op `MatrixFactorizationSampleRows` (`sample_rows.cc`, built by
`trainer.ops.kernels`); where it cannot be built the same arithmetic runs in numpy,
to the same chain within float rounding, about 20 times slower.  Random
numbers come from numpy, seeded by `seed`: the same data and seed give the
same model whatever the thread count.

A model with implicit feedback (`model.folded`) has user factors
p_u + x_u, where x_u, the implicit sum over the movies u rated, is known
before any rating is read.  Its prior is centred there: p_u + x_u ~
N(x_u, 1 / lambda), passed as `user_prior_mean`.  A zero-mean prior would
pull the folded factors of a user with few ratings back to zero and undo
what the implicit term learned (measured on synthetic 100k with
selection bias 2: eval RMSE 0.8387 trained, 0.8400 averaged with a
zero-mean prior).  The sampler draws the deviation from the prior mean,
whose ratings' targets are less x_u . q_i.

How many sweeps: the kept sweeps' average estimates the posterior mean, and
its Monte Carlo error shrinks as the chain runs.  With a stop level
(`mc_error`), `average` predicts a seeded sample of the validation slice
(at most VALIDATION_SAMPLE ratings) after every kept sweep and stops at the
first kept sweep n >= min_samples where

    V_n / (2 MSE_n) <= mc_error

MSE_n is the running average's mean squared error on the sample and V_n the
Monte Carlo variance of its predictions, averaged over the sample:
estimated by batch means (`BatchMeans`: 8 to 15 batches of equal length,
whose length doubles as the chain grows, so batches stay longer than the
chain's memory as long as it is under an eighth of the sweeps run).  An
average of predictions with Monte Carlo variance V scores
sqrt(MSE_inf + V), so V / (2 MSE) is the share by which the chain's finite
length inflates the RMSE of the exported predictions over an endless
chain's: mc_error 0.001 stops when that share is 0.1%.  A chain still
climbing from its start moves its predictions together towards a better
fit, which costs RMSE in proportion to the move, not its square: so V_n is
replaced by how much better the last half of the kept sweeps alone fits the
sample than all of them, when that is larger (`mc_error_share`).  Large data pin the
posterior down, the draws vary little, and the rule stops sooner; no count
is tuned per size.  `samples` is the cap.  The rule reads the chain's past:
a chain that sits on a plateau before it climbs (from the default shrunk
start at 5M, for 40 sweeps) looks settled, so the trainer leaves the rule
off unless asked, and it is meant for a chain started from the trained
model itself (start_scale 1), which settles within a few sweeps
(docs/performance.md#how-many-sweeps).

After each sweep `average` can hand its caller the chain's state
(`ChainState`: the rows, precisions, noise factors, the generator's state and
the running sums), and it resumes from such a state to the same tables, bit
for bit; `train.py` checkpoints it through `trainer.rating.state`.

This module holds no flags; `train.py` calls `average`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from trainer import config
from trainer import features
from trainer import logs

logger = logging.getLogger(__name__)

# Gamma(shape, rate) hyperprior of every precision: weak, so the data decide
# (see the module doc for the rate).
PRIOR_SHAPE = 1.0
PRIOR_RATE = 1.0
# The chain starts from the trained model's factors times this (its biases
# as they are).  Started at the SGD mode itself, the sampled precisions stay
# as weak as that mode's factors are large and the 120 sweeps do not leave
# its neighbourhood; started from shrunk factors, the data grow them back to
# what the posterior supports.  Eval RMSE of the exported model on the
# calibrated generator's data (the pipeline's split, seeds 0 and 1), by the
# scale: 100k 0.8949 and 0.8951 at 1 (the mode), 0.8894 and 0.8918 at 0.3,
# 0.8889 at 0; 1M 0.8469 and 0.8468 at 1, 0.8457 and 0.8457 at 0.3, 0.8472
# and 0.8468 at 0; 25M (ml-25m-shaped) 0.7823 at 1, 0.7822 at 0.3.  0.3
# gains where ratings per row are few and costs nothing at 25M; 0 is as good
# at 100k but not at 1M, where 20 burn-in sweeps are too few to grow the
# factors from nothing.  The chain mixes slowly, so its start shows for
# hundreds of sweeps: from 0.3, 200 and 400 sweeps scored 0.8908 and 0.8915
# at 100k and 0.8455 at 1M, still ahead of the mode's start.  Those figures
# are of one noise level; with a level per user and movie, on ml-25m-shaped
# data, the mode's start (1) scored better and settled sooner from 1M on and
# worse at 100k (docs/performance.md#how-many-sweeps).  `average`'s
# start_scale (--posterior-start-scale) overrides it.
START_FACTOR_SCALE = 0.3
# The defaults by the ratings the chain averages over (--posterior-start-scale
# and --posterior-mc-error left unset): from LARGE_CHAIN_RATINGS on the chain
# starts from the trained model (scale 1) and stops by the Monte Carlo rule at
# LARGE_CHAIN_MC_ERROR, below it starts from START_FACTOR_SCALE and runs all
# its sweeps.  On ml-25m-shaped data (docs/performance.md#how-many-sweeps) the
# trained model's start scored better than 0.3 from 0.8M ratings on (1M:
# 0.8004 against 0.8075, 5M: 0.7833 at the rule's 37 sweeps against 0.7911 at
# 100) and settled within a few sweeps, so the rule can be trusted there; at
# 80k ratings it scored 0.26% worse (0.8823 against 0.8800) and the rule ran
# to its cap anyway.  Sweeps are cheap where the data are small.
LARGE_CHAIN_RATINGS = 500_000
LARGE_CHAIN_MC_ERROR = 0.001


def default_chain(num_ratings: int) -> tuple[float, float]:
    """(start_scale, mc_error) a chain over num_ratings ratings uses by default."""
    if num_ratings >= LARGE_CHAIN_RATINGS:
        return 1.0, LARGE_CHAIN_MC_ERROR
    return START_FACTOR_SCALE, 0.0
# The running average of the factor products is recompressed when it has
# more columns than this multiple of K, to this multiple of K.
COMPRESS_WIDTH = 8
KEEP_WIDTH = 4
# Ratings per numpy chunk of the fallback (each costs width^2 doubles).
_NUMPY_CHUNK_RATINGS = 1 << 16
# The noise models of `average` (--posterior-noise), the default first.
NOISE_MODELS = config.POSTERIOR_NOISE_MODELS
# The shapes a of the per-user and per-movie noise factors' Gamma(a, a)
# priors (NoisePrecisions): 0.5 (noise levels a factor of ten apart are
# common) to 1,000 (all alike: one noise level).
SHAPE_GRID = np.geomspace(0.5, 1000.0, 45)
_LOG_GAMMA_GRID = np.array([math.lgamma(value) for value in SHAPE_GRID])
# Seeds the sampler's stream apart from the epochs' shuffles.
_STREAM = 0xBA7E5
# The stopping rule predicts at most this many validation ratings (a seeded
# sample) after each kept sweep.  The Monte Carlo variance is averaged over
# them, so its estimate hardly varies with the sample: at 100,000 a sweep's
# predictions take a few milliseconds.
VALIDATION_SAMPLE = 100_000
# Batch means keep between MIN_BATCHES and 2 x MIN_BATCHES - 1 batches.
MIN_BATCHES = 8


@dataclasses.dataclass(frozen=True)
class Side:
    """One side's ratings grouped by its rows (CSR).

    Attributes:
      offsets: int64 [rows + 1]; row e's ratings are offsets[e]:offsets[e + 1].
      other: int32 [N], the other side's row of each rating.
      target: float32 [N], the rating less the global mean.
    """
    offsets: np.ndarray
    other: np.ndarray
    target: np.ndarray

    @classmethod
    def group(cls, rows: np.ndarray, other: np.ndarray, target: np.ndarray,
              num_rows: int) -> 'Side':
        """Groups the ratings of rows 0..num_rows-1 (as in `rows`) by row."""
        order = np.argsort(rows, kind='stable')
        counts = np.bincount(rows, minlength=num_rows)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(offsets, np.ascontiguousarray(other[order], np.int32),
                   np.ascontiguousarray(target[order], np.float32))


@dataclasses.dataclass(frozen=True)
class Result:
    """The averaged tables and how the chain went.

    Attributes:
      user_table, item_table: float32, the model's layout ([factors, bias]
        rows, OOV rows included and zero).
      samples, burn_in: sweeps kept and dropped.
      seconds: wall time of the sweeps and the averaging.
      noise_std: the noise std at the last sweep (root mean square over the
        ratings of 1 / sqrt(each rating's noise precision)).
      kernel: 'op' or 'numpy'.
      noise: the noise model, 'shared' or 'user-movie'.
      noise_shapes: with 'user-movie', the last sweep's shapes a of the
        per-user and the per-movie noise factors' priors (small: noise levels
        differ widely; large: alike); None with 'shared'.
      mc_error: at the last kept sweep, V / (2 MSE) of the validation sample
        (the stopping rule's statistic: see the module doc); None without a
        sample, or before MIN_BATCHES kept sweeps.
      mc_error_level: the rule's level (0: the chain ran all `samples`).
      stopped_by: 'mc_error' (the rule stopped the chain) or 'cap' (it ran
        all `samples`).
      validation_sample: validation ratings the rule predicted.
      autocorrelation: the sweeps' integrated autocorrelation time by batch
        means (the Monte Carlo variance over what independent sweeps would
        give), or None.
    """
    user_table: np.ndarray
    item_table: np.ndarray
    samples: int
    burn_in: int
    seconds: float
    noise_std: float
    kernel: str
    noise: str = 'shared'
    noise_shapes: tuple[float, float] | None = None
    mc_error: float | None = None
    mc_error_level: float = 0.0
    stopped_by: str = 'cap'
    validation_sample: int = 0
    autocorrelation: float | None = None


@dataclasses.dataclass(frozen=True)
class ChainState:
    """Everything the chain carries from one sweep to the next: a resumed chain
    continues exactly (the same draws, the same average, bit for bit).

    Attributes:
      sweep: sweeps done.
      settings: (samples, burn_in, seed, noise, users, movies, width,
        ratings, a digest of the start tables): another chain's state is
        not resumed.
      users_now, items_now: the last sweep's rows.
      user_prior, item_prior: the column precisions for the next sweep.
      noise: tau, then the per-row factors alpha and beta and their shapes.
      alpha, beta: per user and per movie noise factors.
      rng: the generator's state (numpy's bit-generator dict).
      product_left, product_right: the running sum of factor products, as
        `LowRankSum` holds it (one array per part, in order).
      user_bias_sum, item_bias_sum: running sums of the kept biases.
      batches: the stopping rule's batch means (`BatchMeans.state`), or None
        without a rule.
      stopped: the rule stopped the chain at `sweep`: a resumed run does not
        go on.
    """
    sweep: int
    settings: tuple
    users_now: np.ndarray
    items_now: np.ndarray
    user_prior: np.ndarray
    item_prior: np.ndarray
    noise: tuple[float, float, float]
    alpha: np.ndarray
    beta: np.ndarray
    rng: dict
    product_left: tuple[np.ndarray, ...]
    product_right: tuple[np.ndarray, ...]
    user_bias_sum: np.ndarray
    item_bias_sum: np.ndarray
    batches: dict[str, Any] | None = None
    stopped: bool = False


class BatchMeans:
    """The Monte Carlo variance of a running average of predictions, by batch means.

    Each kept sweep's predictions of the validation sample are added
    (`add`); consecutive sweeps are summed into batches of `size` sweeps.
    When there are 2 x MIN_BATCHES whole batches, neighbours are merged and
    the size doubles.  With a whole batches of b sweeps of n kept, and B_k
    the batch means of a rating, the variance of its running average is
    estimated as b / n x the variance of B_k (a - 1 degrees of freedom),
    then averaged over the ratings.  A chain still drifting from its start
    (the burn-in too short) hides from batch means that are short against
    the drift, so the estimate is the larger of that and a drift estimate
    (after Geweke's diagnostic): a quarter of the mean square difference
    between the first and the last half of the batches' means, scaled to n
    sweeps, which for a settled chain estimates the same variance.
    """

    def __init__(self, count: int) -> None:
        self.size = 1
        self.kept = 0
        self.whole = np.zeros((0, count))
        self.current = np.zeros(count)
        self.in_current = 0
        self.total = np.zeros(count)
        self.squares = np.zeros(count)

    def add(self, prediction: np.ndarray) -> None:
        prediction = np.asarray(prediction, np.float64)
        self.kept += 1
        self.total += prediction
        self.squares += np.square(prediction)
        self.current += prediction
        self.in_current += 1
        if self.in_current == self.size:
            self.whole = np.vstack([self.whole, self.current[None]])
            self.current = np.zeros_like(self.current)
            self.in_current = 0
            if len(self.whole) == 2 * MIN_BATCHES:
                self.whole = self.whole[0::2] + self.whole[1::2]
                self.size *= 2

    def mean(self) -> np.ndarray:
        """The running average of the predictions."""
        return self.total / max(self.kept, 1)

    def variance(self) -> float | None:
        """The mean over the ratings of the running average's Monte Carlo
        variance, or None with fewer than MIN_BATCHES whole batches."""
        batches = len(self.whole)
        if batches < MIN_BATCHES or not self.whole.shape[1]:
            return None
        means = self.whole / self.size
        spread = np.square(means - means.mean(0)).sum(0) / (batches - 1)
        # The first and the last half of the batches: for a chain that has
        # settled, their means differ by noise alone, with 4 times the
        # variance of the mean of both; a drift adds to it.
        half = batches // 2
        drift = np.square(means[:half].mean(0) - means[-half:].mean(0)).mean() / 4
        return float(max(spread.mean() * self.size, drift * 2 * half * self.size)
                     / self.kept)

    def last_half_mean(self) -> np.ndarray | None:
        """The mean of the last half of the whole batches, or None with fewer than MIN_BATCHES."""
        batches = len(self.whole)
        if batches < MIN_BATCHES:
            return None
        return self.whole[-(batches // 2):].sum(0) / (batches // 2 * self.size)

    def autocorrelation(self) -> float | None:
        """The variance over what independent sweeps would give (1: independent)."""
        variance = self.variance()
        if variance is None or self.kept < 2:
            return None
        single = (self.squares - self.kept * np.square(self.mean())) / (self.kept - 1)
        single = float(np.maximum(single, 0.0).mean())
        return variance * self.kept / single if single > 0 else None

    def state(self) -> dict[str, Any]:
        return {'size': self.size, 'kept': self.kept, 'whole': self.whole.copy(),
                'current': self.current.copy(), 'in_current': self.in_current,
                'total': self.total.copy(), 'squares': self.squares.copy()}

    def restore(self, state: dict[str, Any]) -> None:
        self.size, self.kept, self.in_current = (int(state['size']), int(state['kept']),
                                                 int(state['in_current']))
        self.whole = np.array(state['whole'], np.float64).reshape(-1, len(self.total))
        self.current = np.array(state['current'], np.float64)
        self.total = np.array(state['total'], np.float64)
        self.squares = np.array(state['squares'], np.float64)


class StopRule:
    """Whether the chain has run long enough (module doc): V_n / (2 MSE_n) <= level."""

    def __init__(self, user: np.ndarray, item: np.ndarray, target: np.ndarray,
                 level: float, min_samples: int) -> None:
        self.user, self.item, self.target = user, item, target
        self.level = level
        self.min_samples = min_samples
        self.batches = BatchMeans(len(target))
        self.statistic: float | None = None

    def add(self, users_mean: np.ndarray, items: np.ndarray) -> None:
        """Adds a kept sweep's predictions (less the global mean) of the sample."""
        k = users_mean.shape[1] - 1
        rows, columns = users_mean[self.user], items[self.item]
        self.batches.add(rows[:, k].astype(np.float64) + columns[:, k]
                         + np.einsum('nk,nk->n', rows[:, :k], columns[:, :k],
                                     dtype=np.float64))
        self.update()

    def update(self) -> None:
        """Sets `statistic` from the batches (after `add`, or a resume)."""
        self.statistic = mc_error_share(self.batches, self.target)

    def met(self) -> bool:
        return (self.level > 0 and self.batches.kept >= self.min_samples
                and self.statistic is not None and self.statistic <= self.level)

    def describe(self) -> str:
        """', Monte Carlo error x% of the validation RMSE (stop at y%)', or ''."""
        if self.statistic is None:
            return ''
        stop = f' (stop at {100 * self.level:.3g}%)' if self.level > 0 else ''
        return (f", Monte Carlo error {100 * self.statistic:.3g}% of the validation "
                f'RMSE{stop}')


def mc_error_share(batches: BatchMeans, target: np.ndarray) -> float | None:
    """The stopping rule's statistic: max(V, MSE - MSE_last) / (2 MSE), or None.

    MSE is the running average's mean squared error on the sample's targets,
    V its Monte Carlo variance (`BatchMeans.variance`) and MSE_last that of
    the average of the last half of the batches alone.  For a settled chain
    the last half fits worse than the whole (by about V); a chain still
    improving its fit (climbing from its start) fits better with its last
    half alone, a systematic gain that V, a measure of noise, understates.
    """
    variance = batches.variance()
    if variance is None:
        return None
    mse = float(np.square(batches.mean() - target).mean())
    last = batches.last_half_mean()
    gain = mse - float(np.square(last - target).mean())
    return max(variance, gain) / (2 * mse) if mse > 0 else None


def validation_sample(user: np.ndarray, item: np.ndarray, rating: np.ndarray,
                      num_users: int, num_items: int, seed: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At most VALIDATION_SAMPLE of the ratings (seeded), in their order;
    ratings of rows outside the tables (out of vocabulary) are left out."""
    user, item = np.asarray(user, np.int64), np.asarray(item, np.int64)
    inside = np.flatnonzero((user < num_users) & (item < num_items))
    if len(inside) > VALIDATION_SAMPLE:
        rng = np.random.default_rng([_STREAM, seed, 1])
        inside = np.sort(rng.choice(inside, VALIDATION_SAMPLE, replace=False))
    return (user[inside].astype(np.int32), item[inside].astype(np.int32),
            np.asarray(rating, np.float64)[inside])


class LowRankSum:
    """A sum of products left @ right.T kept as one (left, right) pair."""

    def __init__(self, max_width: int, keep_width: int) -> None:
        self.max_width = max_width
        self.keep_width = keep_width
        self.left: list[np.ndarray] = []
        self.right: list[np.ndarray] = []

    def add(self, left: np.ndarray, right: np.ndarray) -> None:
        self.left.append(np.asarray(left, np.float64))
        self.right.append(np.asarray(right, np.float64))
        if sum(part.shape[1] for part in self.left) > self.max_width:
            left, right = self.truncated(self.keep_width)
            self.left, self.right = [left], [right]

    def truncated(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """The best rank-`rank` (left, right) of the sum, the scale split evenly."""
        left, right = np.hstack(self.left), np.hstack(self.right)
        left_basis, left_core = _orthonormal(left)
        right_basis, right_core = _orthonormal(right)
        u, s, vt = np.linalg.svd(left_core @ right_core.T)
        kept = min(rank, len(s))
        root = np.sqrt(s[:kept])
        left = left_basis @ u[:, :kept] * root
        right = right_basis @ vt[:kept].T * root
        if kept < rank:  # the sum has lower rank (e.g. fewer rows than factors)
            left = np.pad(left, ((0, 0), (0, rank - kept)))
            right = np.pad(right, ((0, 0), (0, rank - kept)))
        return left, right


def _orthonormal(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(basis, core) with matrix = basis @ core and orthonormal basis columns.

    From the eigenvectors of the small Gram matrix (one matmul over the tall
    side, cheaper than a QR of it); directions with no weight are dropped.
    """
    values, vectors = np.linalg.eigh(matrix.T @ matrix)
    keep = values > values.max(initial=0.0) * 1e-12
    root = np.sqrt(values[keep])
    return matrix @ (vectors[:, keep] / root), root[:, None] * vectors[:, keep].T


def sample_rows_numpy(side: Side, other_table: np.ndarray, prior: np.ndarray,
                      tau: np.ndarray, weight: np.ndarray, noise: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The arithmetic of `MatrixFactorizationSampleRows`, in numpy (float64).

    Args:
      tau: each row's noise precision; weight: each other row's factor of it.

    Returns:
      (sample, mean, each row's weighted squared error), as the op's outputs.
    """
    rows, width = noise.shape
    counts = np.diff(side.offsets)
    other_table = other_table.astype(np.float64)
    weight = np.asarray(weight, np.float32).astype(np.float64)
    gram = np.zeros((rows, width, width))
    rhs = np.zeros((rows, width))
    yy = np.zeros(rows)
    start = 0
    while start < rows:  # whole rows, about _NUMPY_CHUNK_RATINGS ratings a chunk
        stop = int(np.searchsorted(side.offsets, side.offsets[start] + _NUMPY_CHUNK_RATINGS,
                                   side='right')) - 1
        stop = min(rows, max(stop, start + 1))
        lo, hi = side.offsets[start], side.offsets[stop]
        if hi > lo:
            z = other_table[side.other[lo:hi]]
            w = weight[side.other[lo:hi]]
            y = side.target[lo:hi].astype(np.float64) - z[:, -1]
            z[:, -1] = 1.0
            present = np.flatnonzero(counts[start:stop]) + start
            starts = side.offsets[present] - lo
            gram[present] = np.add.reduceat(
                (w[:, None] * z)[:, :, None] * z[:, None, :], starts)
            rhs[present] = np.add.reduceat(z * (w * y)[:, None], starts)
            yy[present] = np.add.reduceat(w * y * y, starts)
        start = stop
    tau = np.asarray(tau, np.float32).astype(np.float64)
    precision = tau[:, None, None] * gram + np.diag(prior.astype(np.float64))
    cholesky = np.linalg.cholesky(precision)
    mean = np.linalg.solve(precision, (tau[:, None] * rhs)[..., None])[..., 0]
    draw = np.linalg.solve(np.swapaxes(cholesky, 1, 2),
                           noise.astype(np.float64)[..., None])[..., 0]
    sample = (mean + draw).astype(np.float32)
    x = sample.astype(np.float64)
    # sum (y - z.x)^2 = sum y^2 - 2 x . sum z y + x^T (sum z z^T) x, per row.
    squared = (yy - 2 * np.einsum('nd,nd->n', x, rhs)
               + np.einsum('nd,nde,ne->n', x, gram, x))
    return sample, mean.astype(np.float32), np.maximum(squared, 0.0)


_RowSampler = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]


def _op_sampler(ops: Any, threads: int) -> _RowSampler:
    def sample_rows(side: Side, other_table: np.ndarray, prior: np.ndarray,
                    tau: np.ndarray, weight: np.ndarray, noise: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sample, mean, squared = ops.matrix_factorization_sample_rows(
            offsets=side.offsets, other=side.other, target=side.target,
            other_table=np.ascontiguousarray(other_table, np.float32),
            prior_precision=prior.astype(np.float32),
            noise_precision=np.asarray(tau, np.float32),
            other_weight=np.asarray(weight, np.float32), noise=noise, threads=threads)
        return sample.numpy(), mean.numpy(), squared.numpy()
    return sample_rows


def _sampler(kernel: str) -> tuple[_RowSampler, str]:
    """The op (kernel 'auto' or 'fused') or numpy ('tf', or the op unavailable)."""
    if kernel == 'tf':
        return sample_rows_numpy, 'numpy'
    from trainer.ops import kernels
    try:
        return _op_sampler(kernels.load(), kernels.default_threads()), 'op'
    except kernels.KernelUnavailable as error:
        if kernel == 'fused':
            raise
        logger.warning('Posterior sampling in numpy (about 20 times slower): %s', error)
        return sample_rows_numpy, 'numpy'


def _squared_error(users: np.ndarray, items: np.ndarray, user: np.ndarray,
                   item: np.ndarray, target: np.ndarray) -> float:
    """sum (target - b_u - b_i - p_u . q_i)^2, a chunk of ratings at a time
    (gathering every rating's rows at once would take 2 x 64 bytes a rating)."""
    total = 0.0
    for lo in range(0, len(target), _NUMPY_CHUNK_RATINGS * 16):
        hi = lo + _NUMPY_CHUNK_RATINGS * 16
        user_rows, item_rows = users[user[lo:hi]], items[item[lo:hi]]
        residual = (target[lo:hi] - user_rows[:, -1] - item_rows[:, -1]
                    - np.einsum('nk,nk->n', user_rows[:, :-1], item_rows[:, :-1]))
        total += float(np.square(residual, dtype=np.float64).sum())
    return total


class _PriorShift:
    """The user side's ratings with targets less prior_mean[u] . q_i, for a row's deviation."""

    def __init__(self, users: Side, prior_mean: np.ndarray) -> None:
        self.users = users
        self.factors = prior_mean[:, :-1]
        self.rows = np.repeat(np.arange(len(users.offsets) - 1, dtype=np.int32),
                              np.diff(users.offsets))

    def side(self, item_table: np.ndarray) -> Side:
        target = self.users.target.copy()
        for lo in range(0, len(target), _NUMPY_CHUNK_RATINGS * 16):
            hi = lo + _NUMPY_CHUNK_RATINGS * 16
            target[lo:hi] -= np.einsum('nk,nk->n', self.factors[self.rows[lo:hi]],
                                       item_table[self.users.other[lo:hi], :-1])
        return Side(self.users.offsets, self.users.other, target)


class NoisePrecisions:
    """The noise precision of every rating, tau * alpha_u * beta_i, and its draws.

    'shared' (per_row False): alpha and beta stay 1, one precision tau for
    every rating, Gamma(PRIOR_SHAPE, PRIOR_RATE) a priori.  'user-movie':
    each user's and each movie's factor is Gamma(a, a) a priori (mean 1), a
    shared per side; some users rate consistently and others erratically, and
    some movies divide opinion (Lakshminarayanan, Bouchard and Archambeau,
    "Robust Bayesian matrix factorisation", AISTATS 2011: row- and
    column-specific variances matter on real ratings).  The shape a, how
    alike the rows' noise is, is drawn too, from SHAPE_GRID (uniform on the
    log scale), so ratings with one noise level drive it up and the model
    back towards 'shared'.  Conditionals, with S_u = sum over u's ratings of
    beta_i e^2 (the op's per-row output with beta as the other side's
    weight):

        alpha_u ~ Gamma(a + n_u / 2, a + tau S_u / 2)

    and the same for beta_i given the users' alpha; tau given both.
    """

    def __init__(self, users: Side, items: Side, tau: float, per_row: bool) -> None:
        self.per_row = per_row
        self.user_counts = np.diff(users.offsets).astype(np.float64)
        self.item_counts = np.diff(items.offsets).astype(np.float64)
        self.users = users
        self.tau = float(tau)
        self.alpha = np.ones(len(self.user_counts))
        self.beta = np.ones(len(self.item_counts))
        self.user_shape = self.item_shape = float(SHAPE_GRID[len(SHAPE_GRID) // 2])
        self.ratings = max(int(self.user_counts.sum()), 1)

    def for_users(self) -> tuple[np.ndarray, np.ndarray]:
        """(noise_precision, other_weight) for the user side's op call."""
        return self.tau * self.alpha, self.beta

    def for_items(self) -> tuple[np.ndarray, np.ndarray]:
        return self.tau * self.beta, self.alpha

    def draw_users(self, rng: np.random.Generator, squared: np.ndarray) -> None:
        """Draws alpha given the user pass's per-user sums of beta e^2."""
        if self.per_row:
            self.alpha = _draw_factors(rng, self.user_shape, self.user_counts, self.tau * squared)
            self.user_shape = _draw_shape(rng, self.alpha)

    def draw_items(self, rng: np.random.Generator, squared: np.ndarray) -> None:
        """Draws beta given the item pass's per-movie sums of alpha e^2."""
        if self.per_row:
            self.beta = _draw_factors(rng, self.item_shape, self.item_counts, self.tau * squared)
            self.item_shape = _draw_shape(rng, self.beta)

    def draw_tau(self, rng: np.random.Generator, item_squared: np.ndarray) -> None:
        """Draws tau given the item pass's sums (of alpha e^2) and beta."""
        weighted = float(np.dot(self.beta, item_squared))
        self.tau = rng.gamma(PRIOR_SHAPE + self.ratings / 2,
                             1.0 / (PRIOR_RATE + 0.5 * weighted))

    def noise_std(self) -> float:
        """Root mean square over the ratings of each one's noise std."""
        if not self.per_row:
            return 1.0 / np.sqrt(self.tau)
        running = np.concatenate([[0.0], np.cumsum(1.0 / self.beta[self.users.other])])
        inverse_beta = running[self.users.offsets[1:]] - running[self.users.offsets[:-1]]
        return float(np.sqrt(np.dot(inverse_beta, 1.0 / self.alpha) / (self.tau * self.ratings)))

    def shapes(self) -> tuple[float, float] | None:
        """(user shape, movie shape) with per-row factors, else None."""
        return (self.user_shape, self.item_shape) if self.per_row else None

    def train_rmse(self, item_squared: np.ndarray) -> str:
        """'train RMSE of the draw x, ' where the sums are plain squares (shared)."""
        if self.per_row:
            return ''
        return f'train RMSE of the draw {np.sqrt(item_squared.sum() / self.ratings):.4f}, '

    def spread(self) -> str:
        """', 10th-90th percentile x-y by user, x-y by movie' of the noise std, or ''."""
        if not self.per_row:
            return ''
        users = np.quantile(1.0 / np.sqrt(self.tau * self.alpha), [0.1, 0.9])
        movies = np.quantile(1.0 / np.sqrt(self.tau * self.beta), [0.1, 0.9])
        return (f', 10th-90th percentile {users[0]:.2f}-{users[1]:.2f} by user, '
                f'{movies[0]:.2f}-{movies[1]:.2f} by movie')


def _draw_factors(rng: np.random.Generator, shape: float, counts: np.ndarray,
                  squared: np.ndarray) -> np.ndarray:
    """Each row's precision factor ~ Gamma(shape + n / 2, rate shape + squared / 2)."""
    return np.maximum(rng.gamma(shape + counts / 2, 1.0 / (shape + 0.5 * squared)), 1e-6)


def _draw_shape(rng: np.random.Generator, factors: np.ndarray) -> float:
    """The shared shape a of Gamma(a, a) given the rows' factors, from SHAPE_GRID."""
    n = len(factors)
    log_likelihood = (n * (SHAPE_GRID * np.log(SHAPE_GRID) - _LOG_GAMMA_GRID)
                      + (SHAPE_GRID - 1) * np.log(factors).sum() - SHAPE_GRID * factors.sum())
    weights = np.exp(log_likelihood - log_likelihood.max())
    return float(rng.choice(SHAPE_GRID, p=weights / weights.sum()))


def _precisions(rng: np.random.Generator, table: np.ndarray) -> np.ndarray:
    """Per-column precision draws given a side's rows."""
    return rng.gamma(PRIOR_SHAPE + table.shape[0] / 2,
                     1.0 / (PRIOR_RATE + 0.5 * np.square(table, dtype=np.float64).sum(0)))


def _digest(*tables: np.ndarray | None) -> str:
    """A short digest of the chain's start, so a checkpoint of another start is not resumed."""
    digest = hashlib.sha256()
    for table in tables:
        if table is not None:
            digest.update(np.ascontiguousarray(table).tobytes())
    return digest.hexdigest()[:16]


def average(user_table: np.ndarray, item_table: np.ndarray, global_mean: float,
            user: np.ndarray, item: np.ndarray, rating: np.ndarray, *,
            samples: int, burn_in: int, seed: int, kernel: str = 'auto',
            progress_every: int = 20, user_prior_mean: np.ndarray | None = None,
            noise: str = NOISE_MODELS[0], resume: ChainState | None = None,
            after_sweep: Callable[[int, Callable[[], ChainState], bool], None] | None = None,
            validation: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
            mc_error: float = 0.0, min_samples: int = 1,
            start_scale: float | None = None) -> Result:
    """Runs the chain from the given tables and returns the averaged tables.

    Args:
      user_table, item_table: the trained model's tables ([factors, bias]
        rows); their last features.NUM_OOV_BUCKETS rows are OOV rows, left
        zero.
      global_mean: mu, fixed.
      user, item, rating: the ratings to condition on (vocabulary indices).
      samples: sweeps averaged (>= 1); with `mc_error`, the most.
      burn_in: sweeps run first and dropped.
      seed: seeds every draw.
      kernel: 'auto' (the op, else numpy), 'fused' (the op or
        kernels.KernelUnavailable) or 'tf' (numpy).
      progress_every: log a line every this many sweeps.
      user_prior_mean: the mean of each user row's prior, like user_table
        (None: zero); the user rows are drawn as deviations from it.
      noise: 'shared' (one noise precision) or 'user-movie' (times a factor
        per user and one per movie: `NoisePrecisions`).
      resume: a chain state to continue from (`ChainState`), as `after_sweep`
        got it; ignored, with a log line, if it is another chain's.
      after_sweep: called after each sweep with its number, a function
        that returns the chain's state (the caller checkpoints it when it
        wants: building it copies nothing, saving it costs) and whether it
        was the chain's last.
      validation: (user, item, rating) of the validation slice, for the
        stopping rule (a seeded sample of at most VALIDATION_SAMPLE).
      mc_error: stop at the first kept sweep, from min_samples on, where
        the Monte Carlo error's share of the validation RMSE, V / (2 MSE),
        is at most this (module doc); 0, or no validation ratings: run all
        `samples`.
      min_samples: the fewest sweeps the rule keeps.
      start_scale: the chain starts from the trained factors times this
        (None: START_FACTOR_SCALE; 1: the trained model itself).
    """
    if samples < 1 or burn_in < 0:
        raise ValueError(f'need samples >= 1 and burn_in >= 0, got {samples}, {burn_in}')
    if not (mc_error >= 0 and 1 <= min_samples):
        raise ValueError(f'need mc_error >= 0 and min_samples >= 1, got {mc_error}, '
                         f'{min_samples}')
    if noise not in NOISE_MODELS:
        raise ValueError(f'noise must be one of {NOISE_MODELS}, got {noise!r}')
    start_time = time.perf_counter()
    sample_rows, kernel_used = _sampler(kernel)
    oov = features.NUM_OOV_BUCKETS
    num_users, num_items = user_table.shape[0] - oov, item_table.shape[0] - oov
    width = user_table.shape[1]
    user = np.asarray(user, np.int32)
    item = np.asarray(item, np.int32)
    target = np.asarray(rating, np.float32) - np.float32(global_mean)
    users = Side.group(user, item, target, num_users)
    items = Side.group(item, user, target, num_items)
    rng = np.random.default_rng([_STREAM, seed])
    prior_mean = np.zeros((num_users, width), np.float32)
    if user_prior_mean is not None:
        prior_mean[:] = user_prior_mean[:num_users]
    k = width - 1
    users_now = np.array(user_table[:num_users], np.float32)
    items_now = np.array(item_table[:num_items], np.float32)
    # The chain starts from the trained biases and the trained factors shrunk
    # towards their prior mean (see START_FACTOR_SCALE).
    scale = START_FACTOR_SCALE if start_scale is None else float(start_scale)
    if not 0 <= scale <= 1:
        raise ValueError(f'start_scale must be in [0, 1], got {scale}')
    users_now[:, :k] = prior_mean[:, :k] + np.float32(scale) * (users_now[:, :k]
                                                                - prior_mean[:, :k])
    items_now[:, :k] *= np.float32(scale)
    precisions = NoisePrecisions(
        users, items, 1.0 / max(_squared_error(users_now, items_now, user, item, target)
                                / max(len(target), 1), 1e-6), per_row=noise == 'user-movie')
    shift = _PriorShift(users, prior_mean) if user_prior_mean is not None else None
    user_prior = 1.0 / np.maximum(
        np.square(users_now - prior_mean, dtype=np.float64).mean(0), 1e-6)
    item_prior = 1.0 / np.maximum(np.square(items_now, dtype=np.float64).mean(0), 1e-6)
    products = LowRankSum(COMPRESS_WIDTH * k, KEEP_WIDTH * k)
    user_bias_sum = np.zeros(num_users)
    item_bias_sum = np.zeros(num_items)
    rule = None
    if validation is not None:
        sample = validation_sample(*validation, num_users, num_items, seed)
        if len(sample[2]):
            rule = StopRule(sample[0], sample[1], sample[2] - float(np.float32(global_mean)),
                            mc_error, min_samples)
    if mc_error > 0 and rule is None:
        logger.info('No validation ratings to measure the Monte Carlo error on: the chain '
                    'runs all %d sweeps', samples)
    settings = (samples, burn_in, seed, noise, num_users, num_items, width, len(target),
                _digest(user_table, item_table, user_prior_mean),
                mc_error if rule is not None else 0.0, min_samples, scale,
                _digest(rule.user, rule.item, rule.target) if rule is not None else '')
    first = 1
    stopped = False
    if resume is not None and tuple(resume.settings) != settings:
        logger.warning('The posterior chain checkpoint is of another chain (other flags or '
                       'another trained model: %s, this chain %s); starting afresh',
                       tuple(resume.settings), settings)
    elif resume is not None:
        first = resume.sweep + 1
        users_now, items_now = resume.users_now.copy(), resume.items_now.copy()
        user_prior, item_prior = resume.user_prior.copy(), resume.item_prior.copy()
        precisions.tau, precisions.user_shape, precisions.item_shape = resume.noise
        precisions.alpha, precisions.beta = resume.alpha.copy(), resume.beta.copy()
        rng.bit_generator.state = resume.rng
        products.left = [part.copy() for part in resume.product_left]
        products.right = [part.copy() for part in resume.product_right]
        user_bias_sum, item_bias_sum = resume.user_bias_sum.copy(), resume.item_bias_sum.copy()
        if rule is not None and resume.batches is not None:
            rule.batches.restore(resume.batches)
            rule.update()
        stopped = resume.stopped
        logger.info('Resuming the posterior chain after sweep %d/%d%s', resume.sweep,
                    burn_in + samples, ' (where it had stopped)' if stopped else '')
    noise_std = precisions.noise_std()
    # With a stop level the total is the cap: the time left is at most that.
    progress = logs.ProgressLog('Posterior sweeps' + (' (at most)' if mc_error and rule else ''),
                                total=burn_in + samples - first + 1)

    def chain_state(sweep: int) -> ChainState:
        return ChainState(
            sweep=sweep, settings=settings, users_now=users_now, items_now=items_now,
            user_prior=user_prior, item_prior=item_prior,
            noise=(precisions.tau, precisions.user_shape, precisions.item_shape),
            alpha=precisions.alpha, beta=precisions.beta, rng=rng.bit_generator.state,
            product_left=tuple(products.left), product_right=tuple(products.right),
            # Copies: the running sums are added to in place.
            user_bias_sum=user_bias_sum.copy(), item_bias_sum=item_bias_sum.copy(),
            batches=None if rule is None else rule.batches.state(), stopped=stopped)

    sweep = first - 1
    for sweep in range(first, first if stopped else burn_in + samples + 1):
        items_given = items_now
        deviation, users_mean, squared = sample_rows(
            users if shift is None else shift.side(items_given), items_given,
            user_prior, *precisions.for_users(),
            rng.standard_normal((num_users, width), np.float32))
        users_now, users_mean = deviation + prior_mean, users_mean + prior_mean
        precisions.draw_users(rng, squared)
        items_now, _, squared = sample_rows(
            items, users_now, item_prior, *precisions.for_items(),
            rng.standard_normal((num_items, width), np.float32))
        precisions.draw_items(rng, squared)
        user_prior = _precisions(rng, deviation)
        item_prior = _precisions(rng, items_now)
        precisions.draw_tau(rng, squared)
        if sweep > burn_in:
            products.add(users_mean[:, :k], items_given[:, :k])
            user_bias_sum += users_mean[:, k]
            item_bias_sum += items_given[:, k]
            if rule is not None:
                rule.add(users_mean, items_given)
                stopped = rule.met()
        last = sweep == burn_in + samples or stopped
        if sweep % progress_every == 0 or last:
            noise_std = precisions.noise_std()
            logger.info('Posterior sweep %d/%d (%d burn-in): %snoise std %.4f%s%s',
                        sweep, burn_in + samples, burn_in, precisions.train_rmse(squared),
                        noise_std, precisions.spread(), '' if rule is None else rule.describe())
        if stopped:
            logger.info('Posterior chain stopped after %d kept sweeps: the Monte Carlo '
                        "error's share of the validation RMSE, %.3g%%, is at most %.3g%%",
                        sweep - burn_in, 100 * rule.statistic, 100 * mc_error)
        if after_sweep is not None:
            after_sweep(sweep, lambda sweep=sweep: chain_state(sweep), last)
        progress.add(1)
        if stopped:
            break
    samples = max(sweep - burn_in, 0)
    if samples < 1:
        raise ValueError(f'the chain kept no sweep (resumed after sweep {sweep} of '
                         f'{burn_in} burn-in)')
    left, right = products.truncated(k)
    scale = 1.0 / np.sqrt(samples)
    averaged = []
    for factors, bias, rows in ((left, user_bias_sum, num_users),
                                (right, item_bias_sum, num_items)):
        table = np.zeros((rows + oov, width), np.float32)
        table[:rows, :k] = factors * scale
        table[:rows, k] = bias / samples
        averaged.append(table)
    return Result(user_table=averaged[0], item_table=averaged[1], samples=samples,
                  burn_in=burn_in, seconds=time.perf_counter() - start_time,
                  noise_std=noise_std, kernel=kernel_used, noise=noise,
                  noise_shapes=precisions.shapes(),
                  mc_error=None if rule is None else rule.statistic,
                  mc_error_level=mc_error if rule is not None else 0.0,
                  stopped_by='mc_error' if stopped else 'cap',
                  validation_sample=0 if rule is None else len(rule.target),
                  autocorrelation=None if rule is None else rule.batches.autocorrelation())
