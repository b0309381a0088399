"""scripts/pipeline.py: the Vertex AI pipeline spec that run-cloud.sh --pipeline submits.

The spec is compiled here and read back; nothing is submitted.  Every step is
a container or Google Cloud Pipeline Components task, so KFP's local
subprocess runner cannot run them (it runs Python components only, and the
Docker runner needs a Docker engine).
"""

from __future__ import annotations

import pathlib

import pytest
import yaml

from conftest import REPO, load_script

render = load_script('scripts/render_job_config.py')
pipeline = load_script('scripts/pipeline.py')

WORK_DIR = 'gs://test-bucket/movielens'
IMAGE = 'us-central1-docker.pkg.dev/p/movielens/trainer:v1'
SERVING_IMAGE = 'us-central1-docker.pkg.dev/p/movielens/serving:v1'
BEAM_FLAGS = ['--runner', 'DataflowRunner', '--project', 'my-project',
              '--sdk_container_image', 'us-central1-docker.pkg.dev/p/movielens/trainer-dataflow:v1',
              '--sdk_location', 'container']


def compile_spec(tmp_path: pathlib.Path, *flags: str, trainer_flags: tuple[str, ...] = (),
                 display_name: str = 'movielens_mf_20260101_000000') -> dict:
    job = tmp_path / 'job.yaml'
    assert render.main(['--out', str(job), '--image-uri', IMAGE, '--machine-type',
                        'n1-standard-4', '--work-dir', WORK_DIR, '--base-output-dir',
                        WORK_DIR + '/model', '--', *trainer_flags]) == 0
    out = tmp_path / f'pipeline-{display_name}.yaml'
    assert pipeline.main(['--out', str(out), '--job-config', str(job), '--project', 'my-project',
                          '--region', 'us-central1', '--work-dir', WORK_DIR,
                          '--display-name', display_name, '--image', IMAGE,
                          '--serving-image', SERVING_IMAGE, *flags, '--', *BEAM_FLAGS]) == 0
    return yaml.safe_load(out.read_text())


def container_args(spec: dict, task: str) -> list[str]:
    component = spec['root']['dag']['tasks'][task]['componentRef']['name']
    executor = spec['deploymentSpec']['executors'][
        spec['components'][component]['executorLabel']]
    return executor['container']['args']


def test_the_steps_their_order_and_caching(tmp_path: pathlib.Path):
    spec = compile_spec(tmp_path, '--batch-recommend', '--top-k', '20')
    tasks = spec['root']['dag']['tasks']
    assert {name: sorted(task.get('dependentTasks', [])) for name, task in tasks.items()} == {
        'extract-ratings': [], 'preprocess': ['extract-ratings'],
        'custom-training-job': ['preprocess'], 'importer': ['custom-training-job'],
        'model-upload': ['importer'],
        'batch-recommendations': ['custom-training-job', 'preprocess']}
    assert all(task['cachingOptions'] == {'enableCache': True} for task in tasks.values())
    # Lineage: each Dataflow step takes the artifact of the step before it.
    assert tasks['preprocess']['inputs']['artifacts']['staged']['taskOutputArtifact'] == {
        'outputArtifactKey': 'staged', 'producerTask': 'extract-ratings'}
    assert tasks['model-upload']['inputs']['artifacts']['unmanaged_container_model'][
        'taskOutputArtifact']['producerTask'] == 'importer'


def test_the_step_commands_are_run_cloud_sh_steps(tmp_path: pathlib.Path):
    spec = compile_spec(tmp_path, '--batch-recommend', '--overwrite')
    extract = container_args(spec, 'extract-ratings')
    assert extract[3:] == ['python', 'data-extractor.py', '--work-dir', WORK_DIR,
                           '--dataset', 'ml-100k', '--overwrite']
    preprocess = container_args(spec, 'preprocess')
    assert preprocess[3:] == ['python', 'preprocess.py', '--work-dir', WORK_DIR, '--overwrite',
                              *BEAM_FLAGS, '--job_name', 'movielens-mf-preprocess']
    batch = container_args(spec, 'batch-recommendations')
    assert batch[3:9] == ['python', '-m', 'trainer.serving.batch', '--work-dir',
                          WORK_DIR, '--export-dir']


def test_the_training_task_is_the_rendered_custom_job(tmp_path: pathlib.Path):
    from google.cloud import aiplatform_v1  # pylint: disable=import-outside-toplevel
    from google.protobuf import json_format  # pylint: disable=import-outside-toplevel
    spec = compile_spec(tmp_path, trainer_flags=('--num-epochs', '3'))
    inputs = spec['root']['dag']['tasks']['custom-training-job']['inputs']['parameters']
    (pool,) = inputs['worker_pool_specs']['runtimeValue']['constant']
    parsed = json_format.ParseDict(pool, aiplatform_v1.WorkerPoolSpec.pb(
        aiplatform_v1.WorkerPoolSpec()), ignore_unknown_fields=False)
    assert parsed.replica_count == 1
    assert list(parsed.container_spec.args) == ['--work-dir', WORK_DIR, '--num-epochs', '3']
    assert parsed.container_spec.image_uri == IMAGE
    assert inputs['base_output_directory']['runtimeValue']['constant'] == WORK_DIR + '/model'


def test_the_model_is_uploaded_with_the_serving_contract(tmp_path: pathlib.Path):
    spec = compile_spec(tmp_path)
    importer = spec['deploymentSpec']['executors'][spec['components'][
        spec['root']['dag']['tasks']['importer']['componentRef']['name']]['executorLabel']]
    assert importer['importer']['artifactUri']['constant'] == WORK_DIR + '/model/model'
    assert importer['importer']['metadata']['containerSpec'] == {
        'imageUri': SERVING_IMAGE, 'ports': [{'containerPort': 8080}],
        'healthRoute': '/health', 'predictRoute': '/predict'}


def test_a_re_run_compiles_to_the_same_steps(tmp_path: pathlib.Path):
    """Vertex caches a step by its spec and inputs: a new run name must change neither."""
    first = compile_spec(tmp_path, display_name='movielens_mf_20260101_000000')
    second = compile_spec(tmp_path, display_name='movielens_mf_20260102_000000')
    assert first == second
    changed = compile_spec(tmp_path, trainer_flags=('--num-epochs', '7'))
    tasks = ('extract-ratings', 'preprocess')
    assert [container_args(changed, t) for t in tasks] == [container_args(first, t)
                                                           for t in tasks]
    assert changed['root']['dag']['tasks']['custom-training-job'] != first['root']['dag'][
        'tasks']['custom-training-job']


def test_a_job_name_among_the_dataflow_flags_is_refused(tmp_path: pathlib.Path, capsys):
    job = tmp_path / 'job.yaml'
    job.write_text('workerPoolSpecs: []\nbaseOutputDirectory: {outputUriPrefix: x}\n')
    with pytest.raises(SystemExit):
        pipeline.main(['--out', str(tmp_path / 'p.yaml'), '--job-config', str(job),
                       '--project', 'p', '--region', 'r', '--work-dir', WORK_DIR,
                       '--display-name', 'n', '--image', IMAGE, '--', '--job_name', 'x'])
    assert '--job_name' in capsys.readouterr().err


def test_the_images_hold_the_scripts_the_pipeline_runs():
    dockerfile = (REPO / 'Dockerfile').read_text()
    assert 'COPY data-extractor.py preprocess.py ./' in dockerfile
