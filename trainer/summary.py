"""The closing summary of run-local.sh / run-cloud.sh, from the files the steps wrote.

    python -m trainer.summary --work-dir DIR [--chart fig/x.png] [--step-seconds NAME=1234ms ...]

Reads transformed/dataset_info.json, model/metrics.json and the first rating
of the staged ratings file (a real user id for the next command to try);
computes nothing new.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from trainer import config
from trainer import features
from trainer import fileio
from trainer import phases


def _step_seconds(value: str) -> tuple[str, float]:
    name, _, amount = value.partition('=')
    if not name or not amount.endswith('ms') or not amount[:-2].isdigit():
        raise argparse.ArgumentTypeError(f'{value!r} is not NAME=<milliseconds>ms')
    return name, int(amount[:-2]) / 1000


def first_user_id(work_dir: str, layout: features.DatasetLayout) -> str | None:
    """The user id of the staged ratings file's first rating; None when it is gone."""
    path = features.join(features.raw_dir(work_dir), layout.ratings_file)
    if not fileio.exists(path):
        return None
    with fileio.open_file(path, 'rb') as stream:
        if layout.ratings_header:
            stream.readline()
        line = stream.readline().decode('utf-8', errors='replace')
    user_id = line.split(layout.ratings_separator, 1)[0].strip()
    return user_id or None


def next_commands(model_dir: str, chart: str | None, user_id: str | None) -> list[str]:
    """What to try next: recommendations for a real user, and the chart."""
    lines = []
    if user_id is not None:
        lines.append(f'== next: .venv/bin/python recommend.py --model-dir {shlex.quote(model_dir)} '
                     f'--user {shlex.quote(user_id)}')
    if chart:
        lines.append(f'== chart: {chart}')
    return lines


def lists_phrase(topn: dict) -> str:
    """What the served lists come from and how they were chosen, from metrics.json's topn."""
    names = {'ials': 'iALS', 'ease': 'EASE', 'blend': 'a blend of EASE and iALS'}
    parts = []
    if topn.get('factors') is not None:
        parts.append(f'{topn["factors"]} factors'
                     + (f', {topn["target"]} targets' if topn.get('target') else ''))
    if topn.get('ease_lambda') is not None:
        parts.append(f'lambda {topn["ease_lambda"]:g}')
        parts += config.ease_phrases(topn.get('ease_dropout'), topn.get('ease_user_exponent'),
                                     topn.get('ease_form'))
    if topn.get('model') == 'blend':
        parts.append(f'EASE weight {topn["blend"]:g}')
    like = topn.get('like')
    parts.append(f'like weight {like["weight"]:g}' if like else 'no like term')
    text = f'{names.get(topn.get("model"), topn.get("model"))} ({", ".join(parts)})'
    search = topn.get('search')
    if search:
        text += (f', chosen on validation: NDCG@10 {search["validation_ndcg"]:.4f}, '
                 f'{len(search["table"])} points in {search["seconds"]:.0f} s')
        if search.get('on_edge'):
            text += f' (on the edge of its space: {", ".join(search["on_edge"])})'
    return text


def format_summary(info: features.DatasetInfo, metrics: dict, model_dir: str,
                   chart: str | None, steps: Sequence[tuple[str, float]],
                   user_id: str | None = None) -> str:
    """The lines of the closing summary, ending with the next commands to try."""
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
    topn = metrics.get('topn')
    if topn:
        lines.append(f'== lists: {lists_phrase(topn)}')
    if steps:
        lines.append('== seconds: ' + ', '.join(f'{name} {seconds:.1f}'
                                                for name, seconds in steps)
                     + f' (total {sum(seconds for _, seconds in steps):.1f})')
    if metrics.get('phase_seconds'):
        lines.append('== trainer seconds: ' + phases.summary_text(metrics['phase_seconds'],
                                                                  metrics.get('wall_seconds')))
    lines.append(f'== model: {metrics.get("export_dir", features.join(model_dir, features.EXPORT_DIR))}')
    lines.append(f'== loss log: {features.join(model_dir, features.LOSS_LOG_FILE)}')
    lines.extend(next_commands(model_dir, chart, user_id))
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
    user_id = first_user_id(work_dir, features.DATASETS[info.layout])
    print(format_summary(info, metrics, model_dir, args.chart, args.step_seconds, user_id))
    return 0


if __name__ == '__main__':
    sys.exit(main())
