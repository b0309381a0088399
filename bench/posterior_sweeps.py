"""Measures posterior averaging against its sweep count: eval RMSE, seconds and
the stopping rule's statistic.

Owns the benchmark only.  On a work dir that preprocess.py wrote, it trains
the rating model as the trainer does by default (search, refit;
--posterior-samples 0), keeps its tables in --tables (reused by a later
run), then runs one chain of --sweeps kept sweeps after --burn-in, as the
trainer would with `--posterior-mc-error 0`.  After every kept sweep it
records the sweep's seconds and the stopping rule's statistic (the Monte
Carlo error's share of the validation RMSE, `trainer.rating.posterior`),
and every --every sweeps the eval RMSE of the model the trainer would
export had it stopped there.  The rule draws no random numbers, so an
adaptive chain is this chain stopped at the rule's sweep: the table also
says where each --levels would stop and what it would score.

    python bench/posterior_sweeps.py --work-dir W --job-dir J [--sweeps 100]

Prints a table; --json-out keeps the rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger('bench.posterior_sweeps')


def _trained(args: argparse.Namespace):
    """(user_table, item_table, global_mean, splits, info): the trained model and its data."""
    from trainer import config as config_lib
    from trainer import data, features
    from trainer.rating import train as train_lib
    flags = ['--work-dir', args.work_dir, '--job-dir', args.job_dir,
             '--posterior-samples', '0', '--overwrite']
    for flag in ('num_epochs', 'final_model'):
        if getattr(args, flag):
            flags += ['--' + flag.replace('_', '-'), getattr(args, flag)]
    config = config_lib.parse_args(flags)
    info = features.read_dataset_info(config.work_dir)
    config = config_lib.with_data_defaults(config, info)
    if args.tables and os.path.exists(args.tables):
        saved = np.load(args.tables)
        splits = train_lib.load_splits(config, info)
        return saved['user'], saved['item'], float(saved['mu']), splits, info, config
    sizes = data.read_vocabulary_sizes(features.transformed_dir(config.work_dir))
    result = train_lib.train(config, info, *sizes)
    model = result.model
    tables = (model.user_embedding.numpy(), model.item_embedding.numpy(),
              float(model.global_mean.numpy()))
    if args.tables:
        np.savez(args.tables, user=tables[0], item=tables[1], mu=tables[2])
    return (*tables, result.splits, info, config)


def _rmse(user_table, item_table, mu, ratings, low, high) -> float:
    """RMSE of the served prediction (clipped to the scale), a chunk at a time."""
    user, item = ratings.user.numpy(), ratings.item.numpy()
    rating = ratings.rating.numpy().astype(np.float64)
    k = user_table.shape[1] - 1
    total = 0.0
    for lo in range(0, len(rating), 1 << 20):
        hi = lo + (1 << 20)
        rows, columns = user_table[user[lo:hi]], item_table[item[lo:hi]]
        predicted = (mu + rows[:, k] + columns[:, k]
                     + np.einsum('nk,nk->n', rows[:, :k], columns[:, :k]))
        total += float(np.square(np.clip(predicted, low, high) - rating[lo:hi]).sum())
    return float(np.sqrt(total / max(len(rating), 1)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--work-dir', required=True, help='a work dir preprocess.py wrote')
    parser.add_argument('--job-dir', required=True, help='where the trainer writes')
    parser.add_argument('--tables', help='an .npz keeping the trained tables (reused if present)')
    parser.add_argument('--sweeps', type=int, default=100, help='kept sweeps (default 100)')
    parser.add_argument('--burn-in', type=int, default=20, help='burn-in sweeps (default 20)')
    parser.add_argument('--every', type=int, default=10,
                        help='score the eval split every this many kept sweeps')
    parser.add_argument('--levels', default='0.002,0.001,0.0005',
                        help='stop levels to report (comma-separated)')
    parser.add_argument('--min-samples', type=int, default=20,
                        help='the rule\'s fewest kept sweeps (default 20)')
    parser.add_argument('--start-scales',
                        help="the chains' start factor scales, comma-separated, one chain "
                             'each (default: posterior.START_FACTOR_SCALE)')
    parser.add_argument('--num-epochs', help='trainer --num-epochs (default: its own)')
    parser.add_argument('--final-model', help='trainer --final-model (default: its own)')
    parser.add_argument('--json-out', help='where the rows go as JSON')
    parser.add_argument('--predictions-out',
                        help="an .npy for each kept sweep's predictions of the rule's "
                             'validation sample (float32, kept sweeps x ratings), and its '
                             'targets in the same name with .target.npy')
    args = parser.parse_args(argv)
    if args.sweeps < 1 or args.burn_in < 0 or args.every < 1:
        parser.error('--sweeps and --every must be >= 1, --burn-in >= 0')
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    from trainer.rating import posterior
    user_table, item_table, mu, splits, info, config = _trained(args)
    load = os.getloadavg()
    logger.info('load average %.2f %.2f %.2f on %d CPUs', *load, os.cpu_count())
    scales = ([float(text) for text in args.start_scales.split(',')] if args.start_scales
              else [posterior.START_FACTOR_SCALE])
    for scale in scales:
        posterior.START_FACTOR_SCALE = scale
        suffix = '' if len(scales) == 1 else f'-start{scale:g}'
        print(f'start factor scale {scale:g}')
        _measure(args, user_table, item_table, mu, splits, info, config, suffix)
    return 0


def _measure(args, user_table, item_table, mu, splits, info, config, suffix: str) -> None:
    """One chain: its rows printed, and kept as --json-out and --predictions-out say."""
    from trainer import features
    from trainer.rating import posterior
    load = os.getloadavg()
    k = user_table.shape[1] - 1
    # The ratings the trainer's chain conditions on: all of train after a refit.
    train = splits.train if config.final_model == 'refit' else splits.fit
    validation = (splits.validation.user.numpy(), splits.validation.item.numpy(),
                  splits.validation.rating.numpy())
    rows: list[dict] = []
    levels = [float(text) for text in args.levels.split(',') if text]
    stops: dict[float, int] = {}
    predictions: list[np.ndarray] = []
    previous = [0.0]
    clock = {'last': time.perf_counter(), 'bench': 0.0, 'sweeps': 0.0}

    def after_sweep(sweep, chain, last):
        now = time.perf_counter()
        clock['sweeps'] += now - clock['last']
        kept = sweep - args.burn_in
        row = {'sweep': sweep, 'kept': kept, 'seconds': clock['sweeps']}
        state = chain()
        if kept >= 1 and state.batches is not None and args.predictions_out:
            total = state.batches['total']
            predictions.append((total - previous[0]).astype(np.float32))
            previous[0] = total.copy()
        if kept >= 1 and state.batches is not None:
            batches = posterior.BatchMeans(len(state.batches['total']))
            batches.restore(state.batches)
            row['autocorrelation'] = batches.autocorrelation()
            row['statistic'] = posterior.mc_error_share(batches, target[0])
        for level in levels:
            if (level not in stops and kept >= args.min_samples
                    and row.get('statistic') is not None and row['statistic'] <= level):
                stops[level] = kept
        if kept >= 1 and (kept % args.every == 0 or last or kept in stops.values()):
            total = posterior.LowRankSum(0, 0)
            total.left, total.right = list(state.product_left), list(state.product_right)
            left, right = total.truncated(k)
            tables = []
            for factors, bias, table in ((left, state.user_bias_sum, user_table),
                                         (right, state.item_bias_sum, item_table)):
                exported = np.zeros_like(table)
                exported[:len(bias), :k] = factors / np.sqrt(kept)
                exported[:len(bias), k] = bias / kept
                tables.append(exported)
            row['eval_rmse'] = _rmse(*tables, mu, splits.eval, info.rating_min,
                                     info.rating_max)
            logger.info('kept %d: eval RMSE %.4f, statistic %s, %.1f s of sweeps', kept,
                        row['eval_rmse'], row.get('statistic'), row['seconds'])
        rows.append(row)
        clock['last'] = time.perf_counter()

    # The rule's sample as `average` draws it (seed 0, the trainer's default).
    users, items = user_table.shape[0], item_table.shape[0]
    oov = features.NUM_OOV_BUCKETS
    sample = posterior.validation_sample(*validation, users - oov, items - oov, 0)
    target = [sample[2] - float(np.float32(mu))]
    trained_eval = _rmse(user_table, item_table, mu, splits.eval, info.rating_min,
                         info.rating_max)
    logger.info('trained model: eval RMSE %.4f', trained_eval)
    clock['last'] = time.perf_counter()
    posterior.average(
        user_table, item_table, mu, train.user.numpy(), train.item.numpy(),
        train.rating.numpy(), samples=args.sweeps, burn_in=args.burn_in, seed=0,
        after_sweep=after_sweep, validation=validation, mc_error=0.0,
        min_samples=args.min_samples)
    logger.info('chain: %d sweeps in %.1f s (%.2f s a sweep, bench work excluded)',
                args.burn_in + args.sweeps, clock['sweeps'],
                clock['sweeps'] / (args.burn_in + args.sweeps))
    print(f'ratings {len(train):,} train, {len(splits.eval):,} eval; trained model eval '
          f'RMSE {trained_eval:.4f}; load average {load[0]:.2f} on {os.cpu_count()} CPUs')
    print('| kept sweeps | sweeps s (incl. burn-in) | MC error / validation RMSE | '
          'autocorrelation | eval RMSE |')
    print('| --- | --- | --- | --- | --- |')
    for row in rows:
        if 'eval_rmse' in row:
            statistic = row.get('statistic')
            tau = row.get('autocorrelation')
            print(f"| {row['kept']} | {row['seconds']:.1f} | "
                  f"{'-' if statistic is None else f'{100 * statistic:.3f}%'} | "
                  f"{'-' if tau is None else f'{tau:.1f}'} | {row['eval_rmse']:.4f} |")
    for level in levels:
        stop = next((row for row in rows if row['kept'] >= args.min_samples
                     and row.get('statistic') is not None and row['statistic'] <= level), None)
        print(f'level {100 * level:g}%: ' + ('runs to the cap' if stop is None else
              f"stops after {stop['kept']} kept sweeps, {stop['seconds']:.1f} s of sweeps, "
              f"eval RMSE {stop['eval_rmse']:.4f}"))
    if args.predictions_out:
        stem = args.predictions_out.removesuffix('.npy') + suffix
        np.save(stem + '.npy', np.stack(predictions))
        np.save(stem + '.target.npy', target[0])
    if args.json_out:
        with open(args.json_out.removesuffix('.json') + suffix + '.json', 'w',
                  encoding='utf-8') as f:
            json.dump({'rows': rows, 'trained_eval_rmse': trained_eval, 'load': load,
                       'burn_in': args.burn_in, 'train_ratings': len(train)}, f, indent=1)


if __name__ == '__main__':
    sys.exit(main())
