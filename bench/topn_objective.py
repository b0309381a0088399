"""Measures the top-N objective that topn_log.csv reports, as computed before and now.

Owns the benchmark only.  At ml-25m's shape (users and movies grown from the
rating count as `scale.py` grows them; random ratings in memory, movies drawn
by popularity) it times, in one process, on the fit ratings:

- one iALS iteration in the C++ op, without and with the movie half-step's
  rated loss (`ials_solve.cc`'s with_loss: one more pass over each movie's
  gathered user rows);
- the objective by a pass over the rated pairs (`ials.objective`: both factor
  rows of every pair gathered, what every iteration did before) and from the
  op's rated loss (`ials.objective_from_rated`, what it does now);

and checks that the two objectives agree.  Each figure is the median of
--repeats timings.  The data are random, so only the seconds mean anything.

    python bench/topn_objective.py [--ratings 25m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The ml-25m shape, its random ratings, the size flag and the timer are epoch_eval's
# (no TensorFlow at import).
from epoch_eval import _ML25M, _median_seconds, _ratings, _shape, _size  # noqa: E402

logger = logging.getLogger('bench.topn_objective')


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--ratings', type=_size, default=_ML25M[0],
                        help='ratings in all (80%% train); default ml-25m')
    parser.add_argument('--repeats', type=int, default=3, help='timings per figure')
    args = parser.parse_args(argv)
    if args.ratings < 10_000 or args.repeats < 1:
        parser.error('--ratings must be at least 10k and --repeats at least 1')
    logging.basicConfig(level=logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    from trainer import config as config_lib
    from trainer import data
    from trainer import features
    from trainer.topn import train as topn_train

    users, movies = _shape(args.ratings)
    train = _ratings(np.random.default_rng(0), round(args.ratings * 0.8), users, movies)
    config = config_lib.make_config(work_dir='unused', model_dir='unused')
    fit, _ = data.split_validation(train, config.validation_percent, 0)
    config = dataclasses.replace(
        config, topn_unobserved_weight=config_lib.default_unobserved_weight(movies),
        topn_l2=config_lib.default_topn_l2(len(train), users, movies))
    rows = (users + features.NUM_OOV_BUCKETS, movies + features.NUM_OOV_BUCKETS)
    logger.info('%d users, %d movies: %d fit ratings, %d factors', users, movies, len(fit),
                config.topn_factors)
    iterator = topn_train._Iterator(config, fit, rows)
    if iterator.ops is None:
        print('no C++ ops here: nothing to compare')
        return 1
    state = topn_train._fresh(config, 'search', rows)
    iterator.step(state)

    def step_without_loss():
        state.user_factors, _ = iterator._solve(0, state.user_factors, state.item_factors)
        state.item_factors, _ = iterator._solve(1, state.item_factors, state.user_factors)
    without = _median_seconds(step_without_loss, args.repeats)
    with_loss = _median_seconds(lambda: iterator.step(state), args.repeats)
    now = _median_seconds(lambda: iterator.objective(state), args.repeats)
    fast = iterator.objective(state)
    iterator._rated_loss = None  # the pass over the pairs, as before
    before = _median_seconds(lambda: iterator.objective(state), args.repeats)
    direct = iterator.objective(state)
    print(f'top-N model, {len(fit):,} fit ratings, {users:,} users, {movies:,} movies: '
          f'iteration {without:.2f} s, with the rated loss {with_loss:.2f} s; objective '
          f'before {before:.2f} s (a pass over the pairs), now {now:.2f} s (from the op); '
          f'the two agree to {abs(fast - direct) / abs(direct):.1e}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
