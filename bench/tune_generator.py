"""Calibration check: do models rank on generated data as on real MovieLens 100k?

Generates one data set (`trainer.pipeline.synthetic`, `--set field=value` overrides
any `SyntheticConfig` field), splits it 80/20 by a seeded draw and fits, on
the same split: Surprise's BaselineOnly, SVD with its defaults, SVD as tuned
on real ml-100k (100 factors, 80 epochs, lr 0.005, reg 0.1), a plain
per-rating SGD biased MF (Surprise SVD with 512 factors, init std 0.003,
reg 0.05, lr 0.005, 60 epochs; `--plain-factors` and `--plain-init` vary
it) and this trainer with its defaults (trained and posterior mean).  It
prints each ratio next to the one real ml-100k gives (`REAL_RATIOS`,
sources in docs/data.md), which is what the movielens model's defaults were
chosen to reproduce.  Needs scikit-surprise (bench/requirements.txt).

    python bench/tune_generator.py
    python bench/tune_generator.py --set noise_std=0.85 --set user_noise_sigma=0.4
    python bench/tune_generator.py --plain-factors 256,512,1024 --plain-init 0.003,0.1
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from collections.abc import Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tune_defaults  # noqa: E402
from trainer import config as config_lib  # noqa: E402
from trainer.pipeline import synthetic  # noqa: E402
from trainer.rating import train  # noqa: E402

# Real ml-100k: each model's RMSE over the one it is compared with.
# BaselineOnly / global mean and SVD defaults / BaselineOnly from Surprise's
# 5-fold benchmark (0.944, 0.934) and a global-mean RMSE of 1.1205; the rest
# from one 80/20 split of the real archive (tuned SVD 0.9106, trainer 0.9128
# trained and 0.9099 posterior mean, plain SGD MF 0.988-0.992x tuned SVD).
REAL_RATIOS = {
    'BaselineOnly / global mean': 0.944 / 1.1205,
    'SVD defaults / BaselineOnly': 0.934 / 0.944,
    'SVD tuned / BaselineOnly': 0.9106 / 0.944,
    'plain SGD MF / SVD tuned': 0.990,
    'trainer, trained / SVD tuned': 0.9128 / 0.9106,
    'trainer, posterior mean / SVD tuned': 0.9099 / 0.9106,
}


def parse_overrides(items: Sequence[str], parser: argparse.ArgumentParser) -> dict:
    """--set field=value pairs, typed like the SyntheticConfig field's default."""
    fields = {field.name: field for field in dataclasses.fields(synthetic.SyntheticConfig)}
    overrides = {}
    for item in items:
        name, _, text = item.partition('=')
        if name not in fields or not text:
            parser.error(f'--set {item!r}: pass field=value with a SyntheticConfig field, '
                         f'one of {sorted(fields)}')
        kind = str if name in ('layout', 'model') else int if name in (
            'num_users', 'num_movies', 'num_ratings', 'seed', 'rank') else float
        try:
            overrides[name] = kind(text)
        except ValueError:
            parser.error(f'--set {item!r}: {text!r} is not a {kind.__name__}')
    return overrides


def surprise_rmse(algo, trainset, testset) -> float:
    from surprise import accuracy  # benchmark-only dependency
    algo.fit(trainset)
    return float(accuracy.rmse(algo.test(testset), verbose=False))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE')
    parser.add_argument('--plain-factors', default='512')
    parser.add_argument('--plain-init', default='0.003')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        import pandas as pd
        from surprise import SVD, BaselineOnly, Dataset, Reader
    except ImportError:
        parser.error('needs scikit-surprise: .venv/bin/pip install -r bench/requirements.txt '
                     '-c constraints.txt')
    try:
        config = synthetic.SyntheticConfig(**parse_overrides(args.set, parser))
    except ValueError as error:
        parser.error(f'--set: {error}')
    data = synthetic.generate(config)
    is_eval = np.random.default_rng(3).random(data.ratings.size) < 0.2  # as tune_defaults
    frame = pd.DataFrame({'user': data.user_ids, 'movie': data.movie_ids,
                          'rating': data.ratings})
    trainset = Dataset.load_from_df(frame[~is_eval], Reader(
        rating_scale=(float(data.ratings.min()), float(data.ratings.max())))
    ).build_full_trainset()
    testset = list(frame[is_eval].itertuples(index=False, name=None))
    eval_ratings = data.ratings[is_eval].astype(np.float64)
    rmse = {'global mean': float(np.sqrt(np.mean(
        (eval_ratings - data.ratings[~is_eval].mean()) ** 2)))}
    rmse['BaselineOnly'] = surprise_rmse(BaselineOnly(verbose=False), trainset, testset)
    rmse['SVD defaults'] = surprise_rmse(SVD(random_state=0), trainset, testset)
    rmse['SVD tuned'] = surprise_rmse(SVD(n_factors=100, n_epochs=80, lr_all=0.005,
                                          reg_all=0.1, random_state=0), trainset, testset)
    plain = {}
    for factors in (int(f) for f in args.plain_factors.split(',')):
        for init in (float(i) for i in args.plain_init.split(',')):
            plain[factors, init] = surprise_rmse(SVD(
                n_factors=factors, n_epochs=60, lr_all=0.005, reg_all=0.05,
                init_std_dev=init, random_state=0), trainset, testset)
    rmse['plain SGD MF'] = plain[next(iter(plain))]
    with tempfile.TemporaryDirectory() as work_dir:
        info, floor = tune_defaults.write_transformed(work_dir, config)
        result = train.train(config_lib.make_config(
            work_dir=work_dir, model_dir=os.path.join(work_dir, 'model')),
            info, config.num_users, config.num_movies)
    rmse['trainer, posterior mean'] = result.final.eval_rmse
    rmse['trainer, trained'] = (result.posterior['before']['eval_rmse'] if result.posterior
                                else result.final.eval_rmse)
    print(f'{config.model} {config.layout} {config.num_ratings} ratings; eval noise floor '
          f'{floor:.4f}; overrides {args.set or "none"}')
    print('| ratio | generated | real ml-100k |\n| --- | --- | --- |')
    for name, real in REAL_RATIOS.items():
        top, bottom = name.split(' / ')
        print(f'| {name} | {rmse[top] / rmse[bottom]:.3f} ({rmse[top]:.4f}) | {real:.3f} |')
    print('| plain SGD MF (factors, init std) | eval RMSE | / SVD tuned |\n| --- | --- | --- |')
    for (factors, init), value in plain.items():
        print(f'| {factors}, {init} | {value:.4f} | {value / rmse["SVD tuned"]:.3f} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
