"""Chart the trainer's loss log: train and eval RMSE per epoch, as a PNG in fig/.

Owns: reading the loss log (local or gs://) and drawing it.  Computes no
metric: every number comes from the log the trainer wrote.

    python plot.py --model-dir WORK_DIR/model [--out fig/loss.png] [--title ...] [--show]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import pathlib
import sys
from collections.abc import Sequence

from trainer import features, logs

logger = logging.getLogger(__name__)

DEFAULT_FIG_DIR = pathlib.Path(__file__).resolve().parent / 'fig'


@dataclasses.dataclass(frozen=True)
class PlotConfig:
    loss_log: str
    out: str
    title: str
    show: bool = False


@dataclasses.dataclass(frozen=True)
class LossLog:
    """The columns of a loss log, as lists of numbers."""
    epochs: list[int]
    columns: dict[str, list[float]]


def read_loss_log(path: str) -> LossLog:
    """Reads a loss log CSV with features.LOSS_LOG_COLUMNS.

    Raises:
      ValueError: when the file has no rows or misses a column.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    with tf.io.gfile.GFile(path) as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    if not rows:
        raise ValueError(f'{path} has no epochs yet')
    missing = [name for name in features.LOSS_LOG_COLUMNS if name not in rows[0]]
    if missing:
        raise ValueError(f'{path} is not a loss log: no column {", ".join(missing)}')
    return LossLog(
        epochs=[int(row['epoch']) for row in rows],
        columns={name: [float(row[name]) for row in rows]
                 for name in features.LOSS_LOG_COLUMNS if name != 'epoch'})


def draw_loss_chart(log: LossLog, title: str, baseline_rmse: float | None = None,
                    noise_floor_rmse: float | None = None):
    """Draws train and eval RMSE per epoch; returns the matplotlib Figure."""
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    figure = Figure(figsize=(7, 4.2), dpi=120)
    axes = figure.subplots()
    axes.plot(log.epochs, log.columns['train_rmse'], marker='o', label='train RMSE')
    axes.plot(log.epochs, log.columns['eval_rmse'], marker='s', label='eval RMSE')
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
    axes.legend()
    figure.tight_layout()
    return figure


def read_reference_lines(model_dir: str) -> dict[str, float | None]:
    """The baselines the trainer recorded in metrics.json, when it is there."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    path = features.join(model_dir, features.METRICS_FILE)
    if not tf.io.gfile.exists(path):
        return {}
    metrics = features.read_json(path)
    return {'dataset': metrics.get('dataset'),
            'baseline_rmse': metrics.get('global_mean_eval_rmse'),
            'noise_floor_rmse': metrics.get('noise_floor_rmse')}


def parse_args(argv: Sequence[str] | None) -> PlotConfig:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model-dir', required=True,
                        help='The trainer\'s model dir (local or gs://) holding loss_log.csv.')
    parser.add_argument('--out', help='PNG to write (default fig/<dataset>-loss.png).')
    parser.add_argument('--title', help='Chart title (default: the dataset name).')
    parser.add_argument('--show', action='store_true', help='Also open a window.')
    args = parser.parse_args(argv)
    if args.out and not args.out.endswith('.png'):
        parser.error(f'--out {args.out!r} must end in .png, e.g. fig/loss.png')
    model_dir = args.model_dir.rstrip('/')
    return PlotConfig(loss_log=features.join(model_dir, features.LOSS_LOG_FILE),
                      out=args.out or '', title=args.title or '', show=args.show)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    logs.setup_logging()
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    if not tf.io.gfile.exists(config.loss_log):
        print(f'plot.py: error: no loss log at {config.loss_log}; '
              'train first: python -m trainer.task --work-dir WORK_DIR', file=sys.stderr)
        return 2
    try:
        log = read_loss_log(config.loss_log)
    except ValueError as error:
        print(f'plot.py: error: {error}', file=sys.stderr)
        return 2
    reference = read_reference_lines(posix_parent(config.loss_log))
    dataset = reference.get('dataset') or 'MovieLens'
    title = config.title or f'Biased MF on {dataset}: RMSE per epoch'
    out = config.out or str(DEFAULT_FIG_DIR / f'{dataset}-loss.png')
    figure = draw_loss_chart(log, title, reference.get('baseline_rmse'),
                             reference.get('noise_floor_rmse'))
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    if config.show:
        show_window(figure)
    print(f'plot: read {len(log.epochs)} epochs from {config.loss_log}; '
          f'final eval RMSE {log.columns["eval_rmse"][-1]:.4f}; wrote {out}')
    return 0


def show_window(figure) -> None:
    """Opens the figure in an interactive window (only with --show)."""
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    manager = plt.figure().canvas.manager
    manager.canvas.figure = figure
    figure.set_canvas(manager.canvas)
    plt.show()


def posix_parent(path: str) -> str:
    return path.rsplit('/', 1)[0]


if __name__ == '__main__':
    sys.exit(main())
