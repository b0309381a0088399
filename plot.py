"""Chart the trainer's loss log, and its eval results, as PNGs in the work dir's fig/.

Owns: reading the trainer's files (local or gs://) and drawing them.
Computes no metric: every number comes from files the trainer wrote.

- `<out>` (default WORK_DIR/fig/<dataset>-loss.png beside WORK_DIR/model): train
  and eval RMSE per epoch.
- `<out stem>-eval.png`, when the model dir has them: how predicted ratings
  spread for each true eval rating (eval_predictions.csv) and the ranking
  metrics of the model against the most-popular baseline (metrics.json).
- `<out stem>-usage.png`, when the work dir has WORK_DIR/usage/<step>.csv: each
  step's CPU (cores busy) and resident memory over its run, one panel a step.

    python plot.py --model-dir WORK_DIR/model [--work-dir WORK_DIR] [--out fig/loss.png]
                   [--title ...] [--show] [--verbose]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import logging
import math
import os
import pathlib
import sys
from collections.abc import Sequence

from trainer import features, fileio, logs, usage

logger = logging.getLogger(__name__)

# Charts go into fig/ of the work dir (the model dir's parent), never the checkout.
FIG_DIR = 'fig'


@dataclasses.dataclass(frozen=True)
class PlotConfig:
    loss_log: str
    work_dir: str
    out: str
    title: str
    show: bool = False


@dataclasses.dataclass(frozen=True)
class LossLog:
    """The columns of a loss log, as lists of numbers."""
    epochs: list[int]
    columns: dict[str, list[float]]


def read_loss_log(path: str) -> LossLog:
    """Reads the trainer's loss log (through the trainer's own reader) as columns.

    Raises:
      ValueError: when the file has no rows or other columns than a loss log.
    """
    from trainer import history  # pylint: disable=import-outside-toplevel
    rows = history.read_loss_log(path)
    if not rows:
        raise ValueError(f'{path} has no epochs yet')
    return LossLog(
        epochs=[row.epoch for row in rows],
        columns={name: [getattr(row, name) for row in rows]
                 for name in features.LOSS_LOG_COLUMNS if name != 'epoch'})


def draw_loss_chart(log: LossLog, title: str, baseline_rmse: float | None = None,
                    noise_floor_rmse: float | None = None,
                    best_epoch: int | None = None,
                    model_eval_rmse: float | None = None,
                    trained_eval_rmse: float | None = None):
    """Draws train, validation and eval RMSE per epoch; returns the matplotlib Figure.

    A vertical line marks best_epoch (the epoch whose parameters the
    trainer kept, from metrics.json), or else the epoch with the lowest
    validation RMSE; a star at best_epoch marks model_eval_rmse, the eval
    RMSE of the exported model (after a refit, not the search's), and a
    hollow circle trained_eval_rmse, the trained model's before posterior
    averaging replaced it.
    """
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    figure = Figure(figsize=(7, 4.2), dpi=120)
    axes = figure.subplots()
    axes.plot(log.epochs, log.columns['train_rmse'], marker='o',
              label='train RMSE (during the epoch)')
    validation = log.columns['validation_rmse']
    if any(math.isfinite(value) for value in validation):
        axes.plot(log.epochs, validation, marker='^', label='validation RMSE')
        if best_epoch is None:
            best_epoch = log.epochs[min(range(len(validation)), key=lambda index: (
                validation[index] if math.isfinite(validation[index]) else math.inf))]
        axes.axvline(best_epoch, color='purple', linestyle='-.', alpha=0.5,
                     label=f'best epoch by validation ({best_epoch})')
    axes.plot(log.epochs, log.columns['eval_rmse'], marker='s', label='eval RMSE')
    if trained_eval_rmse is not None and best_epoch is not None:
        axes.plot([best_epoch], [trained_eval_rmse], marker='o', markersize=9,
                  linestyle='none', markerfacecolor='none', color='black',
                  label=f'trained model: eval RMSE {trained_eval_rmse:.4f}')
    if model_eval_rmse is not None and best_epoch is not None:
        axes.plot([best_epoch], [model_eval_rmse], marker='*', markersize=14,
                  linestyle='none', color='black',
                  label=f'exported model: eval RMSE {model_eval_rmse:.4f}')
    if baseline_rmse is not None:
        axes.axhline(baseline_rmse, color='grey', linestyle='--',
                     label=f'predict the train mean ({baseline_rmse:.3f})')
    if noise_floor_rmse is not None:
        axes.axhline(noise_floor_rmse, color='green', linestyle=':',
                     label=f'noise floor ({noise_floor_rmse:.3f})')
    axes.set_xlabel('epoch')
    axes.set_ylabel('RMSE')
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize='small')
    figure.tight_layout()
    return figure


@dataclasses.dataclass(frozen=True)
class PredictionCounts:
    """eval_predictions.csv: counts per (true rating, predicted-rating bin)."""
    ratings: list[float]
    bin_edges: list[float]
    counts: dict[float, list[int]]


def read_prediction_counts(path: str) -> PredictionCounts:
    """Reads features.EVAL_PREDICTIONS_FILE (bins shared by every true rating).

    Raises:
      ValueError: when a column is missing or the file has no rows.
    """
    with fileio.open_file(path) as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    if not rows or any(name not in rows[0] for name in features.EVAL_PREDICTIONS_COLUMNS):
        raise ValueError(f'{path} is not an eval prediction table: expected columns '
                         f'{", ".join(features.EVAL_PREDICTIONS_COLUMNS)} and rows')
    counts: dict[float, list[int]] = {}
    edges: dict[float, float] = {}
    for row in rows:
        counts.setdefault(float(row['rating']), []).append(int(row['count']))
        edges[float(row['predicted_low'])] = float(row['predicted_high'])
    lows = sorted(edges)
    return PredictionCounts(ratings=sorted(counts), bin_edges=lows + [edges[lows[-1]]],
                            counts=counts)


def draw_prediction_panel(axes, predictions: PredictionCounts) -> None:
    """One step line per true rating: where its predictions fell, as shares."""
    for rating in predictions.ratings:
        counts = predictions.counts[rating]
        total = sum(counts)
        if total:
            axes.stairs([count / total for count in counts], predictions.bin_edges,
                        label=f'true {rating:g} ({total} ratings)')
    axes.set_xlabel('predicted rating (clipped, as served)')
    axes.set_ylabel('share of the eval ratings with that true rating')
    axes.set_title('Predicted vs true rating on eval')
    axes.grid(alpha=0.3)
    axes.legend(fontsize='small')


_RANKING_LABELS = {'model': 'served lists', 'rating_model': 'ranked by predicted rating',
                   'most_popular': 'most popular (train count)',
                   'fallback': 'newcomer fallback'}
_RANKING_METRICS = ('precision', 'recall', 'ndcg', 'coverage')


def draw_ranking_panel(axes, ranking: dict) -> None:
    """Grouped bars: each ranking metric for the model and the baselines."""
    names = [name for name in _RANKING_LABELS if name in ranking]
    width = 0.8 / max(len(names), 1)
    for offset, name in enumerate(names):
        values = [ranking[name][metric] for metric in _RANKING_METRICS]
        positions = [index + (offset - (len(names) - 1) / 2) * width
                     for index in range(len(_RANKING_METRICS))]
        bars = axes.bar(positions, values, width, label=_RANKING_LABELS[name])
        axes.bar_label(bars, fmt='%.3f', fontsize='x-small')
    k = ranking.get('k', 10)
    axes.set_xticks(range(len(_RANKING_METRICS)),
                    [f'{metric if metric != "ndcg" else "NDCG"}@{k}'
                     for metric in _RANKING_METRICS])
    axes.set_title(f'Top-{k} on eval ({ranking.get("users_with_relevant", "?")} users '
                   f'with a rating >= {ranking.get("relevant_rating", 4):g})')
    axes.grid(alpha=0.3, axis='y')
    axes.legend(fontsize='small')


def draw_eval_chart(title: str, predictions: PredictionCounts | None,
                    ranking: dict | None):
    """The eval figure: the panels whose data is there; returns the Figure."""
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    panels = [panel for panel in ((draw_prediction_panel, predictions),
                                  (draw_ranking_panel, ranking)) if panel[1]]
    figure = Figure(figsize=(6.5 * len(panels), 4.5), dpi=120)
    for axes, (draw, content) in zip(figure.subplots(1, len(panels), squeeze=False)[0],
                                     panels):
        draw(axes, content)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def eval_chart_path(out: str) -> str:
    """<out stem>-eval.png next to the loss chart."""
    path = pathlib.Path(out)
    return str(path.with_name(f'{path.stem}-eval{path.suffix}'))


def write_eval_chart(model_dir: str, out: str, dataset: str) -> str | None:
    """Draws the eval chart when the trainer left its data; returns the path or None.

    Raises:
      ValueError: when eval_predictions.csv is malformed.
    """
    predictions_path = features.join(model_dir, features.EVAL_PREDICTIONS_FILE)
    predictions = (read_prediction_counts(predictions_path)
                   if fileio.exists(predictions_path) else None)
    metrics_path = features.join(model_dir, features.METRICS_FILE)
    ranking = (features.read_json(metrics_path).get('ranking')
               if fileio.exists(metrics_path) else None)
    if predictions is None and not ranking:
        return None
    eval_out = eval_chart_path(out)
    draw_eval_chart(f'Biased MF on {dataset}: eval', predictions, ranking).savefig(eval_out)
    return eval_out


def usage_chart_path(out: str) -> str:
    """<out stem>-usage.png next to the loss chart."""
    path = pathlib.Path(out)
    return str(path.with_name(f'{path.stem}-usage{path.suffix}'))


def draw_usage_chart(title: str, steps: dict[str, usage.Usage]):
    """One panel per step: CPU cores busy (left axis), resident GiB (right); a Figure."""
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    figure = Figure(figsize=(max(6.5, 3.6 * len(steps)), 3.8), dpi=120)
    for axes, (step, recorded) in zip(figure.subplots(1, len(steps), squeeze=False)[0],
                                      steps.items()):
        # Each CPU figure is the mean over the interval up to its sample; the first
        # interval starts with the process.
        axes.plot([0.0, *recorded.seconds], [recorded.cpu_cores[0], *recorded.cpu_cores],
                  color='tab:blue', linewidth=1, drawstyle='steps-pre')
        axes.set_xlim(left=0, right=max(recorded.seconds[-1], 1.0))
        axes.set_xlabel(f'{step}: seconds')
        axes.set_ylabel('CPU (cores busy)', color='tab:blue')
        axes.set_ylim(bottom=0, top=max(1.0, recorded.peak_cpu_cores() * 1.1))
        memory = axes.twinx()
        memory.plot(recorded.seconds, [value / 2**30 for value in recorded.rss_bytes],
                    color='tab:red', linewidth=1,
                    marker='.' if len(recorded.seconds) < 20 else None)
        memory.set_ylabel('resident memory (GiB)', color='tab:red')
        memory.set_ylim(bottom=0, top=max(recorded.peak_rss_bytes() / 2**30 * 1.1, 0.1))
        axes.set_title(f'{step}: mean {recorded.mean_cpu_cores():.2f} cores, '
                       f'peak {recorded.peak_rss_bytes() / 2**30:.2f} GiB', fontsize='small')
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def write_usage_chart(work_dir: str, out: str, dataset: str) -> str | None:
    """Draws the usage chart when the steps left their samples; returns the path or None.

    Raises:
      ValueError: when a usage file is malformed.
    """
    steps = {step: usage.read_usage(path)
             for step, path in usage.recorded_steps(work_dir).items()}
    steps = {step: recorded for step, recorded in steps.items() if recorded.seconds}
    if not steps:
        return None
    usage_out = usage_chart_path(out)
    draw_usage_chart(f'{dataset}: what each step used', steps).savefig(usage_out)
    return usage_out


def read_reference_lines(model_dir: str) -> dict[str, float | None]:
    """The baselines the trainer recorded in metrics.json, when it is there."""
    path = features.join(model_dir, features.METRICS_FILE)
    if not fileio.exists(path):
        return {}
    metrics = features.read_json(path)
    return {'dataset': metrics.get('dataset'),
            'baseline_rmse': metrics.get('global_mean_eval_rmse'),
            'noise_floor_rmse': metrics.get('noise_floor_rmse'),
            'best_epoch': metrics.get('best_epoch'),
            'model_eval_rmse': metrics.get('eval_rmse'),
            'trained_eval_rmse': ((metrics.get('posterior') or {}).get('before') or {}
                                  ).get('eval_rmse')}


def parse_args(argv: Sequence[str] | None) -> PlotConfig:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model-dir', required=True,
                        help='The trainer\'s model dir (local or gs://) holding loss_log.csv.')
    parser.add_argument('--out', help='PNG to write (default: fig/<dataset>-loss.png beside '
                        'the model dir, i.e. in the work dir; ./fig/ for a gs:// model dir).')
    parser.add_argument('--work-dir', help="The steps' work dir, holding usage/ (default: "
                        "the model dir's parent).")
    parser.add_argument('--title', help='Chart title (default: the dataset name).')
    parser.add_argument('--show', action='store_true', help='Also open a window.')
    logs.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    if args.out and not args.out.endswith('.png'):
        parser.error(f'--out {args.out!r} must end in .png, e.g. fig/loss.png')
    model_dir = args.model_dir.rstrip('/')
    return PlotConfig(loss_log=features.join(model_dir, features.LOSS_LOG_FILE),
                      work_dir=(args.work_dir or posix_parent(model_dir)).rstrip('/'),
                      out=args.out or '', title=args.title or '', show=args.show)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    logs.setup_logging(verbose=logs.wants_verbose(argv))
    logs.quiet_startup(argv, load_tensorflow=False)  # TensorFlow loads for gs:// only
    if not fileio.exists(config.loss_log):
        print(f'plot.py: error: no loss log at {config.loss_log}; '
              'train first: .venv/bin/python -m trainer.task --work-dir WORK_DIR', file=sys.stderr)
        return 2
    try:
        log = read_loss_log(config.loss_log)
    except ValueError as error:
        print(f'plot.py: error: {error}', file=sys.stderr)
        return 2
    reference = read_reference_lines(posix_parent(config.loss_log))
    dataset = reference.get('dataset') or 'MovieLens'
    title = config.title or f'Biased MF on {dataset}: RMSE per epoch'
    out = config.out or default_chart_path(posix_parent(config.loss_log), dataset)
    figure = draw_loss_chart(log, title, reference.get('baseline_rmse'),
                             reference.get('noise_floor_rmse'), reference.get('best_epoch'),
                             reference.get('model_eval_rmse'),
                             reference.get('trained_eval_rmse'))
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    try:
        eval_out = write_eval_chart(posix_parent(config.loss_log), out, dataset)
        usage_out = write_usage_chart(config.work_dir, out, dataset)
    except ValueError as error:
        print(f'plot.py: error: {error}', file=sys.stderr)
        return 2
    if config.show:
        show_window(figure)
    exported = reference.get('model_eval_rmse')
    print(f'plot: read {len(log.epochs)} epochs from {config.loss_log}; '
          f'last epoch eval RMSE {log.columns["eval_rmse"][-1]:.4f}'
          + (f', exported model {exported:.4f}' if exported is not None else '')
          + f'; wrote {_listed([out, eval_out, usage_out])}')
    return 0


def _listed(paths: list[str | None]) -> str:
    """'a', 'a and b', 'a, b and c' of the paths that are not None."""
    kept = [path for path in paths if path]
    return ' and '.join([', '.join(kept[:-1]), kept[-1]] if len(kept) > 1 else kept)


def show_window(figure) -> None:
    """Opens the figure in an interactive window (only with --show)."""
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    manager = plt.figure().canvas.manager
    manager.canvas.figure = figure
    figure.set_canvas(manager.canvas)
    plt.show()


def default_chart_path(model_dir: str, dataset: str) -> str:
    """WORK_DIR/fig/<dataset>-loss.png for a local model dir WORK_DIR/model;
    fig/<dataset>-loss.png under the current directory for a gs:// one."""
    name = f'{dataset}-loss.png'
    if not fileio.is_local(model_dir):
        return os.path.join(FIG_DIR, name)
    return os.path.join(os.path.dirname(os.path.abspath(model_dir)), FIG_DIR, name)


def posix_parent(path: str) -> str:
    return path.rsplit('/', 1)[0]


if __name__ == '__main__':
    sys.exit(main())
