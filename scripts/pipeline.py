"""The run-cloud.sh steps as a Vertex AI (KFP v2) pipeline: compile, and submit.

Owns turning run-cloud.sh --pipeline's flags into a pipeline spec.  The steps
are the ones run-cloud.sh runs itself, each a pipeline task with caching on:

  extract-ratings          data-extractor.py, in the trainer image
  preprocess               preprocess.py on Dataflow (launched from the trainer image)
  train                    the Vertex AI custom job of the rendered config.yaml
  importer / model-upload  the SavedModel into the Model Registry with the serving image
  batch-recommendations    trainer.serving.batch on Dataflow (--batch-recommend)

Every command line is fixed when the pipeline is compiled, so a re-run with the
same flags and images is served from the cache step by step; a step whose
flags, image or upstream output changed runs again.  Every step takes what the
step before it produced as an input, never only an order (`.after`): Vertex keys
its cache on a task's inputs, so a step that reran upstream makes every step
after it rerun too.  The extract and preprocess steps output a Dataset artifact
(a file naming the directory they wrote); training takes the transformed data
and outputs a Model artifact, the directory of its own that it exported to (a
new one for every training job, so a model is never read from a directory an
older run also wrote); the importer and the batch step take that model.
Vertex ML Metadata records the lineage staged ratings -> transformed data ->
model -> the uploaded model.

    python scripts/pipeline.py --out PIPELINE.yaml --job-config JOB.yaml --project P
        --region R --work-dir gs://B/P --display-name NAME --image URI [--serving-image URI] [--dataset D] [--data-sources S] [--service-account SA]
        [--tensorboard RESOURCE] [--overwrite] [--batch-recommend --top-k K
        [--bigquery-table P:D.T]] [--label KEY=VALUE ...] [--run-label KEY=VALUE ...]
        [--submit] [-- BEAM_FLAGS...]

--job-config is what scripts/render_job_config.py wrote; BEAM_FLAGS are the
Dataflow flags run-cloud.sh gives step 3 (without --job_name).  --label goes on
the training job and the uploaded model; --run-label only on the pipeline run
(a label that changes every run would change every step's cache key).
"""

# No `from __future__ import annotations`: KFP reads the component annotations at runtime.

import argparse
import dataclasses
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import yaml
from kfp import compiler, dsl

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as python scripts/pipeline.py
    sys.path.insert(0, str(REPO))
from trainer.serving import server  # pylint: disable=wrong-import-position

# A step: run the command, then write the directory it produced into its
# output artifact.  $1: an input artifact (or /dev/null), $2: the output
# artifact's local path, $3: the directory it names; the command follows.
_STEP = ('set -e; echo "after: $(cat "$1")"; out="$2"; produced="$3"; shift 3; "$@"; '
         'mkdir -p "$(dirname "$out")"; printf "%s\\n" "$produced" > "$out"')
# The training step: $1 the transformed data's artifact, $2 the URI of the
# training's Model artifact (new for every job), $3 the local path of the
# model_uri output; the rendered container command follows.  The SavedModel and
# the checkpoints go under $2 instead of the job's fixed baseOutputDirectory, so
# a new job neither resumes an older run's checkpoints nor leaves its model
# where the last one was.  Vertex restarts a job under the same name, so a
# restarted (or preempted) job still resumes its own checkpoints.
_TRAIN_STEP = ('set -e; echo "after: $(cat "$1")"; trained="${2%/}"; out="$3"; shift 3; '
               'export AIP_MODEL_DIR="$trained/model/" AIP_CHECKPOINT_DIR="$trained/checkpoints/"; '
               '"$@"; mkdir -p "$(dirname "$out")"; printf "%s" "$trained/model" > "$out"')
# Names of what the steps create: fixed, so that they are cache keys that do not
# change from run to run (the pipeline run itself is named by --display-name).
TRAINING_JOB_NAME = 'movielens_mf_train'
MODEL_NAME = 'movielens_mf'
DATAFLOW_JOB_NAME = 'movielens-mf'


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything the pipeline's command lines hold."""
    project: str
    region: str
    work_dir: str
    display_name: str
    image: str
    job_spec: dict[str, Any]
    dataset: str = 'ml-100k'
    data_sources: str | None = None
    serving_image: str | None = None
    service_account: str | None = None
    tensorboard: str | None = None
    overwrite: bool = False
    batch_recommend: bool = False
    top_k: int = 10
    bigquery_table: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    run_labels: tuple[tuple[str, str], ...] = ()
    beam_flags: tuple[str, ...] = ()


def _dataflow_flags(config: PipelineConfig, job_name: str) -> list[str]:
    return [*config.beam_flags, '--job_name', job_name]


def training_job_options(job_spec: dict[str, Any]) -> dict[str, Any]:
    """The rendered CustomJobSpec as create_custom_training_job_from_component's options.

    Raises:
      ValueError: the spec's worker pools are not the chief and one copy of it
        (what render_job_config.py writes), which the wrapper cannot express.
    """
    chief, *others = job_spec['workerPoolSpecs']
    workers = sum(pool['replicaCount'] for pool in others)
    if any({**pool, 'replicaCount': 1} != chief for pool in others):
        raise ValueError('the job config\'s worker pools differ from the chief\'s; '
                         'pass what render_job_config.py wrote')
    machine = chief['machineSpec']
    scheduling = job_spec.get('scheduling', {})
    options = {'replica_count': 1 + workers, 'machine_type': machine['machineType'],
               'base_output_directory': job_spec['baseOutputDirectory']['outputUriPrefix'],
               'restart_job_on_worker_restart': scheduling.get('restartJobOnWorkerRestart', False),
               'strategy': scheduling.get('strategy', 'STANDARD')}
    if 'timeout' in scheduling:
        options['timeout'] = scheduling['timeout']
    if 'acceleratorType' in machine:
        options['accelerator_type'] = machine['acceleratorType']
        options['accelerator_count'] = machine['acceleratorCount']
    if 'tensorboard' in job_spec:
        options['tensorboard'] = job_spec['tensorboard']
    return options


def build_pipeline(config: PipelineConfig):
    """The pipeline function (compile it with kfp.compiler)."""
    from google_cloud_pipeline_components.types import artifact_types  # pylint: disable=import-outside-toplevel
    from google_cloud_pipeline_components.v1.custom_job import create_custom_training_job_from_component  # pylint: disable=import-outside-toplevel
    from google_cloud_pipeline_components.v1.model import ModelUploadOp  # pylint: disable=import-outside-toplevel
    overwrite = ['--overwrite'] if config.overwrite else []
    dataflow_job = DATAFLOW_JOB_NAME + '-preprocess'
    extract_args = ['python', 'data-extractor.py', '--work-dir', config.work_dir,
                    '--dataset', config.dataset, *overwrite]
    if config.data_sources:
        extract_args += ['--data-sources', config.data_sources]
    batch_args = ['-k', str(config.top_k), *overwrite]
    if config.bigquery_table:
        batch_args += ['--bigquery-table', config.bigquery_table]
    chief = config.job_spec['workerPoolSpecs'][0]['containerSpec']
    labels = dict(config.labels)

    @dsl.container_component
    def extract_ratings(staged: dsl.Output[dsl.Dataset]):
        return dsl.ContainerSpec(image=config.image, command=['sh', '-c', _STEP, 'step'],
                                 args=['/dev/null', staged.path, config.work_dir + '/raw',
                                       *extract_args])

    @dsl.container_component
    def preprocess(staged: dsl.Input[dsl.Dataset], transformed: dsl.Output[dsl.Dataset]):
        return dsl.ContainerSpec(
            image=config.image, command=['sh', '-c', _STEP, 'step'],
            args=[staged.path, transformed.path, config.work_dir + '/transformed',
                  'python', 'preprocess.py', '--work-dir', config.work_dir, *overwrite,
                  *_dataflow_flags(config, dataflow_job)])

    @dsl.container_component
    def train(transformed: dsl.Input[dsl.Dataset], trained: dsl.Output[dsl.Model],
              model_uri: dsl.OutputPath(str)):
        return dsl.ContainerSpec(
            image=config.image, command=['sh', '-c', _TRAIN_STEP, 'step'],
            args=[transformed.path, trained.uri, model_uri, *chief['command'],
                  *chief.get('args', [])])

    @dsl.container_component
    def batch_recommendations(transformed: dsl.Input[dsl.Dataset], trained: dsl.Input[dsl.Model],
                              recommendations: dsl.Output[dsl.Dataset]):
        return dsl.ContainerSpec(
            image=config.image, command=['sh', '-c', _STEP, 'step'],
            args=[transformed.path, recommendations.path, config.work_dir + '/recommendations',
                  'python', '-m', 'trainer.serving.batch', '--work-dir', config.work_dir,
                  '--export-dir', dsl.ConcatPlaceholder([trained.uri, '/model']), *batch_args,
                  *_dataflow_flags(config, DATAFLOW_JOB_NAME + '-recommend')])

    training_job = create_custom_training_job_from_component(
        train, display_name=TRAINING_JOB_NAME, service_account=config.service_account or '',
        labels=labels, **training_job_options(config.job_spec))

    @dsl.pipeline(name='movielens-mf', description='MovieLens matrix factorisation: '
                  'extract, preprocess on Dataflow, train on Vertex AI, upload, recommend.')
    def movielens_pipeline():
        staged = extract_ratings().set_display_name('extract ratings')
        transformed = preprocess(staged=staged.outputs['staged']).set_display_name(
            'preprocess on Dataflow')
        trained = training_job(transformed=transformed.outputs['transformed'],
                               project=config.project, location=config.region
                               ).set_display_name('train on Vertex AI')
        if config.serving_image:
            model = dsl.importer(
                artifact_uri=trained.outputs['model_uri'],
                artifact_class=artifact_types.UnmanagedContainerModel,
                metadata={'containerSpec': {
                    'imageUri': config.serving_image,
                    'ports': [{'containerPort': server.DEFAULT_PORT}],
                    'healthRoute': server.DEFAULT_HEALTH_ROUTE,
                    'predictRoute': server.DEFAULT_PREDICT_ROUTE}})
            ModelUploadOp(project=config.project, location=config.region,
                          display_name=MODEL_NAME, labels=labels,
                          unmanaged_container_model=model.output)
        if config.batch_recommend:
            batch_recommendations(transformed=transformed.outputs['transformed'],
                                  trained=trained.outputs['trained']).set_display_name(
                'batch recommendations on Dataflow')

    return movielens_pipeline


def compile_pipeline(config: PipelineConfig, out: pathlib.Path) -> None:
    """Writes the pipeline spec (YAML) to `out`; every task caches."""
    compiler.Compiler().compile(build_pipeline(config), package_path=str(out))


def submit(config: PipelineConfig, spec: pathlib.Path) -> str:
    """Submits the compiled spec to Vertex AI Pipelines; returns the run's resource name."""
    from google.cloud import aiplatform  # pylint: disable=import-outside-toplevel
    job = aiplatform.PipelineJob(
        display_name=config.display_name, template_path=str(spec),
        pipeline_root=config.work_dir + '/pipeline_root', project=config.project,
        location=config.region, enable_caching=True,
        labels={**dict(config.labels), **dict(config.run_labels)})
    job.submit(service_account=config.service_account)
    return job.resource_name


def _label(text: str) -> tuple[str, str]:
    key, equals, value = text.partition('=')
    if not equals or not key:
        raise argparse.ArgumentTypeError(f'{text!r} is not KEY=VALUE')
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python scripts/pipeline.py', allow_abbrev=False,
        description='Compiles (and with --submit, submits) the Vertex AI pipeline of '
                    'run-cloud.sh --pipeline; Dataflow flags go after --.')
    add = parser.add_argument
    add('--out', required=True, type=pathlib.Path, help='where the pipeline spec goes')
    add('--job-config', required=True, type=pathlib.Path,
        help='the custom-job config scripts/render_job_config.py wrote')
    for name in ('--project', '--region', '--work-dir', '--display-name', '--image'):
        add(name, required=True)
    add('--dataset', default='ml-100k')
    add('--data-sources')
    add('--serving-image', help='upload the model with this serving image')
    add('--service-account')
    add('--tensorboard')
    add('--overwrite', action='store_true')
    add('--batch-recommend', action='store_true')
    add('--top-k', type=int, default=10)
    add('--bigquery-table', help='--batch-recommend: also write the lists to this table')
    add('--label', action='append', default=[], type=_label, metavar='KEY=VALUE',
        help='on the training job, the model and the pipeline run (repeatable)')
    add('--run-label', action='append', default=[], type=_label, metavar='KEY=VALUE',
        help='on the pipeline run only, e.g. run=NAME (repeatable)')
    add('--submit', action='store_true', help='submit the compiled pipeline')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    flags = list(sys.argv[1:] if argv is None else argv)
    # Our flags, then `--` and the Dataflow flags.
    ours = flags[:flags.index('--')] if '--' in flags else flags
    beam_flags = tuple(flags[len(ours) + 1:])
    parser = build_parser()
    args = parser.parse_args(ours)
    if any(flag.split('=', 1)[0] == '--job_name' for flag in beam_flags):
        parser.error('--job_name is set per step; drop it from the flags after --')
    job_spec = yaml.safe_load(args.job_config.read_text(encoding='utf-8'))
    if 'workerPoolSpecs' not in job_spec:
        parser.error(f'--job-config {args.job_config} is not a custom-job config '
                     '(no workerPoolSpecs); pass what render_job_config.py wrote without '
                     '--hp-tuning')
    config = PipelineConfig(
        project=args.project, region=args.region, work_dir=args.work_dir.rstrip('/'),
        display_name=args.display_name, image=args.image,
        job_spec=job_spec, dataset=args.dataset, data_sources=args.data_sources,
        serving_image=args.serving_image, service_account=args.service_account,
        tensorboard=args.tensorboard, overwrite=args.overwrite,
        batch_recommend=args.batch_recommend, top_k=args.top_k,
        bigquery_table=args.bigquery_table, labels=tuple(args.label),
        run_labels=tuple(args.run_label), beam_flags=beam_flags)
    if args.bigquery_table and not args.batch_recommend:
        parser.error('--bigquery-table only applies with --batch-recommend')
    try:
        compile_pipeline(config, args.out)
    except ValueError as error:
        parser.error(str(error))
    if args.submit:
        print(f'pipeline: submitted {submit(config, args.out)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
