"""Measures what the per-epoch evaluation costs against the training it follows.

Owns the benchmark only.  At ml-25m's shape (users and movies grown from the
rating count as `scale.py` grows them) it builds random train and eval
splits in memory, in (user, item) order as the trainer holds them, and times,
in one process:

- the rating model: one fused epoch over the fit ratings (train minus a 10%
  validation slice; the second epoch, after tracing) on shuffled copies of
  the columns and read through the permutation; what the next epoch's order
  costs before each (`data.shuffle`: TensorFlow's permutation and three
  gathers; `fused.epoch_order`: the same permutation by the C++ op); the
  validation slice and the eval split's seeded sample scored by TensorFlow
  ops and by the C++ op (and the whole eval split, what every epoch scored
  before --epoch-eval-ratings); the checkpoint written after each epoch;
- the top-N model: one iALS iteration on the fit ratings (the second), and
  the validation NDCG@10 ranking of the users the trainer ranked before
  (--ranking-users, 20,000) and of its sample now (--topn-validation-users
  and `trainer.topn.train.VALIDATION_CELLS`).

Each figure is the median of --repeats timings.  The data are random, so
only the seconds mean anything.

    python bench/epoch_eval.py [--ratings 25m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger('bench.epoch_eval')

# ml-25m: 162,541 users and 59,047 movies for 25,000,095 ratings (scale.py's growth).
_ML25M = (25_000_095, 162_541, 59_047)


def _size(text: str) -> int:
    scale = {'k': 1_000, 'm': 1_000_000}.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _shape(ratings: int) -> tuple[int, int]:
    """(users, movies) of ml-25m scaled to this many ratings (scale.py's growth)."""
    share = ratings / _ML25M[0]
    return max(100, round(_ML25M[1] * share)), max(100, round(_ML25M[2] * share ** 0.5))


def _median_seconds(work: Callable[[], object], repeats: int) -> float:
    return _median_wall_and_cpu(work, repeats)[0]


def _median_wall_and_cpu(work: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds of this process (all its threads)."""
    walls, cpus = [], []
    for _ in range(repeats):
        started, cpu = time.perf_counter(), time.process_time()
        work()
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def _ratings(rng: np.random.Generator, size: int, users: int, movies: int):
    import tensorflow as tf
    from trainer import data
    user = rng.integers(0, users, size)
    # Popular movies get more ratings, as in MovieLens (the top 1% of movies about a quarter).
    weight = 1.0 / (np.arange(movies) + 0.002 * movies + 1.0) ** 0.9
    item = rng.choice(movies, size, p=weight / weight.sum())
    order = np.lexsort((item, user))
    return data.Ratings(tf.constant(user[order], tf.int32), tf.constant(item[order], tf.int32),
                        tf.constant(rng.integers(1, 11, size)[order] / 2.0, tf.float32))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--ratings', type=_size, default=_ML25M[0],
                        help='ratings in all (80%% train, 20%% eval); default ml-25m')
    parser.add_argument('--repeats', type=int, default=3, help='timings per figure')
    parser.add_argument('--rating-only', action='store_true',
                        help='time the rating model only, not the top-N model')
    args = parser.parse_args(argv)
    if args.ratings < 10_000 or args.repeats < 1:
        parser.error('--ratings must be at least 10k and --repeats at least 1')
    logging.basicConfig(level=logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    from trainer import config as config_lib
    from trainer import data
    from trainer import features
    import tensorflow as tf
    from trainer.rating import fused, model as model_lib, optimizers
    from trainer.rating import state as state_lib
    from trainer.rating import train as rating_train
    from trainer.topn import train as topn_train

    users, movies = _shape(args.ratings)
    rng = np.random.default_rng(0)
    train = _ratings(rng, round(args.ratings * 0.8), users, movies)
    eval_ = _ratings(rng, args.ratings - len(train), users, movies)
    config = config_lib.make_config(work_dir='unused', model_dir='unused')
    fit, validation = data.split_validation(train, config.validation_percent, 0)
    logger.info('%d users, %d movies: %d fit, %d validation, %d eval ratings', users, movies,
                len(fit), len(validation), len(eval_))

    rows = (users + features.NUM_OOV_BUCKETS, movies + features.NUM_OOV_BUCKETS)
    model = model_lib.MatrixFactorization(*rows[:2], config.num_factors, global_mean=3.5,
                                          init_stddev=0.1, seed=0)
    optimizer = optimizers.make_optimizer('adam', model.parameters(), 0.01)
    epoch = fused.make_epoch(model, optimizer, model_lib.penalty_weights(
        config.num_factors, 0.05, config.l2_bias), config.batch_size, 0.5, 5.0)
    shuffled = data.shuffle(fit, 1)
    order = fused.epoch_order(len(fit), 1)
    scorers = {kernel: rating_train.make_scorer(model, 0.5, 5.0, config.eval_batch_size,
                                                kernel)
               for kernel in ('tf', 'auto')}
    sample = data.sample(eval_, config.epoch_eval_ratings, 0)
    epoch(shuffled.user, shuffled.item, shuffled.rating, None, None)  # traces
    epoch(fit.user, fit.item, fit.rating, None, None, order)
    for score in scorers.values():
        for ratings in (validation, eval_, sample):  # a trace per shape
            score(ratings)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                     best=state_lib.BestEpoch(model))
    with tempfile.TemporaryDirectory() as scratch:
        manager = tf.train.CheckpointManager(checkpoint, scratch, max_to_keep=2)
        numbers = iter(range(1, 1 + args.repeats))
        saving = _median_wall_and_cpu(
            lambda: manager.save(checkpoint_number=next(numbers)), args.repeats)
    timed = {
        'epoch, shuffled copies': lambda: epoch(shuffled.user, shuffled.item,
                                                shuffled.rating, None, None).numpy(),
        'epoch, through the order': lambda: epoch(fit.user, fit.item, fit.rating,
                                                  None, None, order).numpy(),
        'shuffle, tf': lambda: data.shuffle(fit, 2).rating.numpy(),
        'order, op': lambda: fused.epoch_order(len(fit), 2).numpy(),
        'validation, tf': lambda: scorers['tf'](validation),
        'validation, op': lambda: scorers['auto'](validation),
        'eval all, tf': lambda: scorers['tf'](eval_),
        'eval sample, tf': lambda: scorers['tf'](sample),
        'eval sample, op': lambda: scorers['auto'](sample)}
    measured = {name: _median_wall_and_cpu(work, args.repeats) for name, work in timed.items()}
    measured['checkpoint'] = saving
    figures = {name: wall for name, (wall, _) in measured.items()}
    print(f'rating model, {args.ratings:,} ratings ({len(fit):,} fit, {len(validation):,} '
          f'validation, {len(eval_):,} eval, sample {len(sample):,}), load '
          f'{os.getloadavg()[0]:.1f}:')
    print('  wall s (CPU s of this process, all threads; the epochs spin while waiting):')
    for name, (wall, cpu) in measured.items():
        print(f'  {name}: {wall:.3f} s ({cpu:.3f} s)')
    for name, parts in (
            ('all eval, tf', ('shuffle, tf', 'validation, tf', 'eval all, tf')),
            ('eval sample, tf', ('shuffle, tf', 'validation, tf', 'eval sample, tf')),
            ('ops', ('order, op', 'validation, op', 'eval sample, op'))):
        trained = figures['epoch, shuffled copies' if 'tf' in name
                          else 'epoch, through the order']
        evaluation = figures[parts[1]] + figures[parts[2]]
        outside = sum(figures[part] for part in parts) + figures['checkpoint']
        print(f'  {name}: evaluation {evaluation:.3f} s ({evaluation / trained:.1%} of the '
              f'epoch\'s training), outside the training {outside:.2f} s, epoch '
              f'{trained + outside:.2f} s')

    if args.rating_only:
        return 0
    config = dataclasses.replace(
        config, topn_unobserved_weight=config_lib.default_unobserved_weight(movies),
        topn_l2=config_lib.default_topn_l2(len(train), users, movies))
    iterator = topn_train._Iterator(config, fit, rows)
    state = topn_train._fresh(config, 'search', rows)
    iterator.step(state)
    solve = _median_seconds(lambda: iterator.step(state), args.repeats)
    line = f'top-N model: iteration {solve:.2f} s'
    for name, settings in (('before', {'topn_validation_users': 0}), ('now', {})):
        validate = topn_train._Validation(dataclasses.replace(config, **settings), fit,
                                          validation, rows, 0)
        validate.ndcg(state)
        seconds = _median_seconds(lambda: validate.ndcg(state), args.repeats)
        line += (f'; validation {name}: {validate.judged.users.size:,} of '
                 f'{validate.judged.users_in_eval:,} users {seconds:.2f} s '
                 f'({seconds / (solve + seconds):.0%} of the iteration)')
    print(line)
    return 0


if __name__ == '__main__':
    sys.exit(main())
