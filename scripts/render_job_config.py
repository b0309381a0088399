"""Fills the Vertex AI job templates (config.yaml, hptuning.yaml) for run-cloud.sh.

Owns: turning run-cloud.sh's flags into the YAML that `gcloud ai custom-jobs
create --config` or `gcloud ai hp-tuning-jobs create --config` reads.  The job's
shape lives in the templates; this module only substitutes values and adds the
parts that depend on flags (trainer flags, the worker pool, the accelerator,
the time limit and Spot VMs).

    python scripts/render_job_config.py --out JOB.yaml --image-uri URI
        --machine-type n1-standard-4 --work-dir gs://B/P --base-output-dir gs://B/P/model
        [--workers N] [--gpu TYPE:COUNT] [--tensorboard RESOURCE] [--timeout SECONDS]
        [--spot] [--overwrite] [--hp-tuning] [-- TRAINER_FLAGS...]

A placeholder is a whole YAML value spelled ${NAME} (capitals); it is replaced
in the parsed document, never in the text, so no value can change the YAML's
structure.  Other strings that merely contain "${" (the shell line in
config.yaml) are left alone.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer import features  # noqa: E402  (the metric names; no TensorFlow)

CUSTOM_JOB_TEMPLATE = REPO / 'config.yaml'
TUNING_JOB_TEMPLATE = REPO / 'hptuning.yaml'

_PLACEHOLDER = re.compile(r'\$\{([A-Z][A-Z0-9_]*)\}')
_ACCELERATOR = re.compile(r'([A-Z][A-Z0-9_]*):([1-9][0-9]*)')
# Trainer flags the job sets itself, and where from; a second copy among the
# trainer flags would be a repeated flag with an ambiguous winner.
_FLAGS_SET_HERE = {'--work-dir': 'run-cloud.sh --work-dir',
                   '--job-dir': 'the job (from AIP_MODEL_DIR, see config.yaml)',
                   '--overwrite': 'run-cloud.sh --overwrite'}
# Every tuning trial's: the service reads only the validation metric, so a trial
# skips the refit, the posterior sweeps, the ranking evaluation and the export;
# --tuning-metric names the study's metric (`trial_flags`).
_TRIAL_FLAGS = ('--metric-only', '--tuning-metric')


def fill_placeholders(node: Any, values: Mapping[str, Any]) -> Any:
    """Returns a copy of a parsed YAML document with ${NAME} values replaced.

    Args:
      node: the parsed document (dicts, lists, scalars).
      values: NAME -> replacement; a replacement may itself be a dict or list.

    Returns:
      The filled copy.

    Raises:
      ValueError: the document holds a placeholder missing from `values`, or a
        value in `values` has no placeholder (the template and this module
        disagree about what the job needs).
    """
    used: set[str] = set()

    def fill(item: Any) -> Any:
        if isinstance(item, dict):
            return {key: fill(value) for key, value in item.items()}
        if isinstance(item, list):
            return [fill(value) for value in item]
        match = _PLACEHOLDER.fullmatch(item) if isinstance(item, str) else None
        if match is None:
            return item
        name = match.group(1)
        if name not in values:
            raise ValueError(f'the template has ${{{name}}}, which nothing fills')
        used.add(name)
        return copy.deepcopy(values[name])

    filled = fill(node)
    unused = sorted(set(values) - used)
    if unused:
        raise ValueError(f'the template has no ${{{unused[0]}}} placeholder')
    return filled


def parse_accelerator(text: str) -> tuple[str, int]:
    """Splits 'NVIDIA_TESLA_T4:1' into ('NVIDIA_TESLA_T4', 1).

    Raises:
      ValueError: not TYPE:COUNT with COUNT a positive integer.
    """
    match = _ACCELERATOR.fullmatch(text)
    if match is None:
        raise ValueError(f'{text!r} is not TYPE:COUNT, e.g. NVIDIA_TESLA_T4:1')
    return match.group(1), int(match.group(2))


def check_trainer_flags(trainer_flags: Sequence[str],
                        reserved: Mapping[str, str]) -> None:
    """Refuses trainer flags that run-cloud.sh or the tuning service sets.

    Args:
      trainer_flags: the flags given after --.
      reserved: flag -> what sets it, e.g. {'--overwrite': 'run-cloud.sh --overwrite'}.

    Raises:
      ValueError: naming the first reserved flag found.
    """
    for flag in trainer_flags:
        name = flag.split('=', 1)[0]
        if name in reserved:
            raise ValueError(f'trainer flag {name} is set by {reserved[name]}; '
                             'drop it from the flags after --')


def tuned_flags(tuning_template: Mapping[str, Any]) -> list[str]:
    """The trainer flags a tuning job sets: --<parameterId> for each parameter."""
    return ['--' + parameter['parameterId']
            for parameter in tuning_template['studySpec']['parameters']]


def _flag_value(flags: Sequence[str], name: str) -> str | None:
    """The last value of --name among flags (as --name V or --name=V), or None."""
    value = None
    for position, flag in enumerate(flags):
        if flag == name and position + 1 < len(flags):
            value = flags[position + 1]
        elif flag.startswith(name + '='):
            value = flag.split('=', 1)[1]
    return value


def study_metric(tuning_template: Mapping[str, Any]) -> str:
    """The one metric the study ranks trials by.

    Raises:
      ValueError: the study ranks by a metric the trainer does not report.
    """
    metrics = tuning_template['studySpec']['metrics']
    metric = metrics[0]['metricId'] if len(metrics) == 1 else None
    if metric not in features.TUNING_METRICS:
        raise ValueError(f'the tuning template must rank by one metric the trainer reports, '
                         f'{" or ".join(features.TUNING_METRICS)}, not '
                         f'{[m.get("metricId") for m in metrics]}')
    return metric


def trial_flags(tuning_template: Mapping[str, Any]) -> list[str]:
    """What every trial passes the trainer: --metric-only and the study's metric."""
    return ['--metric-only', f'--tuning-metric={study_metric(tuning_template)}']


def render_custom_job(template: Mapping[str, Any], *, image_uri: str,
                      machine_type: str, work_dir: str, base_output_dir: str,
                      workers: int, accelerator: tuple[str, int] | None,
                      trainer_flags: Sequence[str],
                      tensorboard: str | None = None) -> dict[str, Any]:
    """Fills config.yaml and adds the flag-dependent parts.

    Args:
      template: the parsed config.yaml, with exactly one worker pool (the chief).
      image_uri: the training image.
      machine_type: the Compute Engine machine type of every replica.
      work_dir: the gs:// work dir, passed to the trainer as --work-dir.
      base_output_dir: the job's baseOutputDirectory (outputUriPrefix).
      workers: replicas in worker pool 1; 0 means no pool 1.
      accelerator: (type, count) per replica, or None for CPU only.
      trainer_flags: appended to every pool's container args.
      tensorboard: a Vertex AI TensorBoard instance
        (projects/P/locations/R/tensorboards/ID) that receives the job's
        AIP_TENSORBOARD_LOG_DIR events, or None.

    Returns:
      A CustomJobSpec as a dict.
    """
    spec = fill_placeholders(template, {
        'IMAGE_URI': image_uri, 'MACHINE_TYPE': machine_type,
        'WORK_DIR': work_dir, 'BASE_OUTPUT_DIR': base_output_dir})
    pools = spec['workerPoolSpecs']
    if len(pools) != 1:
        raise ValueError(f'config.yaml must define one worker pool (the chief), '
                         f'not {len(pools)}; --workers adds the others')
    chief = pools[0]
    chief['containerSpec'].setdefault('args', []).extend(trainer_flags)
    if accelerator is not None:
        chief['machineSpec']['acceleratorType'] = accelerator[0]
        chief['machineSpec']['acceleratorCount'] = accelerator[1]
    if workers > 0:
        pools.append({**copy.deepcopy(chief), 'replicaCount': workers})
    if tensorboard is not None:
        spec['tensorboard'] = tensorboard
    return spec


def scheduling(timeout_seconds: int | None, spot: bool) -> dict[str, Any]:
    """The job's `scheduling` (aiplatform_v1.Scheduling, camelCase as gcloud reads it).

    Args:
      timeout_seconds: the job is cancelled after this long (Vertex's default
        is 7 days); None leaves the default.
      spot: run on Spot VMs (strategy SPOT).  A preempted VM is a restarted
        worker, so the job restarts with it (restartJobOnWorkerRestart) and the
        trainer resumes from its checkpoints in AIP_CHECKPOINT_DIR.
    """
    result: dict[str, Any] = {}
    if timeout_seconds is not None:
        result['timeout'] = f'{timeout_seconds}s'
    if spot:
        result['strategy'] = 'SPOT'
        result['restartJobOnWorkerRestart'] = True
    return result


def render_tuning_job(template: Mapping[str, Any],
                      trial_job_spec: Mapping[str, Any]) -> dict[str, Any]:
    """Fills hptuning.yaml with the trial's CustomJobSpec."""
    return fill_placeholders(template, {'TRIAL_JOB_SPEC': trial_job_spec})


def read_yaml(path: pathlib.Path) -> dict[str, Any]:
    with open(path, encoding='utf-8') as f:
        return yaml.safe_load(f)


def to_yaml(document: Mapping[str, Any]) -> str:
    # Wide lines: folding the long shell line would be valid YAML but hard to read.
    return yaml.safe_dump(dict(document), sort_keys=False,
                          default_flow_style=False, width=1000)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python scripts/render_job_config.py', allow_abbrev=False,
        description='Writes the Vertex AI job config run-cloud.sh submits; '
                    'trainer flags go after --.')
    add = parser.add_argument
    add('--out', required=True, type=pathlib.Path, help='where the YAML goes')
    add('--image-uri', required=True)
    add('--machine-type', required=True)
    add('--work-dir', required=True)
    add('--base-output-dir', required=True)
    add('--workers', type=int, default=0,
        help='replicas in worker pool 1 (default 0: the chief only)')
    add('--gpu', metavar='TYPE:COUNT', help='accelerator per replica')
    add('--tensorboard', metavar='RESOURCE',
        help='Vertex AI TensorBoard: projects/P/locations/R/tensorboards/ID')
    add('--timeout', type=int, metavar='SECONDS',
        help='scheduling.timeout: the job is cancelled after this long')
    add('--spot', action='store_true',
        help='scheduling.strategy SPOT, the job restarted after a preemption')
    add('--overwrite', action='store_true',
        help='pass --overwrite to the trainer (run-cloud.sh --overwrite)')
    add('--hp-tuning', action='store_true',
        help='write a hyperparameter-tuning job (hptuning.yaml) instead')
    add('--template', type=pathlib.Path, default=CUSTOM_JOB_TEMPLATE)
    add('--tuning-template', type=pathlib.Path, default=TUNING_JOB_TEMPLATE,
        help='the study with --hp-tuning (default hptuning.yaml; hptuning-ranking.yaml '
             'tunes the top-N model by validation NDCG@10)')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index('--') if '--' in argv else len(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:split])
    trainer_flags = argv[split + 1:]
    if args.workers < 0:
        parser.error(f'argument --workers: {args.workers} is negative; pass 0 or more')
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f'argument --timeout: {args.timeout} is not a positive number of seconds')
    try:
        accelerator = parse_accelerator(args.gpu) if args.gpu else None
        tuning_template = read_yaml(args.tuning_template) if args.hp_tuning else None
        reserved = dict(_FLAGS_SET_HERE)
        if tuning_template is not None:
            reserved.update(dict.fromkeys(tuned_flags(tuning_template),
                                          f'{args.tuning_template.name} (it is tuned)'))
            reserved.update(dict.fromkeys(_TRIAL_FLAGS, 'run-cloud.sh --hp-tuning'))
        check_trainer_flags(trainer_flags, reserved)
        if tuning_template is not None:
            trainer_flags = [*trial_flags(tuning_template), *trainer_flags]
            if (study_metric(tuning_template) == features.RANKING_METRIC_ID
                    and _flag_value(trainer_flags, '--topn-model') == 'rating'):
                raise ValueError(f'{args.tuning_template.name} tunes the top-N model, which '
                                 'trainer flag --topn-model rating turns off; drop that flag')
        if args.workers and '--implicit-feedback' in trainer_flags:
            raise ValueError(f'trainer flag --implicit-feedback trains one replica, not the '
                             f'chief and {args.workers} workers; drop --workers or the flag')
        job = render_custom_job(
            read_yaml(args.template), image_uri=args.image_uri,
            machine_type=args.machine_type, work_dir=args.work_dir,
            base_output_dir=args.base_output_dir, workers=args.workers,
            accelerator=accelerator, tensorboard=args.tensorboard,
            trainer_flags=['--overwrite', *trainer_flags] if args.overwrite else trainer_flags)
        if args.timeout is not None or args.spot:
            job['scheduling'] = scheduling(args.timeout, args.spot)
        if tuning_template is not None:
            job = render_tuning_job(tuning_template, job)
    except (ValueError, OSError, yaml.YAMLError) as error:
        # One line, as run-cloud.sh reports every bad flag.
        print(f'{parser.prog}: error: {error}', file=sys.stderr)
        return 2
    args.out.write_text(to_yaml(job), encoding='utf-8')
    return 0


if __name__ == '__main__':
    sys.exit(main())
