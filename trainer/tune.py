"""Local hyperparameter search on the validation slice, over the space a cloud tuning job uses.

    python -m trainer.tune --work-dir WORK_DIR [--trials 12] [--search-seed 0]
        [--job-dir WORK_DIR/tuning] [--space hptuning.yaml] [--overwrite]
        [any trainer flag, e.g. --num-epochs 40]

Reads the search space from hptuning.yaml (`studySpec.parameters`: the same
parameter ids, ranges and scales that `run-cloud.sh --hp-tuning` sends to
Vertex AI, so a local search and a cloud one explore the same flags), draws
`--trials` settings at random (seeded; log-uniform where the spec says
UNIT_LOG_SCALE), trains each with the trainer (early stopping on the
validation slice) and ranks them by the spec's metric: validation RMSE of the
rating model (hptuning.yaml, as the cloud tuning job), or validation NDCG@10
of the top-N model (hptuning-ranking.yaml, whose parameters are its
--topn-* flags; a trial then trains the top-N model alone).  The eval split is
shown for information and never used to rank.  Trial 0 is the trainer's defaults (or the flags given), so the
search reports how much it gains over them.  Writes every trial to
JOB_DIR/tuning.json and prints the best trial's flags as a trainer command.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import pathlib
import sys
import time
from collections.abc import Sequence

from trainer import logs

if __name__ == '__main__':
    logs.quiet_startup()  # before TensorFlow loads

# pylint: disable=wrong-import-position
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer import config as config_lib  # noqa: E402
from trainer import data  # noqa: E402
from trainer import features  # noqa: E402
from trainer.rating import train as train_lib  # noqa: E402
from trainer.topn import ranking  # noqa: E402
from trainer.topn import train as topn_train  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_SPACE = pathlib.Path(__file__).resolve().parents[1] / 'hptuning.yaml'
RESULTS_FILE = 'tuning.json'
# The metrics a spec may name, and whether larger is better.
METRICS = features.TUNING_METRICS


@dataclasses.dataclass(frozen=True)
class Metric:
    """What a search ranks trials by: a key of METRICS."""
    name: str

    @property
    def maximise(self) -> bool:
        return METRICS[self.name]

    @property
    def label(self) -> str:
        return {features.TUNING_METRIC_ID: 'validation RMSE',
                features.RANKING_METRIC_ID: f'validation NDCG@{ranking.TOP_K}'}[self.name]

    def best(self, records: list[dict[str, object]]) -> dict[str, object]:
        return (max if self.maximise else min)(records, key=lambda r: r[self.name])


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One searched flag: its id (the trainer flag without --), range and scale."""
    name: str
    low: float
    high: float
    integer: bool
    log_scale: bool

    def draw(self, rng: np.random.Generator) -> float | int:
        if self.log_scale:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return int(round(value)) if self.integer else float(f'{value:.3g}')


def read_space(path: str) -> tuple[list[Parameter], Metric]:
    """The parameters of a Vertex AI studySpec (doubleValueSpec / integerValueSpec)
    and the metric it ranks by.

    Raises:
      ValueError: a parameter has another kind of spec or no range, or the
        metric is not one of METRICS with its goal.
    """
    import yaml  # pylint: disable=import-outside-toplevel
    with open(path, encoding='utf-8') as f:
        text = f.read().replace('${TRIAL_JOB_SPEC}', '{}')
    study = yaml.safe_load(text)['studySpec']
    metric = study['metrics'][0]
    goal = 'MAXIMIZE' if METRICS.get(metric['metricId']) else 'MINIMIZE'
    if metric['metricId'] not in METRICS or metric.get('goal') != goal:
        raise ValueError(f'{path}: metric {metric.get("metricId")!r} with goal '
                         f'{metric.get("goal")!r}; use validation_rmse (MINIMIZE) or '
                         'validation_ndcg (MAXIMIZE)')
    parameters = []
    for spec in study['parameters']:
        kind = 'integerValueSpec' if 'integerValueSpec' in spec else 'doubleValueSpec'
        if kind not in spec:
            raise ValueError(f'{path}: parameter {spec.get("parameterId")!r} is neither '
                             'a doubleValueSpec nor an integerValueSpec')
        bounds = spec[kind]
        parameters.append(Parameter(
            name=spec['parameterId'], low=float(bounds['minValue']),
            high=float(bounds['maxValue']), integer=kind == 'integerValueSpec',
            log_scale=spec.get('scaleType') == 'UNIT_LOG_SCALE'))
    return parameters, Metric(metric['metricId'])


def draw_trials(space: list[Parameter], trials: int, seed: int) -> list[dict[str, object]]:
    """trials - 1 random settings after an empty one (the base flags)."""
    rng = np.random.default_rng(seed)
    return [{}] + [{parameter.name: parameter.draw(rng) for parameter in space}
                   for _ in range(trials - 1)]


def trial_config(base: config_lib.TrainConfig, job_dir: str, number: int,
                 flags: dict[str, object]) -> config_lib.TrainConfig:
    """The base config with a trial's flags and its own model dir.

    A trial keeps its best epoch instead of refitting, and skips posterior
    averaging: ranking needs only the best epoch's validation RMSE, and the
    refit or the sweeps would double the time.
    """
    model_dir = features.join(job_dir, f'trial-{number:03d}')
    return dataclasses.replace(
        base, model_dir=model_dir,
        checkpoint_dir=features.join(model_dir, features.CHECKPOINT_DIR),
        export_dir=features.join(model_dir, features.EXPORT_DIR), overwrite=True,
        tensorboard_dir=None, hypertune_file=None, final_model='best',
        posterior_samples=0, **{name.replace('-', '_'): value for name, value in flags.items()})


def _rating_trial(config: config_lib.TrainConfig, info: features.DatasetInfo,
                  sizes: tuple[int, int]) -> dict[str, object]:
    result = train_lib.train(config, info, *sizes)
    return {'best_epoch': result.best_epoch,
            'validation_rmse': result.best_validation_rmse,
            'eval_rmse': result.final.eval_rmse}


def _ranking_trial(config: config_lib.TrainConfig, info: features.DatasetInfo,
                   sizes: tuple[int, int], splits: train_lib.Splits) -> dict[str, object]:
    """The top-N model alone: its best iteration by validation NDCG@10, and that
    model's eval NDCG@10 (for information)."""
    rows = tuple(size + features.NUM_OOV_BUCKETS for size in sizes)
    result = topn_train.train(config, splits, *rows, seed=info.seed)
    seen = topn_train.pairs_catalog(splits.fit, *sizes)
    record = ranking.evaluate_lists(
        {'topn': ranking.factor_scorer(result.user_factors, result.item_factors, sizes[1])},
        seen, splits.eval.user.numpy(), splits.eval.item.numpy(),
        splits.eval.rating.numpy(), max_users=config.ranking_users, seed=info.seed)
    return {'best_epoch': result.iterations, 'validation_ndcg': result.best_validation_ndcg,
            'eval_ndcg': record['topn']['ndcg']}


def run_trials(base: config_lib.TrainConfig, job_dir: str,
               trials: list[dict[str, object]],
               metric: Metric = Metric('validation_rmse')) -> list[dict[str, object]]:
    """Trains every trial; returns one record each (in trial order)."""
    info = features.read_dataset_info(base.work_dir)
    sizes = data.read_vocabulary_sizes(features.transformed_dir(base.work_dir))
    splits = (train_lib.load_splits(config_lib.with_data_defaults(base, info), info)
              if metric.maximise else None)
    records = []
    for number, flags in enumerate(trials):
        config = config_lib.with_data_defaults(
            trial_config(base, job_dir, number, flags), info)
        started = time.perf_counter()
        outcome = (_ranking_trial(config, info, sizes, splits) if metric.maximise
                   else _rating_trial(config, info, sizes))
        records.append({'trial': number, 'flags': flags, **outcome,
                        'seconds': time.perf_counter() - started})
        logger.info('Trial %d/%d %s: %s %.4f at epoch %d', number + 1, len(trials),
                    flags or '(base flags)', metric.label, outcome[metric.name],
                    outcome['best_epoch'])
    return records


def format_table(records: list[dict[str, object]],
                 metric: Metric = Metric('validation_rmse')) -> str:
    """The trials, best first; 'eval' is the same metric on eval, for information."""
    eval_name = metric.name.replace('validation', 'eval')
    lines = [f'{"trial":>5} {"validation":>10} {"eval":>8} {"epoch":>5} {"s":>6}  flags']
    for record in sorted(records, key=lambda r: r[metric.name], reverse=metric.maximise):
        flags = ' '.join(f'--{name} {value}' for name, value in record['flags'].items())
        lines.append(f'{record["trial"]:>5} {record[metric.name]:>10.4f} '
                     f'{record[eval_name]:>8.4f} {record["best_epoch"]:>5} '
                     f'{record["seconds"]:>6.1f}  {flags or "(base flags)"}')
    return '\n'.join(lines)


def _without(argv: Sequence[str], flag: str, flag_with_value: str) -> list[str]:
    """argv minus a switch and a flag with its value (either spelling)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == flag_with_value:
            skip = True
        elif item != flag and not item.startswith(flag_with_value + '='):
            kept.append(item)
    return kept


def parse_args(argv: Sequence[str] | None
               ) -> tuple[argparse.Namespace, config_lib.TrainConfig]:
    parser = argparse.ArgumentParser(
        prog='python -m trainer.tune', allow_abbrev=False,
        description=__doc__.split('\n\n')[0])
    parser.add_argument('--trials', type=int, default=12,
                        help='settings to try, the base flags included (default 12)')
    parser.add_argument('--search-seed', type=int, default=0,
                        help='seeds the random draws (the trainer keeps --seed)')
    parser.add_argument('--space', default=str(DEFAULT_SPACE),
                        help='a Vertex AI tuning spec whose studySpec.parameters '
                             'are trainer flags (default: hptuning.yaml)')
    args, trainer_argv = parser.parse_known_args(argv)
    args.trainer_argv = _without(trainer_argv, '--overwrite', '--job-dir')
    if args.trials < 1:
        parser.error(f'--trials {args.trials}: pass at least 1, e.g. --trials 12')
    if not pathlib.Path(args.space).is_file():
        parser.error(f'--space {args.space!r}: no such file; pass the tuning spec, '
                     'e.g. --space hptuning.yaml')
    base = config_lib.parse_args(trainer_argv, environ={})
    if base.validation_percent <= 0:
        parser.error('--validation-percent 0 leaves nothing to rank trials by; '
                     'pass e.g. --validation-percent 10')
    return args, base


def main(argv: Sequence[str] | None = None) -> int:
    logs.setup_logging()
    args, base = parse_args(argv)
    job_dir = (base.model_dir if base.model_dir != features.default_model_dir(base.work_dir)
               else features.join(base.work_dir, 'tuning'))
    if tf.io.gfile.exists(job_dir) and tf.io.gfile.listdir(job_dir):
        if not base.overwrite:
            print(f'trainer.tune: error: {job_dir} holds an earlier search; pass '
                  '--overwrite to replace it, or another --job-dir', file=sys.stderr)
            return 2
        logger.warning('--overwrite: removing %s', job_dir)
        tf.io.gfile.rmtree(job_dir)
    try:
        space, metric = read_space(args.space)
    except ValueError as error:
        print(f'trainer.tune: error: {error}', file=sys.stderr)
        return 2
    trials = draw_trials(space, args.trials, args.search_seed)
    try:
        records = run_trials(base, job_dir, trials, metric)
    except (FileNotFoundError, train_lib.ResumeError, data.ShardError) as error:
        print(f'trainer.tune: error: {error}', file=sys.stderr)
        return 2
    features.write_json(features.join(job_dir, RESULTS_FILE),
                        {'space': [dataclasses.asdict(p) for p in space],
                         'metric': metric.name, 'trials': records})
    best = metric.best(records)
    flags = ' '.join(f'--{name} {value}' for name, value in best['flags'].items())
    print(format_table(records, metric))
    print(f'tune: {len(records)} trials over {", ".join(p.name for p in space)}; best '
          f'{metric.label} {best[metric.name]:.4f} (trial {best["trial"]}; base flags '
          f'{records[0][metric.name]:.4f}); wrote {features.join(job_dir, RESULTS_FILE)}')
    print('  train it: .venv/bin/python -m trainer.task '
          + ' '.join(args.trainer_argv + ([flags] if flags else [])))
    return 0


if __name__ == '__main__':
    sys.exit(main())
