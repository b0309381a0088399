"""Grid search of the trainer's defaults on generated MovieLens-like ratings.

Generates one data set (`trainer.pipeline.synthetic`, the calibrated `movielens`
model by default), splits it 80/20 by a seeded draw, writes the split as
transformed TFRecords and trains every grid point with `trainer.rating.train`,
printing one table row per point: eval RMSE, its ratio to the planted noise
floor, epochs and seconds.  Grid axes are comma lists; every combination
runs, so keep them short (each 100k point takes seconds, each 1M point
about a minute on 2 cores, longer with posterior sweeps of many factors).

    python bench/tune_defaults.py --num-factors 16,64,256 --init-stddev 0.1,0.01 \\
        --posterior-samples 0
    python bench/tune_defaults.py --num-users 6040 --num-movies 3706 \\
        --num-ratings 1000209 --layout ml-1m --num-factors 16,128
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer import config as config_lib  # noqa: E402
from trainer import features  # noqa: E402
from trainer.pipeline import synthetic  # noqa: E402
from trainer.rating import train  # noqa: E402

# Grid axes: flag, TrainConfig field, type.
_AXES = (('--num-factors', 'num_factors', int), ('--init-stddev', 'init_stddev', float),
         ('--l2', 'l2', float), ('--learning-rate', 'learning_rate', float),
         ('--num-epochs', 'num_epochs', int),
         ('--posterior-samples', 'posterior_samples', int))


def write_split(path: str, users: np.ndarray, items: np.ndarray,
                ratings: np.ndarray) -> None:
    """One GZIP TFRecord shard of transformed examples (0-based ids)."""
    with tf.io.TFRecordWriter(path, options='GZIP') as writer:
        for user, item, rating in zip(users.tolist(), items.tolist(), ratings.tolist()):
            writer.write(tf.train.Example(features=tf.train.Features(feature={
                features.USER: tf.train.Feature(int64_list=tf.train.Int64List(value=[user])),
                features.ITEM: tf.train.Feature(int64_list=tf.train.Int64List(value=[item])),
                features.RATING: tf.train.Feature(
                    float_list=tf.train.FloatList(value=[rating]))})).SerializeToString())


def write_transformed(work_dir: str, config: synthetic.SyntheticConfig,
                      split_seed: int = 3) -> tuple[features.DatasetInfo, float]:
    """Generates `config`, writes an 80/20 split under work_dir; returns info and eval floor."""
    data = synthetic.generate(config)
    layout = features.DATASETS[config.layout]
    is_eval = np.random.default_rng(split_seed).random(data.ratings.size) < 0.2
    users, items = data.user_ids - 1, data.movie_ids - 1
    os.makedirs(features.transformed_dir(work_dir), exist_ok=True)
    for split, mask in ((features.TRAIN, ~is_eval), (features.EVAL, is_eval)):
        write_split(features.split_prefix(work_dir, split) + '-00000-of-00001'
                    + features.TFRECORD_SUFFIX, users[mask], items[mask], data.ratings[mask])
    train_mean = float(data.ratings[~is_eval].mean())
    eval_ratings = data.ratings[is_eval].astype(np.float64)
    info = features.DatasetInfo(
        dataset=features.SYNTHETIC, layout=config.layout, seed=0, eval_percent=20.0,
        rows_read=data.ratings.size, rows_accepted=data.ratings.size, rows_rejected=0,
        rejected_by_reason={}, train_ratings=int((~is_eval).sum()),
        eval_ratings=int(is_eval.sum()), users=config.num_users, movies=config.num_movies,
        train_mean_rating=train_mean,
        global_mean_eval_rmse=float(np.sqrt(np.mean((eval_ratings - train_mean) ** 2))),
        rating_min=layout.rating_min, rating_max=layout.rating_max,
        train_pattern=features.split_pattern(work_dir, features.TRAIN),
        eval_pattern=features.split_pattern(work_dir, features.EVAL))
    oracle = data.oracle[is_eval].astype(np.float64)
    return info, float(np.sqrt(np.mean((oracle - eval_ratings) ** 2)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', choices=synthetic.SYNTHETIC_MODELS,
                        default=synthetic.MOVIELENS)
    parser.add_argument('--num-users', type=int, default=943)
    parser.add_argument('--num-movies', type=int, default=1682)
    parser.add_argument('--num-ratings', type=int, default=100_000)
    parser.add_argument('--layout', choices=tuple(features.DATASETS), default='ml-100k')
    parser.add_argument('--data-seed', type=int, default=0)
    for flag, _, kind in _AXES:
        parser.add_argument(flag, default=None,
                            help=f'comma list of {kind.__name__}s (default: the trainer default)')
    return parser


def grid(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[dict]:
    """Every combination of the given axes, as TrainConfig overrides."""
    axes = []
    for flag, field, kind in _AXES:
        text = getattr(args, field)
        if text is None:
            continue
        try:
            axes.append([(field, kind(value)) for value in text.split(',')])
        except ValueError:
            parser.error(f'{flag} {text!r}: pass a comma list of {kind.__name__}s, e.g. 16,64')
    return [dict(point) for point in itertools.product(*axes)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data_config = synthetic.SyntheticConfig(
        num_users=args.num_users, num_movies=args.num_movies, num_ratings=args.num_ratings,
        layout=args.layout, seed=args.data_seed, model=args.model)
    points = grid(args, parser)
    with tempfile.TemporaryDirectory() as work_dir:
        info, floor = write_transformed(work_dir, data_config)
        print(f'{args.model} {args.layout} {args.num_ratings} ratings: eval noise floor '
              f'{floor:.4f}, global mean {info.global_mean_eval_rmse:.4f}')
        print('| setting | eval RMSE | x floor | trained | epochs | seconds |')
        print('| --- | --- | --- | --- | --- | --- |')
        for number, point in enumerate(points):
            trainer_config = config_lib.make_config(
                work_dir=work_dir, model_dir=os.path.join(work_dir, f'model{number}'),
                **point)
            start = time.time()
            result = train.train(trainer_config, info, args.num_users, args.num_movies)
            seconds = time.time() - start
            before = (result.posterior['before']['eval_rmse'] if result.posterior
                      else result.final.eval_rmse)
            setting = ' '.join(f'{k}={v}' for k, v in point.items()) or 'defaults'
            print(f'| {setting} | {result.final.eval_rmse:.4f} | '
                  f'{result.final.eval_rmse / floor:.3f} | {before:.4f} | '
                  f'{result.best_epoch} | {seconds:.1f} |', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
