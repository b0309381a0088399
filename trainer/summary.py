"""The closing summary of run-local.sh / run-cloud.sh, from the files the steps wrote.

    python -m trainer.summary --work-dir DIR [--chart fig/x.png] [--step-seconds NAME=1234ms ...]

Reads raw/source.json, transformed/dataset_info.json and model/metrics.json;
computes nothing new.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from trainer import features


def _step_seconds(value: str) -> tuple[str, float]:
    name, _, amount = value.partition('=')
    if not name or not amount.endswith('ms') or not amount[:-2].isdigit():
        raise argparse.ArgumentTypeError(f'{value!r} is not NAME=<milliseconds>ms')
    return name, int(amount[:-2]) / 1000


def format_summary(info: features.DatasetInfo, metrics: dict, model_dir: str,
                   chart: str | None, steps: Sequence[tuple[str, float]]) -> str:
    """The lines of the closing summary."""
    lines = [
        f'== {info.dataset}: {info.rows_read} rows read, {info.rows_accepted} accepted, '
        f'{info.rows_rejected} rejected; train {info.train_ratings}, eval {info.eval_ratings}; '
        f'{info.users} users, {info.movies} movies',
        f'== eval RMSE {metrics["eval_rmse"]:.4f} (MAE {metrics["eval_mae"]:.4f}) after '
        f'{metrics["epochs"]} epochs; predicting the train mean: {info.global_mean_eval_rmse:.4f}',
    ]
    if info.noise_floor_rmse is not None:
        lines.append(f'== planted noise floor {info.noise_floor_rmse:.4f} '
                     f'(eval RMSE is {metrics["eval_rmse"] / info.noise_floor_rmse:.3f}x it)')
    ranking = metrics.get('ranking')
    if ranking:
        lines.append(
            f'== top-{ranking["k"]} on eval: NDCG {ranking["model"]["ndcg"]:.4f}, '
            f'recall {ranking["model"]["recall"]:.4f}, coverage {ranking["model"]["coverage"]:.3f}; '
            + (f'ranked by predicted rating: NDCG {ranking["rating_model"]["ndcg"]:.4f}; '
               if 'rating_model' in ranking else '')
            + f'most popular: NDCG {ranking["most_popular"]["ndcg"]:.4f}, '
            f'recall {ranking["most_popular"]["recall"]:.4f}')
    if steps:
        lines.append('== seconds: ' + ', '.join(f'{name} {seconds:.1f}'
                                                for name, seconds in steps)
                     + f' (total {sum(seconds for _, seconds in steps):.1f})')
    lines.append(f'== model: {metrics.get("export_dir", features.join(model_dir, features.EXPORT_DIR))}')
    lines.append(f'== loss log: {features.join(model_dir, features.LOSS_LOG_FILE)}'
                 + (f'; chart: {chart}' if chart else ''))
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--work-dir', required=True)
    parser.add_argument('--model-dir', help='default: WORK_DIR/model')
    parser.add_argument('--chart')
    parser.add_argument('--step-seconds', type=_step_seconds, action='append', default=[])
    args = parser.parse_args(argv)
    work_dir = args.work_dir.rstrip('/')
    model_dir = args.model_dir or features.default_model_dir(work_dir)
    info = features.read_dataset_info(work_dir)
    metrics = features.read_json(features.join(model_dir, features.METRICS_FILE))
    print(format_summary(info, metrics, model_dir, args.chart, args.step_seconds))
    return 0


if __name__ == '__main__':
    sys.exit(main())
