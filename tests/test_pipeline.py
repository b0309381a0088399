"""scripts/pipeline.py: the Vertex AI pipeline spec that run-cloud.sh --pipeline submits.

The spec is compiled here and read back; nothing is submitted.  Every step is
a container or Google Cloud Pipeline Components task, so KFP's local
subprocess runner cannot run them (it runs Python components only, and the
Docker runner needs a Docker engine).
"""

from __future__ import annotations

import hashlib
import json
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
                 display_name: str = 'movielens_mf_20260101_000000',
                 render_flags: tuple[str, ...] = ()) -> dict:
    job = tmp_path / 'job.yaml'
    assert render.main(['--out', str(job), '--image-uri', IMAGE, '--machine-type',
                        'n1-standard-4', '--work-dir', WORK_DIR, '--base-output-dir',
                        WORK_DIR + '/model', *render_flags, '--', *trainer_flags]) == 0
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


def producers(task: dict) -> list[str]:
    """The tasks whose outputs (artifacts or parameters) `task` takes as inputs."""
    inputs = task.get('inputs', {})
    refs = [value.get('taskOutputArtifact') or value.get('taskOutputParameter')
            for kind in ('artifacts', 'parameters') for value in inputs.get(kind, {}).values()]
    return sorted({ref['producerTask'] for ref in refs if ref})


def cache_keys(spec: dict) -> dict[str, str]:
    """Each task's cache key as Vertex forms it, up to the hash function.

    Vertex keys a task on its component (executor, input defaults), its
    constant inputs, and the identity of the artifacts and values it takes from
    other tasks; an upstream task that ran again produced new ones.  So a
    task's key here is a digest of its own spec and of its producers' keys;
    an order given only by `.after()` (dependentTasks) is not an input.
    """
    tasks = spec['root']['dag']['tasks']
    keys: dict[str, str] = {}

    def key(name: str) -> str:
        if name not in keys:
            task = tasks[name]
            component = spec['components'][task['componentRef']['name']]
            executor = spec['deploymentSpec']['executors'][component['executorLabel']]
            own = {**task.get('inputs', {}), 'component': component, 'executor': executor}
            text = json.dumps([own, [key(p) for p in producers(task)]], sort_keys=True)
            keys[name] = hashlib.sha256(text.encode()).hexdigest()
        return keys[name]

    return {name: key(name) for name in tasks}


def test_the_steps_their_order_and_caching(tmp_path: pathlib.Path):
    spec = compile_spec(tmp_path, '--batch-recommend', '--top-k', '20')
    tasks = spec['root']['dag']['tasks']
    # Every step takes an output of the step before it as an input.
    assert {name: producers(task) for name, task in tasks.items()} == {
        'extract-ratings': [], 'preprocess': ['extract-ratings'],
        'train': ['preprocess'], 'importer': ['train'],
        'model-upload': ['importer'],
        'batch-recommendations': ['preprocess', 'train']}
    assert all(task['cachingOptions'] == {'enableCache': True} for task in tasks.values())
    # Lineage: each step takes the artifact of the step before it.
    assert tasks['preprocess']['inputs']['artifacts']['staged']['taskOutputArtifact'] == {
        'outputArtifactKey': 'staged', 'producerTask': 'extract-ratings'}
    assert tasks['train']['inputs']['artifacts']['transformed']['taskOutputArtifact'] == {
        'outputArtifactKey': 'transformed', 'producerTask': 'preprocess'}
    assert tasks['importer']['inputs']['parameters']['uri']['taskOutputParameter'] == {
        'outputParameterKey': 'model_uri', 'producerTask': 'train'}
    assert tasks['batch-recommendations']['inputs']['artifacts']['trained'][
        'taskOutputArtifact'] == {'outputArtifactKey': 'trained', 'producerTask': 'train'}
    assert tasks['model-upload']['inputs']['artifacts']['unmanaged_container_model'][
        'taskOutputArtifact']['producerTask'] == 'importer'


def test_a_change_upstream_changes_every_cache_key_downstream(tmp_path: pathlib.Path):
    """Another dataset must not reuse the training, the upload or the lists of the last one."""
    first = cache_keys(compile_spec(tmp_path, '--batch-recommend', '--dataset', 'ml-100k'))
    second = cache_keys(compile_spec(tmp_path, '--batch-recommend', '--dataset', 'ml-1m'))
    assert sorted(first) == sorted(second)
    assert [name for name in first if first[name] == second[name]] == []
    # ... and a trainer flag reruns the training and what follows, not the data steps.
    changed = cache_keys(compile_spec(tmp_path, '--batch-recommend', '--dataset', 'ml-100k',
                                      trainer_flags=('--num-epochs', '7')))
    assert sorted(name for name in first if first[name] != changed[name]) == [
        'batch-recommendations', 'importer', 'model-upload', 'train']


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


def training_inputs(spec: dict) -> dict:
    """The training task's custom-job parameters (the component's defaults)."""
    component = spec['components'][spec['root']['dag']['tasks']['train']['componentRef']['name']]
    return {name: definition.get('defaultValue')
            for name, definition in component['inputDefinitions']['parameters'].items()}


def test_the_bigquery_table_and_the_labels_reach_their_steps(tmp_path: pathlib.Path):
    spec = compile_spec(tmp_path, '--batch-recommend', '--bigquery-table', 'p-1:d.t',
                        '--label', 'app=movielens-mf', '--label', 'dataset=ml-1m',
                        '--run-label', 'run=movielens_mf_20260101_000000')
    batch = container_args(spec, 'batch-recommendations')
    assert batch[batch.index('--bigquery-table') + 1] == 'p-1:d.t'
    labels = {'app': 'movielens-mf', 'dataset': 'ml-1m'}
    assert training_inputs(spec)['labels'] == labels
    upload = spec['root']['dag']['tasks']['model-upload']['inputs']['parameters']['labels']
    assert upload['runtimeValue']['constant'] == labels
    assert 'movielens_mf_20260101_000000' not in json.dumps(spec)  # on the run only


def test_the_training_task_is_the_rendered_custom_job(tmp_path: pathlib.Path):
    from google.cloud import aiplatform_v1  # pylint: disable=import-outside-toplevel
    from google.protobuf import json_format  # pylint: disable=import-outside-toplevel
    spec = compile_spec(tmp_path, trainer_flags=('--num-epochs', '3'))
    inputs = training_inputs(spec)
    (pool,) = inputs['worker_pool_specs']
    parsed = json_format.ParseDict(pool, aiplatform_v1.WorkerPoolSpec.pb(
        aiplatform_v1.WorkerPoolSpec()), ignore_unknown_fields=False)
    assert parsed.replica_count == 1
    rendered = render.render_custom_job(
        render.read_yaml(render.CUSTOM_JOB_TEMPLATE), image_uri=IMAGE,
        machine_type='n1-standard-4', work_dir=WORK_DIR, base_output_dir=WORK_DIR + '/model',
        workers=0, accelerator=None, trainer_flags=['--num-epochs', '3'])
    chief = rendered['workerPoolSpecs'][0]['containerSpec']
    # The training step wraps the rendered command: transformed data in, model out.
    assert list(parsed.container_spec.command)[:2] == ['sh', '-c']
    assert list(parsed.container_spec.args)[3:] == [*chief['command'], *chief['args']]
    assert parsed.container_spec.image_uri == IMAGE
    assert inputs['base_output_directory'] == WORK_DIR + '/model'
    assert inputs['display_name'] == 'movielens_mf_train'


def test_the_training_job_keeps_the_time_limit_spot_workers_and_accelerator(
        tmp_path: pathlib.Path):
    spec = compile_spec(tmp_path, render_flags=('--timeout', '7200', '--spot', '--workers', '2',
                                                '--gpu', 'NVIDIA_TESLA_T4:1'))
    inputs = training_inputs(spec)
    assert (inputs['timeout'], inputs['strategy'], inputs['restart_job_on_worker_restart']) == (
        '7200s', 'SPOT', True)
    chief, workers = inputs['worker_pool_specs']
    assert workers['replica_count'] == 2
    assert chief['machine_spec'] == {'machine_type': 'n1-standard-4',
                                     'accelerator_type': 'NVIDIA_TESLA_T4',
                                     'accelerator_count': 1}


def test_the_model_is_uploaded_with_the_serving_contract(tmp_path: pathlib.Path):
    spec = compile_spec(tmp_path)
    importer = spec['deploymentSpec']['executors'][spec['components'][
        spec['root']['dag']['tasks']['importer']['componentRef']['name']]['executorLabel']]
    # The training's own export, not a fixed directory an older run also wrote.
    assert importer['importer']['artifactUri'] == {'runtimeParameter': 'uri'}
    assert importer['importer']['metadata']['containerSpec'] == {
        'imageUri': SERVING_IMAGE, 'ports': [{'containerPort': 8080}],
        'healthRoute': '/health', 'predictRoute': '/predict'}


def test_the_training_step_exports_into_its_own_model_artifact(tmp_path: pathlib.Path):
    """The step's shell, run here with a stand-in for the trainer's command."""
    import subprocess  # pylint: disable=import-outside-toplevel
    transformed, model_uri, seen = (tmp_path / 'transformed', tmp_path / 'out' / 'model_uri',
                                    tmp_path / 'seen')
    transformed.write_text(WORK_DIR + '/transformed\n')
    trained = 'gs://test-bucket/pipeline_root/123/train/trained'
    done = subprocess.run(
        ['sh', '-c', pipeline._TRAIN_STEP, 'step', str(transformed), trained + '/', str(model_uri),
         'sh', '-c', 'printf "%s %s %s" "$AIP_MODEL_DIR" "$AIP_CHECKPOINT_DIR" "$1" > "$0"',
         str(seen), '--work-dir'], capture_output=True, text=True, check=True)
    assert f'after: {WORK_DIR}/transformed' in done.stdout
    assert seen.read_text() == f'{trained}/model/ {trained}/checkpoints/ --work-dir'
    assert model_uri.read_text() == trained + '/model'


def test_a_re_run_compiles_to_the_same_steps(tmp_path: pathlib.Path):
    """Vertex caches a step by its spec and inputs: a new run name must change neither."""
    first = compile_spec(tmp_path, display_name='movielens_mf_20260101_000000')
    second = compile_spec(tmp_path, display_name='movielens_mf_20260102_000000')
    assert first == second
    changed = compile_spec(tmp_path, trainer_flags=('--num-epochs', '7'))
    tasks = ('extract-ratings', 'preprocess')
    assert [container_args(changed, t) for t in tasks] == [container_args(first, t)
                                                           for t in tasks]
    assert training_inputs(changed) != training_inputs(first)


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
