"""Measures the workflow's cost at several data sizes: one table, also as JSON.

Owns the benchmark only: it generates MovieLens-25M-shaped ratings with
trainer/pipeline/synthetic.py (or takes zips given with --data-sources), then runs each
step as a subprocess exactly as a user would::

    python data-extractor.py --work-dir W --dataset ml-25m --data-sources ZIP
    python preprocess.py --work-dir W
    python -m trainer.task --work-dir W [--num-epochs N]
    python plot.py --model-dir W/model --out W/fig/loss.png

Per step also: peak and mean CPU (cores busy) and resident memory from the
samples the step wrote itself (WORK_DIR/usage/, trainer/usage.py).

Per step: wall seconds, ratings per second (rows read / wall seconds), and
peak resident memory two ways: the largest sum of RSS over the step's process
tree, sampled from /proc every 0.2 s (what the issue asks; spikes shorter
than a sample are missed), and the largest single process's ru_maxrss from
wait4 (exact, but not a sum). Per size also: trainer seconds per epoch (the
loss log's `seconds` column), export seconds (from the trainer's log
timestamps), and eval RMSE next to the noise floor and the global mean.

Generated sizes keep ml-25m's shape: users grow with the ratings (162,541 at
25M, 154 ratings each on average) and movies with their square root (59,047
at 25M), as real MovieLens releases do (ml-1m: 6,040 users, 3,706 movies).
Zips are named synthetic-<size>.zip, not ml-25m.zip, so the extractor stages
them without the MD5 check (it records their MD5 instead).

    python bench/scale.py [--sizes 1m,5m,25m] [--epochs N] [--seed 0]
                          [--data-sources ZIP ...] [--repeats N] [--work-root DIR]
                          [--keep] [--json-out PATH]
    python bench/scale.py --growth RUN.json [RUN.json ...]

With two sizes or more it also prints the growth table: each step's and
each trainer phase's seconds by size, and the exponent b of
seconds ~ ratings^b fitted over the sizes.  --growth prints it from the JSON
of earlier runs (say 1M and 5M generated, 25M from a zip) without running.

--repeats N runs each size's chain N times (from its one zip) and reports,
per step and trainer phase, the median over the runs and the run whose chain
time is the median (its table rows and the growth table's column are that
run's); every run stays in the JSON.

Timings depend on the machine's load: the table records the load average
before and after each step. It asserts nothing about time.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import logging
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# trainer.usage loads neither TensorFlow nor numpy (the test checks it): see _PARENT_NOTE.
from trainer import usage  # noqa: E402  pylint: disable=wrong-import-position

logger = logging.getLogger('bench.scale')

DEFAULT_SIZES = '1m,5m,25m'
# _PARENT_NOTE: names below repeat trainer/features.py on purpose (the test
# checks they agree). Importing features imports TensorFlow, and Linux starts
# a child's ru_maxrss at its parent's RSS high-water mark when it execs, so a
# parent holding TensorFlow (~650 MiB) would inflate every step's figure.
DATASET = 'ml-25m'  # a features.DATASETS key: the layout generated and staged
DATASET_INFO_PATH = ('transformed', 'dataset_info.json')  # features.DATASET_INFO_FILE
METRICS_PATH = ('model', 'metrics.json')  # features.MODEL_DIR, METRICS_FILE
LOSS_LOG_PATH = ('model', 'loss_log.csv')  # features.LOSS_LOG_FILE
# ml-25m's users and movies; generated sizes scale from these.
FULL_RATINGS = 25_000_000
FULL_USERS = 162_541
FULL_MOVIES = 59_047
MIN_SIZE = 10_000
SAMPLE_SECONDS = 0.2
STEPS = ('extract', 'preprocess', 'train', 'plot')
# The steps that sample their own CPU and memory, and their usage file's name.
USAGE_DIR = 'usage'  # features.USAGE_DIR
USAGE_FILES = {'extract': 'extract', 'preprocess': 'preprocess', 'train': 'trainer'}
_SIZE_PATTERN = re.compile(r'^(\d+(?:\.\d+)?)([km]?)$')
_LOG_TIME = re.compile(r'^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ')
_PAGE_BYTES = os.sysconf('SC_PAGE_SIZE')


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to measure; defaults live here."""
    sizes: tuple[int, ...] = ()
    data_sources: tuple[str, ...] = ()
    epochs: int | None = None
    seed: int = 0
    work_root: str | None = None
    keep: bool = False
    json_out: str = ''
    growth: tuple[str, ...] = ()
    repeats: int = 1


@dataclasses.dataclass(frozen=True)
class StepRun:
    """One step's measurements."""
    name: str
    command: list[str]
    seconds: float
    peak_tree_bytes: int
    max_process_bytes: int
    returncode: int
    load_before: float
    load_after: float
    started: float
    log_path: str


def parse_size(text: str) -> int:
    """'200k' -> 200000, '1m' -> 1000000, '1.5m', '50000'.

    Raises:
      ValueError: not a number with an optional k/m suffix.
    """
    match = _SIZE_PATTERN.match(text.strip().lower())
    if not match:
        raise ValueError(f'{text!r} is not a size like 200k, 1m or 50000')
    scale = {'': 1, 'k': 1_000, 'm': 1_000_000}[match.group(2)]
    return int(round(float(match.group(1)) * scale))


def size_label(num_ratings: int) -> str:
    for suffix, scale in (('m', 1_000_000), ('k', 1_000)):
        if num_ratings % scale == 0:
            return f'{num_ratings // scale}{suffix}'
    return str(num_ratings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='bench/scale.py',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('--sizes', help=f'comma-separated rating counts to generate, e.g. '
                        f'200k,1m (default: {DEFAULT_SIZES}; not with --data-sources)')
    parser.add_argument('--data-sources', action='append', metavar='ZIP', default=[],
                        help=f'a ratings zip in the {DATASET} layout to measure instead of '
                             'generating; repeat for several')
    parser.add_argument('--epochs', type=int, help="trainer --num-epochs (default: the "
                        "trainer's)")
    parser.add_argument('--seed', type=int, default=0, help='seed of the generated ratings')
    parser.add_argument('--repeats', type=int, default=1, help="run each size's chain this "
                        'many times and report the medians (default: 1)')
    parser.add_argument('--work-root', help='where the work dirs go (default: a temp dir, '
                        'removed at the end unless --keep)')
    parser.add_argument('--keep', action='store_true', help='keep the temp work root')
    parser.add_argument('--json-out', help='where the JSON table goes (default: '
                        'bench/results/scale-<UTC time>.json)')
    parser.add_argument('--growth', nargs='+', metavar='JSON', default=[],
                        help='print only the growth table of earlier runs (their JSON files, '
                             'e.g. one of --sizes 1m,5m and one of --data-sources 25M.zip); '
                             'runs nothing')
    return parser


def parse_args(argv: Sequence[str] | None) -> BenchConfig:
    """Validates the flags; one parser.error line (exit 2) on a bad one."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for path in args.growth:
        if not os.path.isfile(path):
            parser.error(f'--growth {path!r}: no such file; pass JSON files bench/scale.py wrote')
    if args.growth and (args.sizes is not None or args.data_sources):
        parser.error('--growth with --sizes or --data-sources: --growth only reads earlier '
                     'runs; pass one or the other')
    if args.data_sources and args.sizes is not None:
        parser.error('--sizes with --data-sources: a given zip has its own size; pass one')
    for path in args.data_sources:
        if not os.path.isfile(path):
            parser.error(f'--data-sources {path!r}: no such file; pass the path of a zip')
    sizes: list[int] = []
    if not args.data_sources:
        for text in (args.sizes if args.sizes is not None else DEFAULT_SIZES).split(','):
            try:
                size = parse_size(text)
            except ValueError as error:
                parser.error(f'--sizes {args.sizes!r}: {error}')
            if size < MIN_SIZE:
                parser.error(f'--sizes {args.sizes!r}: {text!r} is below {MIN_SIZE}; '
                             f'pass at least {size_label(MIN_SIZE)}')
            sizes.append(size)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f'--epochs {args.epochs}: must be >= 1')
    if args.seed < 0:
        parser.error(f'--seed {args.seed}: must be >= 0')
    if args.repeats < 1:
        parser.error(f'--repeats {args.repeats}: must be >= 1')
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
    json_out = args.json_out or str(REPO / 'bench' / 'results' / f'scale-{stamp}.json')
    return BenchConfig(sizes=tuple(sizes), data_sources=tuple(args.data_sources),
                       epochs=args.epochs, seed=args.seed,
                       work_root=args.work_root, keep=args.keep, json_out=json_out,
                       growth=tuple(args.growth), repeats=args.repeats)


def synthetic_shape(num_ratings: int) -> tuple[int, int]:
    """(users, movies) of an ml-25m-shaped set of num_ratings ratings."""
    fraction = num_ratings / FULL_RATINGS
    users = max(1, round(FULL_USERS * fraction))
    movies = max(200, round(FULL_MOVIES * math.sqrt(fraction)))
    return users, movies


def generate_command(path: str, num_ratings: int, seed: int) -> list[str]:
    """A subprocess that writes an ml-25m-shaped synthetic zip with write_archive.

    A subprocess, so this process never imports TensorFlow (see _PARENT_NOTE).
    """
    users, movies = synthetic_shape(num_ratings)
    settings = {'num_users': users, 'num_movies': movies, 'num_ratings': num_ratings,
                'seed': seed, 'layout': DATASET}
    code = ('import json, sys; from trainer.pipeline import synthetic; '
            'synthetic.write_archive(sys.argv[1], synthetic.SyntheticConfig('
            '**json.loads(sys.argv[2])))')
    return [sys.executable, '-c', code, path, json.dumps(settings)]


def tree_rss_bytes(root: int) -> int:
    """Sum of RSS over root and all its descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat', 'rb') as stream:
                stat = stream.read()
        except OSError:  # the process ended while we looked
            continue
        ppid = int(stat[stat.rindex(b')') + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        try:
            with open(f'/proc/{pid}/statm', 'rb') as stream:
                total += int(stream.read().split()[1]) * _PAGE_BYTES
        except OSError:
            continue
    return total


def run_step(name: str, command: list[str], log_path: str) -> StepRun:
    """Runs one step, logging its output to log_path, sampling its memory."""
    logger.info('+ %s', ' '.join(command))
    peak = [0]
    done = threading.Event()
    load_before = os.getloadavg()[0]
    started_wall, started = time.time(), time.perf_counter()
    with open(log_path, 'wb') as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

        def sample() -> None:
            while not done.wait(SAMPLE_SECONDS):
                peak[0] = max(peak[0], tree_rss_bytes(process.pid))

        peak[0] = tree_rss_bytes(process.pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # wait4 rather than Popen.wait: it also returns the child's ru_maxrss.
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    return StepRun(name=name, command=command, seconds=seconds, peak_tree_bytes=peak[0],
                   max_process_bytes=usage.ru_maxrss * 1024,
                   returncode=process.returncode, load_before=load_before,
                   load_after=os.getloadavg()[0], started=started_wall, log_path=log_path)


def step_commands(work_dir: str, zip_path: str,
                  epochs: int | None) -> list[tuple[str, list[str]]]:
    """The four steps, as a user types them."""
    python = sys.executable
    train = [python, '-m', 'trainer.task', '--work-dir', work_dir]
    if epochs is not None:
        train += ['--num-epochs', str(epochs)]
    return [
        ('extract', [python, 'data-extractor.py', '--work-dir', work_dir,
                     '--dataset', DATASET, '--data-sources', zip_path]),
        ('preprocess', [python, 'preprocess.py', '--work-dir', work_dir]),
        ('train', train),
        ('plot', [python, 'plot.py', '--model-dir', os.path.join(work_dir, 'model'),
                  '--out', os.path.join(work_dir, 'fig', 'loss.png')]),
    ]


def log_times(log_path: str, marker: str) -> list[float]:
    """Unix times of the log lines containing marker (asctime is local time)."""
    times = []
    with open(log_path, encoding='utf-8', errors='replace') as stream:
        for line in stream:
            match = _LOG_TIME.match(line)
            if match and marker in line:
                stamp = datetime.datetime.strptime(match.group(1), '%Y-%m-%d %H:%M:%S,%f')
                times.append(stamp.timestamp())
    return times


def trainer_breakdown(run: StepRun, loss_log: str) -> dict[str, Any]:
    """Epoch seconds from the loss log; export and after-export from log times.

    refit_seconds runs from the last search epoch's log line to the last
    refit epoch's (0 without a refit); posterior_seconds from there to the
    end of posterior averaging (0 without it; it includes scoring the
    trained model); export_seconds from there to the export's, so it
    includes scoring the final model and loading the title catalog the
    export embeds.
    """
    with open(loss_log, newline='', encoding='utf-8') as stream:
        epoch_seconds = [float(row['seconds']) for row in csv.DictReader(stream)]
    epoch_ends = log_times(run.log_path, ' Epoch ')
    refit_ends = log_times(run.log_path, 'Refit on all')
    averaged = log_times(run.log_path, 'Posterior mean of')
    exported = log_times(run.log_path, 'Exported the SavedModel')
    refit_seconds = posterior_seconds = export_seconds = after_export = None
    if epoch_ends and exported:
        trained = refit_ends[-1] if refit_ends else epoch_ends[-1]
        refit_seconds = trained - epoch_ends[-1]
        final = averaged[-1] if averaged else trained
        posterior_seconds = final - trained
        export_seconds = exported[-1] - final
        after_export = run.started + run.seconds - exported[-1]
    train_seconds = sum(epoch_seconds)
    return {
        'epoch_seconds': epoch_seconds,
        'train_seconds': train_seconds,
        'mean_epoch_seconds': train_seconds / len(epoch_seconds),
        'mean_epoch_seconds_after_first': (sum(epoch_seconds[1:]) / (len(epoch_seconds) - 1)
                                           if len(epoch_seconds) > 1 else None),
        'refit_seconds': refit_seconds,
        'posterior_seconds': posterior_seconds,
        'export_seconds': export_seconds,
        'ranking_and_eval_predictions_seconds': after_export,
        # Imports, input set-up, and per-epoch checkpoints outside `seconds`.
        'other_seconds': (run.seconds - train_seconds - refit_seconds - posterior_seconds
                          - export_seconds - after_export
                          if export_seconds is not None else None),
    }


def read_json(path: str) -> dict[str, Any]:
    with open(path, encoding='utf-8') as stream:
        return json.load(stream)


def bench_one(label: str, zip_path: str, generated: int | None, work_dir: str,
              config: BenchConfig) -> dict[str, Any] | None:
    """Runs the four steps in work_dir; the result row, or None if a step failed."""
    os.makedirs(os.path.join(work_dir, 'logs'), exist_ok=True)
    runs = []
    for name, command in step_commands(work_dir, zip_path, config.epochs):
        run = run_step(name, command, os.path.join(work_dir, 'logs', f'{name}.log'))
        runs.append(run)
        if run.returncode != 0:
            logger.error('%s: step %s exited %d; see %s', label, name, run.returncode,
                         run.log_path)
            return None
        logger.info('%s: %s took %.1f s', label, name, run.seconds)
    info = read_json(os.path.join(work_dir, *DATASET_INFO_PATH))
    metrics = read_json(os.path.join(work_dir, *METRICS_PATH))
    rows = info['rows_read']
    return {
        'usage': step_usage(work_dir),
        'label': label, 'source': zip_path, 'work_dir': work_dir,
        'counts': {'generated': generated, **{key: info[key] for key in (
            'rows_read', 'rows_accepted', 'rows_rejected', 'train_ratings', 'eval_ratings',
            'users', 'movies')}},
        'steps': [{'name': run.name, 'command': run.command, 'seconds': run.seconds,
                   'ratings_per_second': rows / run.seconds,
                   'peak_tree_rss_bytes': run.peak_tree_bytes,
                   'max_process_rss_bytes': run.max_process_bytes,
                   'load_before': run.load_before, 'load_after': run.load_after}
                  for run in runs],
        'total_seconds': sum(run.seconds for run in runs),
        'trainer': {**trainer_breakdown(runs[2], os.path.join(work_dir, *LOSS_LOG_PATH)),
            'epochs': metrics['epochs'], 'phase_seconds': metrics.get('phase_seconds'),
            'trainer_ratings_per_second': metrics['ratings_per_second']},
        'eval_rmse': metrics['eval_rmse'],
        'served_ndcg': (metrics.get('ranking') or {}).get('model', {}).get('ndcg'),
        'noise_floor_rmse': info.get('noise_floor_rmse'),
        'global_mean_eval_rmse': info['global_mean_eval_rmse'],
    }


def step_usage(work_dir: str) -> dict[str, dict[str, float]]:
    """Each step's peak and mean CPU (cores busy) and resident bytes, from the
    samples it wrote itself (WORK_DIR/usage/<step>.csv, trainer/usage.py)."""
    found = {}
    for step, name in USAGE_FILES.items():
        path = os.path.join(work_dir, USAGE_DIR, f'{name}.csv')
        if not os.path.exists(path):
            continue
        recorded = usage.read_usage(path)
        found[step] = {'samples': len(recorded.seconds),
                       'peak_cpu_cores': recorded.peak_cpu_cores(),
                       'mean_cpu_cores': recorded.mean_cpu_cores(),
                       'peak_rss_bytes': recorded.peak_rss_bytes(),
                       'mean_rss_bytes': recorded.mean_rss_bytes()}
    return found


def format_usage(results: list[dict[str, Any]]) -> list[str]:
    """One line per (size, step) that sampled itself: CPU cores and RSS, peak and mean."""
    mib = 1 << 20
    lines = ['', f'{"size":>6} {"step":<11}{"samples":>8}{"CPU peak":>9}{"mean":>6}'
                 f'{"RSS MiB peak":>13}{"mean":>7}   (each step\'s own samples)']
    for result in results:
        for step, used in result.get('usage', {}).items():
            lines.append(f'{result["label"]:>6} {step:<11}{used["samples"]:8d}'
                         f'{used["peak_cpu_cores"]:9.2f}{used["mean_cpu_cores"]:6.2f}'
                         f'{used["peak_rss_bytes"] / mib:13.0f}'
                         f'{used["mean_rss_bytes"] / mib:7.0f}')
    return lines


def _optional(value: float | None, form: str) -> str:
    return '-' if value is None else format(value, form)


def format_table(results: list[dict[str, Any]]) -> str:
    """The printed table: one row per (size, step), then one trainer line per size."""
    mib = 1 << 20
    lines = [f'{"size":>6} {"step":<11}{"wall s":>9}{"ratings/s":>12}{"tree MiB":>10}'
             f'{"proc MiB":>10}{"load":>11}']
    for result in results:
        steps = result['steps']
        if 'generate' in result:  # not a user step: not in the total
            steps = [{'name': '(generate)', **result['generate'],
                      'ratings_per_second': result['counts']['generated']
                      / result['generate']['seconds'],
                      'load_before': steps[0]['load_before'],
                      'load_after': steps[0]['load_before']}, *steps]
        for step in steps:
            lines.append(
                f'{result["label"]:>6} {step["name"]:<11}{step["seconds"]:9.1f}'
                f'{step["ratings_per_second"]:12,.0f}{step["peak_tree_rss_bytes"] / mib:10.0f}'
                f'{step["max_process_rss_bytes"] / mib:10.0f}'
                f'{step["load_before"]:6.2f}>{step["load_after"]:4.2f}')
        lines.append(f'{result["label"]:>6} {"total":<11}{result["total_seconds"]:9.1f}'
                     f'{result["counts"]["rows_read"] / result["total_seconds"]:12,.0f}')
    lines.append('')
    lines.append(f'{"size":>6}{"epochs":>7}{"s/epoch":>9}{"(2nd+)":>8}{"train s":>9}'
                 f'{"refit s":>9}{"post. s":>9}{"export s":>9}{"rank s":>8}{"eval RMSE":>10}'
                 f'{"floor":>7}'
                 f'{"mean":>7}')
    for result in results:
        trainer = result['trainer']
        lines.append(
            f'{result["label"]:>6}{trainer["epochs"]:7d}{trainer["mean_epoch_seconds"]:9.2f}'
            f'{_optional(trainer["mean_epoch_seconds_after_first"], "8.2f"):>8}'
            f'{trainer["train_seconds"]:9.1f}{_optional(trainer["refit_seconds"], "9.1f"):>9}'
            f'{_optional(trainer["posterior_seconds"], "9.1f"):>9}'
            f'{_optional(trainer["export_seconds"], "9.1f"):>9}'
            f'{_optional(trainer["ranking_and_eval_predictions_seconds"], "8.1f"):>8}'
            f'{result["eval_rmse"]:10.4f}{_optional(result["noise_floor_rmse"], "7.4f"):>7}'
            f'{result["global_mean_eval_rmse"]:7.4f}')
    lines.extend(format_usage(results))
    return '\n'.join(lines)


def growth_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each step's and each trainer phase's seconds by size, with its measured exponent.

    The exponent b of seconds ~ ratings^b is the least-squares slope of
    log(seconds) on log(train ratings) over the sizes (None with fewer than two
    sizes or a phase some size did not run).  On ml-25m-shaped data users grow
    like the ratings and movies like their square root, so a cost linear in the
    ratings (or the users) has b = 1, one linear in the movies b = 0.5, and a
    movies x movies inverse b = 1.5 (docs/performance.md#beyond-one-machine).
    """
    ordered = sorted(results, key=lambda result: result['counts']['train_ratings'])
    names: list[tuple[str, str]] = []
    for result in ordered:
        for step in result['steps']:
            if ('step', step['name']) not in names:
                names.append(('step', step['name']))
    for result in ordered:
        for phase in (result['trainer'].get('phase_seconds') or {}):
            if ('phase', phase) not in names:
                names.append(('phase', phase))
    rows = []
    for kind, name in names:
        seconds = []
        for result in ordered:
            if kind == 'step':
                found = [step['seconds'] for step in result['steps'] if step['name'] == name]
                seconds.append(found[0] if found else None)
            else:
                seconds.append((result['trainer'].get('phase_seconds') or {}).get(name))
        rows.append({'kind': kind, 'name': name, 'seconds': seconds,
                     'exponent': _exponent([r['counts']['train_ratings'] for r in ordered],
                                           seconds)})
    return rows


def _exponent(sizes: list[int], seconds: list[float | None]) -> float | None:
    points = [(math.log(size), math.log(value)) for size, value in zip(sizes, seconds)
              if value is not None and value > 0]
    if len(points) < 2 or len(points) < len(sizes) or len({x for x, _ in points}) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    return (sum((x - mean_x) * (y - mean_y) for x, y in points)
            / sum((x - mean_x) ** 2 for x, _ in points))


def format_growth(results: list[dict[str, Any]]) -> str:
    """The growth table: seconds by size for each step and trainer phase, and b."""
    ordered = sorted(results, key=lambda result: result['counts']['train_ratings'])
    width = max([11] + [len(result['label']) + 2 for result in ordered])
    name_width = 28

    def line(label: str, cells: list[str], tail: str = '') -> str:
        return f'{label:<{name_width}}' + ''.join(cell.rjust(width) for cell in cells) + tail

    lines = [line('', [result['label'] for result in ordered], '   b (seconds ~ ratings^b)')]
    for key in ('train_ratings', 'users', 'movies'):
        lines.append(line(key.replace('_', ' '),
                          [f'{result["counts"][key]:,}' for result in ordered]))
    for row in growth_rows(results):
        label = row['name'] if row['kind'] == 'step' else f'  trainer: {row["name"]}'
        lines.append(line(label, [_optional(value, '.1f') for value in row['seconds']],
                          '   ' + _optional(row['exponent'], '.2f')))
    return '\n'.join(lines)


def run_all(config: BenchConfig, work_root: str) -> list[dict[str, Any]] | None:
    """Generates or takes each zip and benchmarks it; None if a step failed."""
    results = []
    jobs = ([(size_label(size), size) for size in config.sizes]
            or [(pathlib.Path(path).stem, path) for path in config.data_sources])
    for label, what in jobs:
        work_dir = os.path.join(work_root, label)
        os.makedirs(work_dir, exist_ok=False)
        generate = None
        if isinstance(what, int):
            zip_path = os.path.join(work_root, f'synthetic-{label}.zip')
            os.makedirs(os.path.join(work_dir, 'logs'))
            generate = run_step('generate', generate_command(zip_path, what, config.seed),
                                os.path.join(work_dir, 'logs', 'generate.log'))
            if generate.returncode != 0:
                logger.error('%s: generating exited %d; see %s', label, generate.returncode,
                             generate.log_path)
                return None
            logger.info('%s: generated %d ratings (%d users, %d movies) in %.1f s -> %s',
                        label, what, *synthetic_shape(what), generate.seconds, zip_path)
        else:
            zip_path = os.path.abspath(what)
        for run in range(1, config.repeats + 1):
            run_label = label if config.repeats == 1 else f'{label}#{run}'
            run_dir = work_dir if config.repeats == 1 else os.path.join(work_dir, f'run{run}')
            result = bench_one(run_label, zip_path, what if generate else None, run_dir, config)
            if result is None:
                return None
            result.update(size_label=label, run=run)
            if generate is not None and run == 1:
                result['generate'] = {'seconds': generate.seconds,
                                      'peak_tree_rss_bytes': generate.peak_tree_bytes,
                                      'max_process_rss_bytes': generate.max_process_bytes,
                                      'users': synthetic_shape(what)[0],
                                      'movies': synthetic_shape(what)[1]}
            results.append(result)
    return results


def median_runs(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size, the run whose chain time is the median (the lower one of an
    even count), in the order the sizes first appear; runs without a
    size_label (one run each) stand for themselves."""
    by_size: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_size.setdefault(result.get('size_label', result['label']), []).append(result)
    chosen = []
    for runs in by_size.values():
        if len(runs) > 1:
            runs = sorted(runs, key=lambda result: result['total_seconds'])
        chosen.append(runs[(len(runs) - 1) // 2])
    return chosen


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def format_medians(results: list[dict[str, Any]]) -> str:
    """Per size run more than once: each step's, phase's and the chain's seconds in
    every run and their median, the largest peak memory, and the quality's range."""
    by_size: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_size.setdefault(result.get('size_label', result['label']), []).append(result)
    mib = 1 << 20
    lines = []
    for label, runs in by_size.items():
        if len(runs) < 2:
            continue
        median_run = median_runs(runs)[0]
        lines.append(f'{label}: {len(runs)} runs; the median chain is run '
                     f'{median_run["run"]} ({median_run["total_seconds"]:.1f} s)')
        names = [step['name'] for step in runs[0]['steps']]
        phases = list(runs[0]['trainer'].get('phase_seconds') or {})
        rows = [(name, [next(step['seconds'] for step in run['steps'] if step['name'] == name)
                        for run in runs]) for name in names]
        rows += [(f'  trainer: {phase}', [(run['trainer'].get('phase_seconds') or {}).get(
            phase, 0.0) for run in runs]) for phase in phases]
        rows.append(('chain', [run['total_seconds'] for run in runs]))
        lines.append(f'{"":<28}' + ''.join(f'{"run " + str(run["run"]):>10}' for run in runs)
                     + f'{"median":>10}')
        for name, seconds in rows:
            lines.append(f'{name:<28}' + ''.join(f'{value:10.1f}' for value in seconds)
                         + f'{_median(seconds):10.1f}')
        peak = max(step['peak_tree_rss_bytes'] for run in runs for step in run['steps'])
        rmse = [run['eval_rmse'] for run in runs]
        ndcg = [run['served_ndcg'] for run in runs if run.get('served_ndcg') is not None]
        lines.append(f'peak memory {peak / mib:.0f} MiB (largest step of any run); eval RMSE '
                     f'{min(rmse):.4f}-{max(rmse):.4f}'
                     + (f'; served NDCG@10 {min(ndcg):.4f}-{max(ndcg):.4f}' if ndcg else ''))
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    if config.growth:
        print(format_growth(median_runs([result for path in config.growth
                                         for result in read_json(path)['results']])))
        return 0
    if config.work_root is not None:
        os.makedirs(config.work_root, exist_ok=True)
        work_root = tempfile.mkdtemp(prefix='scale-', dir=config.work_root)
    else:
        work_root = tempfile.mkdtemp(prefix='bench-scale-')
    logger.info('work root %s (load average %.2f on %d CPUs)', work_root,
                os.getloadavg()[0], os.cpu_count())
    try:
        results = run_all(config, work_root)
    finally:
        if config.work_root is None and not config.keep:
            shutil.rmtree(work_root, ignore_errors=True)
    if results is None:
        return 1
    document = {'created': datetime.datetime.now(datetime.timezone.utc).isoformat(),
                'cpus': os.cpu_count(), 'memory_sampling': (
                    f'peak_tree_rss_bytes: max over {SAMPLE_SECONDS} s samples of the summed '
                    'RSS of the step process and its descendants; max_process_rss_bytes: '
                    'wait4 ru_maxrss, the largest single process'),
                'config': dataclasses.asdict(config), 'results': results}
    os.makedirs(os.path.dirname(os.path.abspath(config.json_out)), exist_ok=True)
    with open(config.json_out, 'w', encoding='utf-8') as stream:
        json.dump(document, stream, indent=2)
    print(format_table(results))
    medians = format_medians(results)
    if medians:
        print()
        print(medians)
    if len(median_runs(results)) > 1:
        print()
        print(format_growth(median_runs(results)))
    print(f'JSON: {config.json_out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
