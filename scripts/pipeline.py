"""The run-cloud.sh steps as a Vertex AI (KFP v2) pipeline: compile, and submit.

Owns turning run-cloud.sh --pipeline's flags into a pipeline spec.  The steps
are the ones run-cloud.sh runs itself, each a pipeline task with caching on:

  extract-ratings          data-extractor.py, in the trainer image
  preprocess               preprocess.py on Dataflow (launched from the trainer image)
  custom-training-job      the Vertex AI custom job of the rendered config.yaml
  importer / model-upload  the SavedModel into the Model Registry with the serving image
  batch-recommendations    trainer.serving.batch on Dataflow (--batch-recommend)

Every command line is fixed when the pipeline is compiled, so a re-run with the
same flags and images is served from the cache step by step; a step whose
flags, image or upstream output changed runs again.  The extract and
preprocess steps output a Dataset artifact (a file naming the directory they
wrote), which the next step takes as input: Vertex ML Metadata records the
lineage staged ratings -> transformed data -> training, and the importer's
UnmanagedContainerModel -> the uploaded model.

    python scripts/pipeline.py --out PIPELINE.yaml --job-config JOB.yaml --project P
        --region R --work-dir gs://B/P --display-name NAME --image URI [--serving-image URI] [--dataset D] [--data-sources S] [--service-account SA]
        [--tensorboard RESOURCE] [--overwrite] [--batch-recommend --top-k K]
        [--submit] [-- BEAM_FLAGS...]

--job-config is what scripts/render_job_config.py wrote; BEAM_FLAGS are the
Dataflow flags run-cloud.sh gives step 3 (without --job_name).
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
    beam_flags: tuple[str, ...] = ()


def _dataflow_flags(config: PipelineConfig, job_name: str) -> list[str]:
    return [*config.beam_flags, '--job_name', job_name]


def build_pipeline(config: PipelineConfig):
    """The pipeline function (compile it with kfp.compiler)."""
    from google_cloud_pipeline_components.types import artifact_types  # pylint: disable=import-outside-toplevel
    from google_cloud_pipeline_components.v1.custom_job import CustomTrainingJobOp  # pylint: disable=import-outside-toplevel
    from google_cloud_pipeline_components.v1.model import ModelUploadOp  # pylint: disable=import-outside-toplevel
    overwrite = ['--overwrite'] if config.overwrite else []
    dataflow_job = DATAFLOW_JOB_NAME + '-preprocess'
    extract_args = ['python', 'data-extractor.py', '--work-dir', config.work_dir,
                    '--dataset', config.dataset, *overwrite]
    if config.data_sources:
        extract_args += ['--data-sources', config.data_sources]

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
    def batch_recommendations(transformed: dsl.Input[dsl.Dataset],
                              recommendations: dsl.Output[dsl.Dataset]):
        return dsl.ContainerSpec(
            image=config.image, command=['sh', '-c', _STEP, 'step'],
            args=[transformed.path, recommendations.path, config.work_dir + '/recommendations',
                  'python', '-m', 'trainer.serving.batch', '--work-dir', config.work_dir,
                  '--export-dir', config.work_dir + '/model/model', '-k', str(config.top_k),
                  *overwrite, *_dataflow_flags(config, DATAFLOW_JOB_NAME + '-recommend')])

    @dsl.pipeline(name='movielens-mf', description='MovieLens matrix factorisation: '
                  'extract, preprocess on Dataflow, train on Vertex AI, upload, recommend.')
    def movielens_pipeline():
        staged = extract_ratings().set_display_name('extract ratings')
        transformed = preprocess(staged=staged.outputs['staged']).set_display_name(
            'preprocess on Dataflow')
        train = CustomTrainingJobOp(
            project=config.project, location=config.region, display_name=TRAINING_JOB_NAME,
            worker_pool_specs=config.job_spec['workerPoolSpecs'],
            base_output_directory=config.job_spec['baseOutputDirectory']['outputUriPrefix'],
            service_account=config.service_account or '',
            tensorboard=config.tensorboard or '').after(transformed)
        if config.serving_image:
            model = dsl.importer(
                artifact_uri=config.work_dir + '/model/model',
                artifact_class=artifact_types.UnmanagedContainerModel,
                metadata={'containerSpec': {
                    'imageUri': config.serving_image,
                    'ports': [{'containerPort': server.DEFAULT_PORT}],
                    'healthRoute': server.DEFAULT_HEALTH_ROUTE,
                    'predictRoute': server.DEFAULT_PREDICT_ROUTE}}).after(train)
            ModelUploadOp(project=config.project, location=config.region,
                          display_name=MODEL_NAME,
                          unmanaged_container_model=model.output)
        if config.batch_recommend:
            batch_recommendations(transformed=transformed.outputs['transformed']).after(
                train).set_display_name('batch recommendations on Dataflow')

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
        location=config.region, enable_caching=True)
    job.submit(service_account=config.service_account)
    return job.resource_name


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
        batch_recommend=args.batch_recommend, top_k=args.top_k, beam_flags=beam_flags)
    compile_pipeline(config, args.out)
    if args.submit:
        print(f'pipeline: submitted {submit(config, args.out)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
