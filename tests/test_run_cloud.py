"""run-cloud.sh and scripts/render_job_config.py, against a recording gcloud.

tests/fake_gcloud/gcloud stands in for the Google Cloud CLI: it records each call
(and the --config file it was given) and answers with fixed values; nothing here
reaches Google Cloud.  data-extractor.py and preprocess.py (Dataflow) are
skipped (--skip-extract --skip-preprocess); their command lines are checked in
--dry-run output.  The chart step runs for real once, reading a loss log from
the GCS emulator (the `gcs` fixture, tests/gcs_emulator.py); the other runs skip
it.  What the recorded YAML would do on Vertex AI is not tested here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from conftest import REPO, load_script

RUN_CLOUD = REPO / 'run-cloud.sh'
FAKE_GCLOUD_DIR = REPO / 'tests' / 'fake_gcloud'
WORK_DIR = 'gs://test-bucket/movielens'
IMAGE = 'us-central1-docker.pkg.dev/test-project/movielens/trainer:v1'
FAKE_PROJECT = 'fake-project-123'  # what the fake answers to `config get-value project`
# The steps that need a real bucket are skipped; job states are polled without waiting.
OFFLINE = ('--skip-extract', '--skip-preprocess', '--skip-plot', '--poll-seconds', '0')
JOB_NAME = re.compile(r'^movielens_mf_\d{8}_\d{6}$')

render = load_script('scripts/render_job_config.py')


@dataclasses.dataclass(frozen=True)
class CloudRun:
    """One run of run-cloud.sh: exit code, output, and the gcloud calls recorded."""
    returncode: int
    stdout: str
    stderr: str
    calls: list[dict[str, Any]]

    def gcloud(self, *prefix: str) -> list[dict[str, Any]]:
        """The recorded calls whose argv starts with `prefix`."""
        return [call for call in self.calls if call['argv'][:len(prefix)] == list(prefix)]

    def submitted_config(self, kind: str = 'custom-jobs') -> dict[str, Any]:
        """The YAML that `gcloud ai KIND create --config` received, parsed."""
        (create,) = self.gcloud('ai', kind, 'create')
        return yaml.safe_load(create['config'])


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.fixture
def run_cloud(tmp_path: pathlib.Path) -> Callable[..., CloudRun]:
    """Runs run-cloud.sh with the recording gcloud first on PATH."""
    log = tmp_path / 'gcloud-calls.jsonl'

    home = tmp_path / 'home'  # no Application Default Credentials file of this machine's
    home.mkdir()

    def run(*flags: str, **env: str) -> CloudRun:
        environ = {**os.environ, 'FAKE_GCLOUD_LOG': str(log), 'HOME': str(home),
                   'PATH': f'{FAKE_GCLOUD_DIR}{os.pathsep}{os.environ["PATH"]}', **env}
        for name in ('GOOGLE_APPLICATION_CREDENTIALS', 'CLOUDSDK_CONFIG'):
            if name not in env:
                environ.pop(name, None)
        done = subprocess.run([str(RUN_CLOUD), *flags], env=environ, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        calls = ([json.loads(line) for line in log.read_text().splitlines()]
                 if log.exists() else [])
        return CloudRun(done.returncode, done.stdout, done.stderr, calls)

    return run


def test_single_replica_job_config_field_by_field(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR + '/', '--image', IMAGE,
                       '--machine-type', 'n1-highmem-2', *OFFLINE,
                       '--', '--num-epochs', '3', '--learning-rate', '0.01')
    assert result.returncode == 0, result.stderr
    config = result.submitted_config()
    assert list(config) == ['workerPoolSpecs', 'baseOutputDirectory', 'scheduling']
    assert config['scheduling'] == {'timeout': '7200s'}  # ml-100k: 2 hours
    (chief,) = config['workerPoolSpecs']
    assert chief['replicaCount'] == 1
    assert chief['machineSpec'] == {'machineType': 'n1-highmem-2'}
    assert chief['containerSpec']['imageUri'] == IMAGE
    assert chief['containerSpec']['args'] == [
        '--work-dir', WORK_DIR, '--num-epochs', '3', '--learning-rate', '0.01']
    assert config['baseOutputDirectory'] == {'outputUriPrefix': WORK_DIR + '/model'}
    (create,) = result.gcloud('ai', 'custom-jobs', 'create')
    assert flag(create['argv'], '--project') == FAKE_PROJECT
    assert flag(create['argv'], '--region') == 'us-central1'
    assert flag(create['argv'], '--format') == 'value(name)'
    assert not result.gcloud('builds', 'submit')  # --image given: nothing to build


def test_job_name_and_dataflow_job_name(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--project', 'my-project', '--dry-run')
    assert result.returncode == 0, result.stderr
    (create_line,) = [line for line in result.stdout.splitlines()
                      if line.startswith('+ gcloud ai custom-jobs create')]
    job_name = flag(shlex.split(create_line), '--display-name')
    assert JOB_NAME.match(job_name)
    (preprocess_line,) = [line for line in result.stdout.splitlines()
                          if line.startswith('+ python preprocess.py')]
    registry = 'us-central1-docker.pkg.dev/my-project/movielens'
    assert shlex.split(preprocess_line)[1:] == [
        'python', 'preprocess.py', '--work-dir', WORK_DIR,
        '--runner', 'DataflowRunner', '--project', 'my-project', '--region', 'us-central1',
        '--temp_location', WORK_DIR + '/tmp', '--staging_location', WORK_DIR + '/staging',
        '--job_name', job_name.replace('_', '-'),
        '--sdk_container_image', f'{registry}/trainer-dataflow:{job_name}',
        '--sdk_location', 'container',
        '--worker_machine_type', 'n1-highmem-2', '--max_num_workers', '8',
        '--labels', 'app=movielens-mf', '--labels', 'dataset=ml-100k',
        '--labels', f'run={job_name}']


def test_service_account_reaches_dataflow_and_vertex(run_cloud):
    account = 'movielens-runner@my-project.iam.gserviceaccount.com'
    result = run_cloud('--work-dir', WORK_DIR, '--project', 'my-project',
                       '--service-account', account, '--dry-run')
    assert result.returncode == 0, result.stderr
    lines = {line.split()[2]: shlex.split(line) for line in result.stdout.splitlines()
             if line.startswith(('+ python preprocess.py', '+ gcloud ai custom-jobs create'))}
    assert flag(lines['preprocess.py'], '--service_account_email') == account
    assert flag(lines['ai'], '--service-account') == account


def test_overwrite_reaches_every_step(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--overwrite', '--dry-run', '--', '--seed', '3')
    assert result.returncode == 0, result.stderr
    steps = [shlex.split(line) for line in result.stdout.splitlines()
             if line.startswith(('+ python data-extractor.py', '+ python preprocess.py'))]
    assert len(steps) == 2 and all('--overwrite' in step for step in steps)
    config = yaml.safe_load(result.stdout.split(':\n', 1)[1].split('\n+ ', 1)[0])
    assert config['workerPoolSpecs'][0]['containerSpec']['args'] == [
        '--work-dir', WORK_DIR, '--overwrite', '--seed', '3']


def test_workers_add_worker_pool_one(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, '--workers', '2', *OFFLINE)
    assert result.returncode == 0, result.stderr
    chief, workers = result.submitted_config()['workerPoolSpecs']
    assert chief['replicaCount'] == 1
    assert workers['replicaCount'] == 2
    assert {**workers, 'replicaCount': 1} == chief


def test_gpu_sets_the_accelerator_on_every_pool(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, '--workers', '1',
                       '--gpu', 'NVIDIA_TESLA_T4:1', *OFFLINE)
    assert result.returncode == 0, result.stderr
    for pool in result.submitted_config()['workerPoolSpecs']:
        assert pool['machineSpec'] == {'machineType': 'n1-standard-4',
                                       'acceleratorType': 'NVIDIA_TESLA_T4',
                                       'acceleratorCount': 1}


def test_hp_tuning_submits_a_study_of_validation_rmse(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, '--hp-tuning',
                       '--max-trials', '6', '--parallel-trials', '2', *OFFLINE,
                       '--', '--num-epochs', '5')
    assert result.returncode == 0, result.stderr
    assert not result.gcloud('ai', 'custom-jobs')
    (create,) = result.gcloud('ai', 'hp-tuning-jobs', 'create')
    assert flag(create['argv'], '--max-trial-count') == '6'
    assert flag(create['argv'], '--parallel-trial-count') == '2'
    assert result.gcloud('ai', 'hp-tuning-jobs', 'describe')
    config = result.submitted_config('hp-tuning-jobs')
    study = config['studySpec']
    assert study['metrics'] == [{'metricId': 'validation_rmse', 'goal': 'MINIMIZE'}]
    parameters = {p['parameterId']: p for p in study['parameters']}
    assert parameters == {
        'learning-rate': {'parameterId': 'learning-rate', 'scaleType': 'UNIT_LOG_SCALE',
                          'doubleValueSpec': {'minValue': 0.0003, 'maxValue': 0.1}},
        'num-factors': {'parameterId': 'num-factors', 'scaleType': 'UNIT_LOG_SCALE',
                        'integerValueSpec': {'minValue': 4, 'maxValue': 128}},
        'l2': {'parameterId': 'l2', 'scaleType': 'UNIT_LOG_SCALE',
               'doubleValueSpec': {'minValue': 0.001, 'maxValue': 1.0}}}
    trial = config['trialJobSpec']
    assert trial['baseOutputDirectory'] == {
        'outputUriPrefix': f'{WORK_DIR}/hptuning/{flag(create["argv"], "--display-name")}'}
    assert trial['workerPoolSpecs'][0]['containerSpec']['args'] == [
        '--work-dir', WORK_DIR, '--metric-only', '--tuning-metric=validation_rmse',
        '--num-epochs', '5']


def test_hp_tuning_the_ranking_space_submits_a_study_of_validation_ndcg(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, '--hp-tuning',
                       '--tuning-space', 'hptuning-ranking.yaml', *OFFLINE,
                       '--', '--topn-iterations', '8')
    assert result.returncode == 0, result.stderr
    config = result.submitted_config('hp-tuning-jobs')
    assert config['studySpec']['metrics'] == [{'metricId': 'validation_ndcg',
                                               'goal': 'MAXIMIZE'}]
    assert {p['parameterId'] for p in config['studySpec']['parameters']} == {
        'topn-factors', 'topn-l2', 'topn-unobserved-weight'}
    # Each trial reports the top-N model's metric, the one the study ranks by.
    assert config['trialJobSpec']['workerPoolSpecs'][0]['containerSpec']['args'] == [
        '--work-dir', WORK_DIR, '--metric-only', '--tuning-metric=validation_ndcg',
        '--topn-iterations', '8']
    from google.cloud import aiplatform_v1  # pylint: disable=import-outside-toplevel
    job = parse_strictly(aiplatform_v1.HyperparameterTuningJob, config)
    assert [metric.metric_id for metric in job.study_spec.metrics] == ['validation_ndcg']


@pytest.mark.parametrize('flags, named', [
    (['--tuning-space', 'hptuning-ranking.yaml'], '--tuning-space'),
    (['--hp-tuning', '--tuning-space', 'no-such-study.yaml'], 'no-such-study.yaml'),
    (['--hp-tuning', '--tuning-space', 'hptuning-ranking.yaml', '--', '--topn-model',
      'rating'], '--topn-model rating'),
    (['--hp-tuning', '--', '--tuning-metric', 'validation_ndcg'], '--tuning-metric'),
])
def test_a_tuning_space_that_cannot_run_is_one_line(run_cloud, flags, named):
    split = flags.index('--') if '--' in flags else len(flags)
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, *flags[:split], *OFFLINE,
                       *flags[split:])
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert named in result.stderr
    assert not result.gcloud('ai', 'hp-tuning-jobs', 'create')


@pytest.mark.parametrize('space', ['hptuning.yaml', 'hptuning-ranking.yaml'])
def test_tuned_parameters_are_trainer_flags_and_their_bounds_pass(space: str):
    """Vertex passes --<parameterId>=<value>; the trainer must accept both ends."""
    from trainer import config as trainer_config  # imports TensorFlow: a few seconds
    template = render.read_yaml(render.REPO / space)
    for parameter in template['studySpec']['parameters']:
        spec = parameter.get('doubleValueSpec') or parameter['integerValueSpec']
        for value in (spec['minValue'], spec['maxValue']):
            arg = f'--{parameter["parameterId"]}={value}'
            # exits on a refused value
            trainer_config.parse_args(['--work-dir', 'w', *render.trial_flags(template), arg],
                                      environ={})


@pytest.mark.parametrize('model_dir, job_dir', [
    ('gs://b/w/model/model/', 'gs://b/w/model'),            # a custom job
    ('gs://b/w/hptuning/j/3/model/', 'gs://b/w/hptuning/j/3'),  # trial 3 of a tuning job
    ('gs://b/w/model/model', 'gs://b/w/model'),             # no trailing slash
])
def test_container_command_takes_the_job_dir_from_aip_model_dir(
        tmp_path: pathlib.Path, model_dir: str, job_dir: str):
    """Runs config.yaml's command with a stand-in `python` that prints its argv."""
    spec = render.render_custom_job(
        render.read_yaml(render.CUSTOM_JOB_TEMPLATE), image_uri=IMAGE,
        machine_type='n1-standard-4', work_dir=WORK_DIR, base_output_dir='unused',
        workers=0, accelerator=None, trainer_flags=['--num-epochs', '2'])
    container = spec['workerPoolSpecs'][0]['containerSpec']
    echo = tmp_path / 'python'
    echo.write_text(f'#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n')
    echo.chmod(0o755)
    env = {'PATH': f'{tmp_path}{os.pathsep}{os.environ["PATH"]}', 'AIP_MODEL_DIR': model_dir}
    # Vertex appends the trial's hyperparameters to the args.
    done = subprocess.run(container['command'] + container['args'] + ['--l2=0.5'],
                          env=env, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == [
        '-m', 'trainer.task', '--job-dir', job_dir,
        '--work-dir', WORK_DIR, '--num-epochs', '2', '--l2=0.5']


def test_container_command_fails_without_aip_model_dir():
    spec = render.read_yaml(render.CUSTOM_JOB_TEMPLATE)
    command = spec['workerPoolSpecs'][0]['containerSpec']['command']
    done = subprocess.run(command, env={'PATH': os.environ['PATH']},
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert 'AIP_MODEL_DIR' in done.stderr


def test_dry_run_prints_every_command_and_the_yaml_and_runs_no_gcloud(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--dataset', 'synthetic', '--dry-run',
                       '--', '--num-epochs', '4')
    assert result.returncode == 0, result.stderr
    assert result.calls == []
    commands = [shlex.split(line)[1:] for line in result.stdout.splitlines()
                if line.startswith('+ ')]
    expected_starts = [
        ['python', 'scripts/render_job_config.py'],
        ['gcloud', 'auth', 'application-default', 'print-access-token'],
        ['python', 'scripts/preflight.py', '--credentials'],
        ['python', 'scripts/preflight.py', '--project', 'PROJECT_ID'],
        ['python', 'data-extractor.py', '--work-dir', WORK_DIR, '--dataset', 'synthetic'],
        ['gcloud', 'builds', 'submit'],
        ['python', 'preprocess.py', '--work-dir', WORK_DIR, '--runner', 'DataflowRunner'],
        ['gcloud', 'ai', 'custom-jobs', 'create'],
        ['gcloud', 'ai', 'custom-jobs', 'stream-logs'],
        ['gcloud', 'ai', 'custom-jobs', 'describe'],
        ['python', 'plot.py', '--model-dir', WORK_DIR + '/model'],
    ]
    assert [command[:len(start)] for command, start in zip(commands, expected_starts)
            ] == expected_starts
    assert len(commands) == len(expected_starts)
    assert commands[-1][-2:] == ['--out', 'workdir-cloud/fig/synthetic-cloud-loss.png']
    yaml_text = result.stdout.split(':\n', 1)[1].split('\n+ ', 1)[0]
    config = yaml.safe_load(yaml_text)
    assert config['workerPoolSpecs'][0]['containerSpec']['args'][-2:] == ['--num-epochs', '4']


def test_dry_run_hp_tuning_prints_the_study(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--hp-tuning', '--dry-run')
    assert result.returncode == 0, result.stderr
    assert result.calls == []
    assert 'metricId: validation_rmse' in result.stdout
    assert '+ gcloud ai hp-tuning-jobs create' in result.stdout
    assert '+ python plot.py' not in result.stdout  # trials have a loss log each


def substitutions(build_argv: list[str]) -> dict[str, str]:
    """The --substitutions of a recorded `gcloud builds submit`."""
    return dict(item.split('=', 1) for item in flag(build_argv, '--substitutions').split(','))


def test_images_are_built_with_cloudbuild_yaml_and_used_when_no_image_is_given(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--region', 'europe-west4', *OFFLINE)
    assert result.returncode == 0, result.stderr
    (build,) = result.gcloud('builds', 'submit')
    (create,) = result.gcloud('ai', 'custom-jobs', 'create')
    job_name = flag(create['argv'], '--display-name')
    registry = 'europe-west4-docker.pkg.dev/fake-project-123/movielens'
    assert flag(build['argv'], '--config') == 'cloudbuild.yaml'
    assert '--tag' not in build['argv']  # the legacy builder would build every stage
    assert substitutions(build['argv']) == {
        '_TRAINER_IMAGE': f'{registry}/trainer:{job_name}',
        '_DATAFLOW_IMAGE': f'{registry}/trainer-dataflow:{job_name}',
        '_SERVING_IMAGE': f'{registry}/serving:{job_name}'}
    assert build['argv'][-1] == '.'
    assert result.calls.index(build) < result.calls.index(create)
    pool = result.submitted_config()['workerPoolSpecs'][0]
    assert pool['containerSpec']['imageUri'] == f'{registry}/trainer:{job_name}'


def preprocess_command(stdout: str) -> list[str]:
    """The Beam flags of the echoed `python preprocess.py` line."""
    (line,) = [line for line in stdout.splitlines() if line.startswith('+ python preprocess.py')]
    return shlex.split(line)[1:]


def test_dataflow_starts_from_the_image_built_before_it(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--project', 'my-project', '--dry-run')
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith('+ ')]
    (build_index,) = [i for i, line in enumerate(lines) if line.startswith('+ gcloud builds')]
    (preprocess_index,) = [i for i, line in enumerate(lines) if 'preprocess.py' in line]
    assert build_index < preprocess_index
    built = substitutions(shlex.split(lines[build_index])[1:])
    beam = preprocess_command(result.stdout)
    assert flag(beam, '--sdk_container_image') == built['_DATAFLOW_IMAGE']
    assert flag(beam, '--sdk_location') == 'container'
    assert '--setup_file' not in beam


def test_dataflow_setup_file_is_the_fallback(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, '--dataflow-setup-file',
                       '--dry-run')
    assert result.returncode == 0, result.stderr
    beam = preprocess_command(result.stdout)
    assert flag(beam, '--setup_file') == './setup.py'
    assert '--sdk_container_image' not in beam and '--sdk_location' not in beam
    assert '+ gcloud builds submit' not in result.stdout


def test_dataflow_options_reach_beam_as_beam_reads_them(run_cloud, caplog):
    from apache_beam.options import pipeline_options as po  # pylint: disable=import-outside-toplevel
    subnet = 'regions/us-central1/subnetworks/private'
    account = 'movielens-runner@my-project.iam.gserviceaccount.com'
    result = run_cloud(
        '--work-dir', WORK_DIR, '--project', 'my-project', '--image', IMAGE,
        '--dataflow-image', IMAGE + '-df', '--dataflow-machine-type', 'n2-highmem-4',
        '--dataflow-max-workers', '20', '--dataflow-network', 'vpc-one',
        '--dataflow-subnetwork', subnet, '--dataflow-no-public-ips',
        '--service-account', account, '--dataflow-flag=--disk_size_gb=50',
        '--dataflow-flag', '--experiments=use_runner_v2', '--dry-run')
    assert result.returncode == 0, result.stderr
    beam = preprocess_command(result.stdout)[beam_start(result.stdout):]
    options = po.PipelineOptions(beam)
    # Beam drops flags it does not know, with a warning: all of these must be known.
    with caplog.at_level(logging.WARNING):
        options.get_all_options()
    assert 'Discarding' not in caplog.text
    worker = options.view_as(po.WorkerOptions)
    cloud = options.view_as(po.GoogleCloudOptions)
    assert (worker.machine_type, worker.max_num_workers, worker.network, worker.subnetwork,
            worker.use_public_ips, worker.disk_size_gb, worker.sdk_container_image) == (
        'n2-highmem-4', 20, 'vpc-one', subnet, False, 50, IMAGE + '-df')
    assert cloud.service_account_email == account
    assert options.view_as(po.DebugOptions).experiments == ['use_runner_v2']
    assert options.view_as(po.StandardOptions).runner == 'DataflowRunner'
    labels = dict(label.split('=', 1) for label in cloud.labels)
    assert labels['app'] == 'movielens-mf' and labels['dataset'] == 'ml-100k'
    assert JOB_NAME.match(labels['run'])


def beam_start(stdout: str) -> int:
    """Where the Beam flags start in the preprocess command (after our own flags)."""
    return preprocess_command(stdout).index('--runner')


@pytest.mark.parametrize('flags, named', [
    (['--dataflow-flag=--max_num_workers=3'], '--dataflow-max-workers'),
    (['--dataflow-flag', '--runner=DirectRunner'], '--runner'),
    (['--dataflow-flag', '--disk_size_gb=5;touch {canary}'], '--dataflow-flag'),
    (['--dataflow-flag', 'disk_size_gb=50'], '--dataflow-flag'),
    (['--dataflow-max-workers', '0'], '--dataflow-max-workers'),
    (['--dataflow-machine-type', 'big'], '--dataflow-machine-type'),
    (['--dataflow-subnetwork', 'private'], '--dataflow-subnetwork'),
    (['--dataflow-network', 'Net$(touch {canary})'], '--dataflow-network'),
    (['--image', IMAGE], '--dataflow-image'),
    (['--dataflow-image', IMAGE, '--dataflow-setup-file'], '--dataflow-setup-file'),
    (['--image', IMAGE, '--deploy', '--skip-preprocess'], '--serving-image'),
])
def test_bad_dataflow_flags_are_one_line_and_no_gcloud_call(
        run_cloud, tmp_path: pathlib.Path, flags: list[str], named: str):
    canary = tmp_path / 'canary'
    result = run_cloud('--work-dir', WORK_DIR, *[f.format(canary=canary) for f in flags])
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert named in result.stderr
    assert result.calls == []
    assert not canary.exists()


@pytest.mark.parametrize('state', ['JOB_STATE_FAILED', 'JOB_STATE_CANCELLED'])
def test_a_job_that_does_not_succeed_fails_the_run(run_cloud, state: str):
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, *OFFLINE,
                       FAKE_GCLOUD_STATES=f'JOB_STATE_PENDING,JOB_STATE_RUNNING,{state}')
    assert result.returncode == 1
    assert f'ended in {state}' in result.stderr
    assert len(result.gcloud('ai', 'custom-jobs', 'describe')) == 3
    assert result.gcloud('ai', 'custom-jobs', 'stream-logs')


def test_a_job_that_succeeds_after_polling_passes(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, *OFFLINE,
                       FAKE_GCLOUD_STATES='JOB_STATE_QUEUED,JOB_STATE_RUNNING,JOB_STATE_SUCCEEDED')
    assert result.returncode == 0, result.stderr
    assert len(result.gcloud('ai', 'custom-jobs', 'describe')) == 3
    (describe, *_) = result.gcloud('ai', 'custom-jobs', 'describe')
    assert describe['argv'][3] == '7777777777'  # the id from the fake's resource name
    assert 'succeeded' in result.stdout


def test_missing_credentials_are_one_line_naming_the_login_and_no_step_runs(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, *OFFLINE, FAKE_GCLOUD_ADC='missing')
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert 'gcloud auth application-default login' in result.stderr
    assert [call['argv'][:2] for call in result.calls] == [
        ['config', 'get-value'], ['auth', 'application-default']]


def test_credentials_are_checked_before_the_first_step(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, *OFFLINE)
    assert result.returncode == 0, result.stderr
    (check,) = result.gcloud('auth', 'application-default', 'print-access-token')
    (build,) = result.gcloud('builds', 'submit')
    assert result.calls.index(check) < result.calls.index(build)
    assert 'ya29' not in result.stdout  # the token itself is never shown


def test_no_project_anywhere_is_one_line_naming_project(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, *OFFLINE, FAKE_GCLOUD_PROJECT='')
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert '--project' in result.stderr
    assert [call['argv'] for call in result.calls] == [['config', 'get-value', 'project']]


@pytest.mark.parametrize('flags, named', [
    ([], '--work-dir'),
    (['--work-dir', 'test-bucket/movielens'], '--work-dir'),
    (['--work-dir', '/data/movielens'], '--work-dir'),
    (['--work-dir', 'gs://test-bucket/$(touch {canary})'], '--work-dir'),
    (['--work-dir', WORK_DIR, '--workers', '-1'], '--workers'),
    (['--work-dir', WORK_DIR, '--workers', 'two'], '--workers'),
    (['--work-dir', WORK_DIR, '--workers', '1.5'], '--workers'),
    (['--work-dir', WORK_DIR, '--gpu', 'NVIDIA_TESLA_T4'], '--gpu'),
    (['--work-dir', WORK_DIR, '--gpu', 'NVIDIA_TESLA_T4:0'], '--gpu'),
    (['--work-dir', WORK_DIR, '--gpu', 'NVIDIA_TESLA_T4:one'], '--gpu'),
    (['--work-dir', WORK_DIR, '--frobnicate'], 'unknown flag'),
    (['--work-dir', WORK_DIR, '--region'], '--region'),
    (['--work-dir', WORK_DIR, '--region', 'us-central1; touch {canary}'], '--region'),
    (['--work-dir', WORK_DIR, '--project', '$(touch {canary})'], '--project'),
    (['--work-dir', WORK_DIR, '--project', 'my project'], '--project'),
    (['--work-dir', WORK_DIR, '--machine-type', 'n1 standard 4'], '--machine-type'),
    (['--work-dir', WORK_DIR, '--machine-type', 'n1-standard-4`touch {canary}`'],
     '--machine-type'),
    (['--work-dir', WORK_DIR, '--image', 'busybox;touch {canary}'], '--image'),
    (['--work-dir', WORK_DIR, '--dataset', 'ml-5m'], '--dataset'),
    (['--work-dir', WORK_DIR, '--service-account', 'me; touch {canary}'], '--service-account'),
    (['--work-dir', WORK_DIR, '--max-trials', '3'], '--max-trials'),
    (['--work-dir', WORK_DIR, '--hp-tuning', '--parallel-trials', '5', '--max-trials', '2'],
     '--parallel-trials'),
])
def test_a_bad_flag_is_one_line_and_no_gcloud_call(
        run_cloud, tmp_path: pathlib.Path, flags: list[str], named: str):
    canary = tmp_path / 'canary'
    result = run_cloud(*[f.format(canary=canary) for f in flags], *OFFLINE)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert named in result.stderr
    assert result.stdout == ''
    assert result.calls == []
    assert not canary.exists()


@pytest.mark.parametrize('flags, trainer_flag', [
    (['--hp-tuning'], '--l2'),
    (['--hp-tuning'], '--learning-rate=0.1'),
    (['--hp-tuning'], '--metric-only'),
    ([], '--job-dir'),
    ([], '--overwrite'),
])
def test_a_trainer_flag_run_cloud_sets_is_refused_before_any_step(
        run_cloud, flags: list[str], trainer_flag: str):
    result = run_cloud('--work-dir', WORK_DIR, '--project', 'my-project', *flags,
                       *OFFLINE, '--', trainer_flag, '0.5')
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert trainer_flag.split('=')[0] in result.stderr
    assert result.calls == []


def test_implicit_feedback_on_several_workers_is_refused_before_any_step(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--project', 'my-project', '--workers', '2',
                       *OFFLINE, '--', '--implicit-feedback')
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert 'drop --workers or the flag' in result.stderr
    assert result.calls == []


def test_trainer_flags_with_shell_characters_reach_the_job_verbatim(
        run_cloud, tmp_path: pathlib.Path):
    canary = tmp_path / 'canary'
    odd = [f'adam; touch {canary}', f'$(touch {canary})', "it's \"quoted\"", 'a b']
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, *OFFLINE,
                       '--', '--optimizer', *odd)
    assert result.returncode == 0, result.stderr
    args = result.submitted_config()['workerPoolSpecs'][0]['containerSpec']['args']
    assert args[-len(odd):] == odd
    assert not canary.exists()


def test_placeholders_must_match_the_values():
    with pytest.raises(ValueError, match='IMAGE_URI'):
        render.fill_placeholders({'imageUri': '${IMAGE_URI}'}, {})
    with pytest.raises(ValueError, match='WORK_DIR'):
        render.fill_placeholders({'imageUri': '${IMAGE_URI}'},
                                 {'IMAGE_URI': 'x', 'WORK_DIR': 'y'})
    shell = 'exec "${AIP_MODEL_DIR%/}"'  # not a whole-value placeholder: left alone
    assert render.fill_placeholders([shell, '${A}'], {'A': {'b': 1}}) == [shell, {'b': 1}]


def test_the_plot_step_charts_the_loss_log_from_gcs(run_cloud, gcs, tmp_path: pathlib.Path):
    """Step 6 for real: plot.py reads WORK_DIR/model/loss_log.csv from the GCS emulator."""
    from google.cloud import storage  # pylint: disable=import-outside-toplevel
    from trainer import features  # pylint: disable=import-outside-toplevel
    header = ','.join(features.LOSS_LOG_COLUMNS)
    rows = ['1,1.0,1.0,0.8,1.0,1.0,0.8,1.1,1.05,0.85,2.0',
            '2,0.8,0.89,0.7,0.85,0.92,0.72,0.9,0.95,0.75,2.0']
    storage.Client().bucket(gcs.bucket).blob('cloud-run/model/loss_log.csv').upload_from_string(
        '\n'.join([header, *rows]) + '\n')
    fig_dir = tmp_path / 'fig'
    result = run_cloud('--work-dir', gcs.url('cloud-run'), '--image', IMAGE, '--skip-extract',
                       '--skip-preprocess', '--poll-seconds', '0', '--fig-dir', str(fig_dir),
                       **gcs.client_env())
    assert result.returncode == 0, result.stderr + gcs.log_tail()
    chart = fig_dir / 'ml-100k-cloud-loss.png'
    assert chart.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert 'plot: read 2 epochs' in result.stdout


# --- --deploy: Model Registry upload and endpoint deployment. ----------------------------
def test_deploy_uploads_the_export_and_creates_an_endpoint(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--deploy', *OFFLINE)
    assert result.returncode == 0, result.stderr
    (create_job,) = result.gcloud('ai', 'custom-jobs', 'create')
    job_name = flag(create_job['argv'], '--display-name')
    (upload,) = result.gcloud('ai', 'models', 'upload')
    assert flag(upload['argv'], '--artifact-uri') == WORK_DIR + '/model/model'
    assert flag(upload['argv'], '--display-name') == job_name
    (build,) = result.gcloud('builds', 'submit')
    assert flag(upload['argv'], '--container-image-uri') == substitutions(
        build['argv'])['_SERVING_IMAGE']
    from trainer.serving import server  # pylint: disable=import-outside-toplevel
    assert (flag(upload['argv'], '--container-ports'),
            flag(upload['argv'], '--container-health-route'),
            flag(upload['argv'], '--container-predict-route')) == (
        str(server.DEFAULT_PORT), server.DEFAULT_HEALTH_ROUTE, server.DEFAULT_PREDICT_ROUTE)
    (create_endpoint,) = result.gcloud('ai', 'endpoints', 'create')
    assert flag(create_endpoint['argv'], '--display-name') == 'movielens-mf'
    (deploy,) = result.gcloud('ai', 'endpoints', 'deploy-model')
    assert deploy['argv'][3] == '6666666666'  # the id of the endpoint just created
    assert flag(deploy['argv'], '--model') == '5555555555'
    assert flag(deploy['argv'], '--traffic-split') == '0=100'
    assert result.calls.index(create_job) < result.calls.index(upload)
    assert 'endpoint: 6666666666' in result.stdout


def test_deploy_reuses_an_endpoint_with_the_same_name(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, '--deploy', '--endpoint', 'recs',
                       '--serving-image', IMAGE + '-serving',
                       '--serving-machine-type', 'n1-standard-4', *OFFLINE,
                       FAKE_GCLOUD_ENDPOINT='projects/1/locations/us-central1/endpoints/42')
    assert result.returncode == 0, result.stderr
    assert result.gcloud('ai', 'endpoints', 'create') == []
    (listing,) = result.gcloud('ai', 'endpoints', 'list')
    assert flag(listing['argv'], '--filter') == 'display_name=recs'
    (deploy,) = result.gcloud('ai', 'endpoints', 'deploy-model')
    assert deploy['argv'][3] == '42'
    assert flag(deploy['argv'], '--machine-type') == 'n1-standard-4'


def test_deploy_is_skipped_when_the_job_fails(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, '--deploy', *OFFLINE,
                       '--serving-image', IMAGE + '-serving', FAKE_GCLOUD_STATES='JOB_STATE_FAILED')
    assert result.returncode == 1
    assert result.gcloud('ai', 'models') == [] and result.gcloud('ai', 'endpoints') == []


def test_dry_run_deploy_prints_the_deployment_commands(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--deploy', '--dry-run')
    assert result.returncode == 0, result.stderr
    assert result.calls == []
    for command in ('+ gcloud ai models upload', '+ gcloud ai models list',
                    '+ gcloud ai endpoints list', '+ gcloud ai endpoints create',
                    '+ gcloud ai endpoints deploy-model ENDPOINT_ID'):
        assert command in result.stdout


@pytest.mark.parametrize('flags, named', [
    (('--deploy', '--hp-tuning'), '--deploy'),
    (('--endpoint', 'recs'), '--endpoint'),
    (('--deploy', '--endpoint', 'x; touch CANARY'), '--endpoint'),
    (('--deploy', '--serving-machine-type', 'n1 standard'), '--serving-machine-type'),
])
def test_bad_deploy_flags_are_one_line_and_no_gcloud_call(run_cloud, tmp_path, flags, named):
    result = run_cloud('--work-dir', WORK_DIR, *flags, *OFFLINE)
    assert result.returncode == 2
    assert result.calls == []
    assert named in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'CANARY').exists()


# --- The stand-in refuses what gcloud refuses (tests/fake_gcloud/flags.json). -------------
FLAG_TABLE = json.loads((FAKE_GCLOUD_DIR / 'flags.json').read_text())


def fake_gcloud(tmp_path: pathlib.Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, 'FAKE_GCLOUD_LOG': str(tmp_path / 'calls.jsonl')}
    return subprocess.run([str(FAKE_GCLOUD_DIR / 'gcloud'), *argv], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize('argv, refused', [
    (['builds', 'submit', '--substitution', '_A=b', '.'], '--substitution'),
    (['builds', 'submit', '--config', 'cloudbuild.yaml', '--tags', 'x', '.'], '--tags'),
    (['ai', 'custom-jobs', 'create', '--region', 'r', '--display-name', 'j',
      '--service_account', 'a@b.iam.gserviceaccount.com'], '--service_account'),
    (['ai', 'custom-jobs', 'create', '--region', 'r', '--display-name', 'j',
      '--max-trial-count', '3'], '--max-trial-count'),
    (['ai', 'hp-tuning-jobs', 'create', '--config', 'c', '--display-name', 'j',
      '--max-trials', '3'], '--max-trials'),
    (['ai', 'custom-jobs', 'describe', '1', '--regoin', 'r'], '--regoin'),
    (['ai', 'models', 'upload', '--display-name', 'm', '--container-image-uri', 'i',
      '--artifact-url', 'gs://b/m'], '--artifact-url'),
    (['ai', 'models', 'upload', '--display-name', 'm', '--container-image-uri', 'i',
      '--container-health-path', '/h'], '--container-health-path'),
    (['ai', 'endpoints', 'deploy-model', '1', '--model', 'm', '--display-name', 'd',
      '--traffic', '0=100'], '--traffic'),
    (['ai', 'endpoints', 'create', '--display-name', 'e', '--filter', 'x'], '--filter'),
    (['auth', 'application-default', 'print-access-token', '--scope', 's'], '--scope'),
])
def test_the_stand_in_refuses_a_flag_gcloud_does_not_accept(
        tmp_path: pathlib.Path, argv: list[str], refused: str):
    done = fake_gcloud(tmp_path, *argv)
    assert done.returncode == 2
    assert 'unrecognized arguments' in done.stderr and refused in done.stderr


@pytest.mark.parametrize('argv, named', [
    (['ai', 'custom-jobs', 'create', '--region', 'r', '--config', 'c'], '--display-name'),
    (['ai', 'endpoints', 'deploy-model', '1', '--display-name', 'd'], '--model'),
    (['ai', 'models', 'upload', '--display-name', 'm'], '--container-image-uri'),
    (['ai', 'custom-jobs', 'describe', '1', '2'], 'positional'),
    (['ai', 'models', 'list', '--filter'], '--filter'),
])
def test_the_stand_in_refuses_missing_and_extra_arguments(
        tmp_path: pathlib.Path, argv: list[str], named: str):
    done = fake_gcloud(tmp_path, *argv)
    assert done.returncode == 2 and named in done.stderr


def test_every_gcloud_command_run_cloud_issues_is_in_the_flag_table(run_cloud):
    commands = set()
    for flags in (['--deploy'], ['--hp-tuning']):
        result = run_cloud('--work-dir', WORK_DIR, '--project', 'my-project', *flags,
                           '--dry-run')
        assert result.returncode == 0, result.stderr
        for line in result.stdout.splitlines():
            if line.startswith('+ gcloud '):
                words = [w for w in shlex.split(line)[2:] if not w.startswith('-')]
                commands.add(next(' '.join(words[:n]) for n in (3, 2)
                                  if ' '.join(words[:n]) in FLAG_TABLE['commands']))
    assert {'builds submit', 'ai custom-jobs create', 'ai hp-tuning-jobs create',
            'ai models upload', 'ai endpoints deploy-model',
            'auth application-default print-access-token'} <= commands


def test_a_run_with_every_option_passes_the_flag_checks(run_cloud):
    """All of run-cloud.sh's gcloud calls at once, through the checking stand-in."""
    result = run_cloud('--work-dir', WORK_DIR, '--deploy', '--skip-extract', '--skip-preprocess',
                       '--skip-plot', '--poll-seconds', '0', '--service-account',
                       'movielens-runner@my-project.iam.gserviceaccount.com')
    assert result.returncode == 0, result.stderr
    assert len(result.calls) >= 9


# --- Vertex AI TensorBoard, and the configs parsed strictly as Vertex AI's protos. -------
def parse_strictly(message_class, document: dict):
    """The YAML as the aiplatform_v1 message gcloud sends; unknown keys raise."""
    from google.protobuf import json_format  # pylint: disable=import-outside-toplevel
    return json_format.ParseDict(document, message_class.pb(message_class()),
                                 ignore_unknown_fields=False)


def test_tensorboard_attaches_the_instance_to_the_job(run_cloud):
    account = 'movielens-runner@my-project.iam.gserviceaccount.com'
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, '--tensorboard', '42',
                       '--service-account', account, *OFFLINE)
    assert result.returncode == 0, result.stderr
    config = result.submitted_config()
    assert config['tensorboard'] == (
        f'projects/{FAKE_PROJECT}/locations/us-central1/tensorboards/42')
    (create,) = result.gcloud('ai', 'custom-jobs', 'create')
    assert flag(create['argv'], '--service-account') == account


def test_tensorboard_reaches_every_trial(run_cloud):
    name = 'projects/other-project/locations/europe-west4/tensorboards/7'
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, '--hp-tuning',
                       '--tensorboard', name, '--service-account',
                       'a@my-project.iam.gserviceaccount.com', *OFFLINE)
    assert result.returncode == 0, result.stderr
    assert result.submitted_config('hp-tuning-jobs')['trialJobSpec']['tensorboard'] == name


@pytest.mark.parametrize('flags, named', [
    (['--tensorboard', '42'], '--service-account'),
    (['--tensorboard', 'tb-1', '--service-account', 'a@p-123456.iam.gserviceaccount.com'],
     '--tensorboard'),
])
def test_bad_tensorboard_flags_are_one_line(run_cloud, flags: list[str], named: str):
    result = run_cloud('--work-dir', WORK_DIR, *flags, *OFFLINE)
    assert result.returncode == 2 and result.calls == []
    assert len(result.stderr.splitlines()) == 1 and named in result.stderr


@pytest.mark.parametrize('flags', [
    [],
    ['--workers', '2', '--gpu', 'NVIDIA_TESLA_T4:1', '--machine-type', 'n1-highmem-8'],
    ['--tensorboard', '42', '--service-account', 'a@my-project.iam.gserviceaccount.com'],
])
def test_the_custom_job_config_is_a_custom_job_spec(run_cloud, flags: list[str]):
    from google.cloud import aiplatform_v1  # pylint: disable=import-outside-toplevel
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, *flags, *OFFLINE,
                       '--', '--num-epochs', '3')
    assert result.returncode == 0, result.stderr
    spec = parse_strictly(aiplatform_v1.CustomJobSpec, result.submitted_config())
    assert spec.worker_pool_specs[0].container_spec.image_uri == IMAGE
    assert spec.base_output_directory.output_uri_prefix == WORK_DIR + '/model'


def test_the_tuning_config_is_a_hyperparameter_tuning_job(run_cloud):
    from google.cloud import aiplatform_v1  # pylint: disable=import-outside-toplevel
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, '--hp-tuning', *OFFLINE)
    assert result.returncode == 0, result.stderr
    job = parse_strictly(aiplatform_v1.HyperparameterTuningJob,
                         result.submitted_config('hp-tuning-jobs'))
    assert [metric.metric_id for metric in job.study_spec.metrics] == ['validation_rmse']
    assert job.max_failed_trial_count == 3
    assert '--metric-only' in job.trial_job_spec.worker_pool_specs[0].container_spec.args


def test_a_misspelt_key_fails_the_strict_parse():
    from google.cloud import aiplatform_v1  # pylint: disable=import-outside-toplevel
    from google.protobuf import json_format  # pylint: disable=import-outside-toplevel
    with pytest.raises(json_format.ParseError, match='tensorBoard'):
        parse_strictly(aiplatform_v1.CustomJobSpec, {'tensorBoard': 'x'})


# --- --batch-recommend: every user's top-k on Dataflow. -----------------------------------
def test_batch_recommend_runs_the_beam_job_on_dataflow_after_training(run_cloud):
    from trainer.serving import batch as batch_lib  # pylint: disable=import-outside-toplevel
    result = run_cloud('--work-dir', WORK_DIR, '--project', 'my-project', '--batch-recommend',
                       '--top-k', '20', '--bigquery-table', 'my-project:movielens.recs',
                       '--overwrite', '--dry-run')
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line)[1:] for line in result.stdout.splitlines()
                if line.startswith('+ ')]
    (batch,) = [c for c in commands if c[:3] == ['python', '-m', 'trainer.serving.batch']]
    (create,) = [c for c in commands if c[:4] == ['gcloud', 'ai', 'custom-jobs', 'create']]
    assert commands.index(batch) > commands.index(create)
    config, beam_args = batch_lib.parse_args(batch[3:])
    assert config == batch_lib.BatchConfig(
        work_dir=WORK_DIR, export_dir=WORK_DIR + '/model/model', k=20,
        bigquery_table='my-project:movielens.recs', overwrite=True)
    preprocess = preprocess_command(result.stdout)
    assert flag(beam_args, '--job_name') == flag(preprocess, '--job_name') + '-recommend'
    assert flag(beam_args, '--sdk_container_image') == flag(preprocess, '--sdk_container_image')
    assert flag(beam_args, '--runner') == 'DataflowRunner'


@pytest.mark.parametrize('flags, named', [
    (['--top-k', '5'], '--top-k'),
    (['--bigquery-table', 'my-project:d.t'], '--bigquery-table'),
    (['--batch-recommend', '--hp-tuning'], '--batch-recommend'),
    (['--batch-recommend', '--top-k', '0'], '--top-k'),
    (['--batch-recommend', '--bigquery-table', 'd.t'], '--bigquery-table'),
    (['--batch-recommend', '--image', IMAGE, '--skip-preprocess'], '--dataflow-image'),
])
def test_bad_batch_flags_are_one_line(run_cloud, flags: list[str], named: str):
    result = run_cloud('--work-dir', WORK_DIR, *flags, *OFFLINE)
    assert result.returncode == 2 and result.calls == []
    assert len(result.stderr.splitlines()) == 1 and named in result.stderr


# --- --pipeline: the same steps as one Vertex AI pipeline (scripts/pipeline.py). --------
def test_pipeline_replaces_the_steps_with_one_compiled_and_submitted_pipeline(run_cloud):
    pipeline = load_script('scripts/pipeline.py')
    result = run_cloud('--work-dir', WORK_DIR, '--project', 'my-project', '--pipeline',
                       '--batch-recommend', '--dry-run', '--', '--num-epochs', '3')
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line)[1:] for line in result.stdout.splitlines()
                if line.startswith('+ ')]
    assert [c[:3] for c in commands] == [
        ['python', 'scripts/render_job_config.py', '--out'],
        ['gcloud', 'auth', 'application-default'],
        ['python', 'scripts/preflight.py', '--credentials'],
        ['python', 'scripts/preflight.py', '--project'],
        ['gcloud', 'builds', 'submit'],
        ['python', 'scripts/pipeline.py', '--out']]
    assert '--pipeline' in commands[3]  # the pipeline's account launches Dataflow itself
    built = substitutions(commands[4])
    argv = commands[5][2:]
    split = argv.index('--')
    args = pipeline.build_parser().parse_args(argv[:split])
    assert (args.image, args.serving_image, args.submit, args.batch_recommend) == (
        built['_TRAINER_IMAGE'], built['_SERVING_IMAGE'], True, True)
    beam = argv[split + 1:]
    assert flag(beam, '--sdk_container_image') == built['_DATAFLOW_IMAGE']
    assert '--job_name' not in beam  # each pipeline step names its own Dataflow job


def test_pipeline_passes_the_bigquery_table_and_the_labels_on(run_cloud):
    pipeline = load_script('scripts/pipeline.py')
    result = run_cloud('--work-dir', WORK_DIR, '--project', 'my-project', '--pipeline',
                       '--batch-recommend', '--bigquery-table', 'my-project:movielens.recs',
                       '--dry-run')
    assert result.returncode == 0, result.stderr
    (argv,) = [shlex.split(line)[3:] for line in result.stdout.splitlines()
               if line.startswith('+ python scripts/pipeline.py')]
    split = argv.index('--')
    args = pipeline.build_parser().parse_args(argv[:split])
    assert args.bigquery_table == 'my-project:movielens.recs'
    assert dict(args.label) == {'app': 'movielens-mf', 'dataset': 'ml-100k'}
    (run_label,) = args.run_label
    assert run_label[0] == 'run' and JOB_NAME.match(run_label[1])
    # The steps' Dataflow jobs carry no run label: it would change their cache keys.
    beam = argv[split + 1:]
    assert [beam[i + 1] for i, word in enumerate(beam) if word == '--labels'] == [
        'app=movielens-mf', 'dataset=ml-100k']


@pytest.mark.parametrize('flags, named', [
    (['--pipeline', '--hp-tuning'], '--hp-tuning'),
    (['--pipeline', '--skip-extract'], '--skip-extract'),
    (['--pipeline', '--deploy'], '--deploy'),
    (['--pipeline', '--image', IMAGE, '--dataflow-image', IMAGE], '--serving-image'),
])
def test_bad_pipeline_flags_are_one_line(run_cloud, flags: list[str], named: str):
    result = run_cloud('--work-dir', WORK_DIR, *flags, '--poll-seconds', '0')
    assert result.returncode == 2 and result.calls == []
    assert len(result.stderr.splitlines()) == 1 and named in result.stderr


# --- Time limits, labels, Spot VMs and the accelerator. ------------------------------------
@pytest.mark.parametrize('flags, timeout', [
    ([], '7200s'),                                        # ml-100k: 2 hours
    (['--dataset', 'ml-25m'], '28800s'),                  # 25M ratings: 8 hours
    (['--dataset', 'ml-25m', '--timeout-hours', '3'], '10800s'),
])
def test_every_job_has_a_time_limit_that_scales_with_the_dataset(
        run_cloud, flags: list[str], timeout: str):
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, *flags, *OFFLINE)
    assert result.returncode == 0, result.stderr
    assert result.submitted_config()['scheduling'] == {'timeout': timeout}


def test_every_tuning_trial_has_the_time_limit(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, '--hp-tuning',
                       '--timeout-hours', '1', *OFFLINE)
    assert result.returncode == 0, result.stderr
    assert result.submitted_config('hp-tuning-jobs')['trialJobSpec']['scheduling'] == {
        'timeout': '3600s'}


def test_spot_runs_the_job_on_spot_vms_and_restarts_it_after_a_preemption(run_cloud):
    from google.cloud import aiplatform_v1  # pylint: disable=import-outside-toplevel
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, '--spot', '--workers', '1',
                       *OFFLINE)
    assert result.returncode == 0, result.stderr
    config = result.submitted_config()
    assert config['scheduling'] == {'timeout': '7200s', 'strategy': 'SPOT',
                                    'restartJobOnWorkerRestart': True}
    spec = parse_strictly(aiplatform_v1.CustomJobSpec, config)
    assert spec.scheduling.strategy == aiplatform_v1.Scheduling.Strategy.SPOT
    assert spec.scheduling.restart_job_on_worker_restart
    assert spec.scheduling.timeout.seconds == 7200


def labels_of(argv: list[str]) -> dict[str, str]:
    return dict(item.split('=', 1) for item in flag(argv, '--labels').split(','))


def test_jobs_models_and_endpoints_carry_the_run_labels(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--dataset', 'ml-1m', '--deploy', *OFFLINE)
    assert result.returncode == 0, result.stderr
    (create,) = result.gcloud('ai', 'custom-jobs', 'create')
    job_name = flag(create['argv'], '--display-name')
    run_labels = {'app': 'movielens-mf', 'dataset': 'ml-1m', 'run': job_name}
    assert labels_of(create['argv']) == run_labels
    (upload,) = result.gcloud('ai', 'models', 'upload')
    assert labels_of(upload['argv']) == run_labels
    (endpoint,) = result.gcloud('ai', 'endpoints', 'create')
    assert labels_of(endpoint['argv']) == {'app': 'movielens-mf'}  # it outlives the run


def test_tuning_jobs_carry_the_run_labels(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, '--hp-tuning', *OFFLINE)
    assert result.returncode == 0, result.stderr
    (create,) = result.gcloud('ai', 'hp-tuning-jobs', 'create')
    assert labels_of(create['argv'])['app'] == 'movielens-mf'


def test_gpu_with_the_cpu_image_is_refused_in_one_line(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--gpu', 'NVIDIA_TESLA_T4:1', *OFFLINE)
    assert result.returncode == 2 and result.calls == []
    assert len(result.stderr.splitlines()) == 1
    assert '--gpu' in result.stderr and 'CPU-only' in result.stderr


@pytest.mark.parametrize('flags, named', [
    (['--timeout-hours', '0'], '--timeout-hours'),
    (['--timeout-hours', '169'], '--timeout-hours'),
    (['--timeout-hours', '2h'], '--timeout-hours'),
    (['--teardown', '--deploy'], '--teardown'),
])
def test_bad_timeout_and_teardown_flags_are_one_line(run_cloud, flags: list[str], named: str):
    result = run_cloud('--work-dir', WORK_DIR, *flags, *OFFLINE)
    assert result.returncode == 2 and result.calls == []
    assert len(result.stderr.splitlines()) == 1 and named in result.stderr


# --- Preflight: roles, APIs, the BigQuery dataset, the kind of credentials. -----------------
RUNNER = 'movielens-runner@my-project.iam.gserviceaccount.com'
# The roles the set-up of docs/cloud.md granted before the pipeline mode was checked.
EARLIER_SET_UP = {'bindings': [
    {'role': role, 'members': [f'serviceAccount:{RUNNER}']}
    for role in ('roles/dataflow.worker', 'roles/storage.objectAdmin', 'roles/aiplatform.user',
                 'roles/artifactregistry.reader')] + [
    {'role': role, 'members': ['user:tester@example.com']}
    for role in ('roles/dataflow.developer', 'roles/aiplatform.user',
                 'roles/storage.objectAdmin')]}
ACT_AS_FOR_YOU = {'bindings': [{'role': 'roles/iam.serviceAccountUser',
                                'members': ['user:tester@example.com']}]}
PIPELINE_RUN = ('--work-dir', WORK_DIR, '--project', 'my-project', '--pipeline',
                '--service-account', RUNNER, '--image', IMAGE, '--dataflow-image', IMAGE + '-df',
                '--serving-image', IMAGE + '-serving')


def write_policy(tmp_path: pathlib.Path, name: str, policy: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(policy))
    return str(path)


def one_error_line(result: CloudRun) -> str:
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    return line


def test_preflight_names_the_roles_the_pipeline_account_lacks(run_cloud, tmp_path):
    """The pipeline's account launches Dataflow from the preprocess step, as itself."""
    policy = write_policy(tmp_path, 'policy.json', EARLIER_SET_UP)
    account_policy = write_policy(tmp_path, 'account.json', ACT_AS_FOR_YOU)
    result = run_cloud(*PIPELINE_RUN, FAKE_GCLOUD_IAM_POLICY=policy,
                       FAKE_GCLOUD_SA_POLICY=account_policy)
    line = one_error_line(result)
    assert 'roles/dataflow.developer' in line and f'serviceAccount:{RUNNER}' in line
    assert (f'gcloud projects add-iam-policy-binding my-project --member serviceAccount:{RUNNER}'
            ' --role roles/dataflow.developer') in line
    assert '+ python scripts/pipeline.py' not in result.stdout  # nothing submitted
    # Granted that, it is acting as itself that is missing.
    EARLIER_SET_UP['bindings'].append({'role': 'roles/dataflow.developer',
                                       'members': [f'serviceAccount:{RUNNER}']})
    try:
        policy = write_policy(tmp_path, 'policy.json', EARLIER_SET_UP)
    finally:
        EARLIER_SET_UP['bindings'].pop()
    result = run_cloud(*PIPELINE_RUN, FAKE_GCLOUD_IAM_POLICY=policy,
                       FAKE_GCLOUD_SA_POLICY=account_policy)
    line = one_error_line(result)
    assert (f'gcloud iam service-accounts add-iam-policy-binding {RUNNER} --project my-project '
            f'--member serviceAccount:{RUNNER} --role roles/iam.serviceAccountUser') in line


def test_the_earlier_set_up_still_runs_the_script_mode(run_cloud, tmp_path):
    result = run_cloud('--work-dir', WORK_DIR, '--project', 'my-project', '--image', IMAGE,
                       '--service-account', RUNNER, *OFFLINE,
                       FAKE_GCLOUD_IAM_POLICY=write_policy(tmp_path, 'p.json', EARLIER_SET_UP),
                       FAKE_GCLOUD_SA_POLICY=write_policy(tmp_path, 'a.json', ACT_AS_FOR_YOU))
    assert result.returncode == 0, result.stderr
    assert 'preflight: roles, APIs in place' in result.stdout
    (get_policy,) = result.gcloud('projects', 'get-iam-policy')
    assert result.calls.index(get_policy) < result.calls.index(
        result.gcloud('ai', 'custom-jobs', 'create')[0])


BATCH_TO_BIGQUERY = ('--work-dir', WORK_DIR, '--project', 'my-project', '--image', IMAGE,
                     '--dataflow-image', IMAGE + '-df', '--service-account', RUNNER,
                     '--batch-recommend', '--bigquery-table', 'my-project:movielens.recs',
                     *OFFLINE)


@pytest.mark.parametrize('env, named', [
    ({'FAKE_GCLOUD_SERVICES': 'compute.googleapis.com,storage.googleapis.com,'
      'dataflow.googleapis.com,aiplatform.googleapis.com,artifactregistry.googleapis.com'},
     'gcloud services enable bigquery.googleapis.com --project my-project'),
    ({'FAKE_GCLOUD_DATASETS': 'my-project:movielens', 'FAKE_GCLOUD_IAM_POLICY': 'EARLIER'},
     f'--member serviceAccount:{RUNNER} --role roles/bigquery.dataEditor'),
    ({}, 'bq --location us-central1 mk --dataset my-project:movielens'),
])
def test_preflight_of_the_bigquery_output_before_anything_is_paid_for(
        run_cloud, tmp_path, env: dict[str, str], named: str):
    if env.get('FAKE_GCLOUD_IAM_POLICY') == 'EARLIER':
        env = {**env, 'FAKE_GCLOUD_IAM_POLICY': write_policy(tmp_path, 'p.json', EARLIER_SET_UP),
               'FAKE_GCLOUD_SA_POLICY': write_policy(tmp_path, 'a.json', ACT_AS_FOR_YOU)}
    result = run_cloud(*BATCH_TO_BIGQUERY, **env)
    assert named in one_error_line(result)
    assert result.gcloud('ai', 'custom-jobs') == []


def test_preflight_passes_when_the_dataset_exists(run_cloud):
    result = run_cloud(*BATCH_TO_BIGQUERY, FAKE_GCLOUD_DATASETS='my-project:movielens')
    # The run goes on to train; its batch step then finds no export in the fake bucket.
    assert 'preflight: roles, APIs and BigQuery dataset in place' in result.stdout
    assert result.gcloud('ai', 'custom-jobs', 'create')
    assert [call['argv'] for call in result.gcloud('bq')] == [
        ['bq', 'show', '--format', 'json', 'my-project:movielens']]


def test_skip_preflight_reads_no_policy(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, '--skip-preflight', *OFFLINE,
                       FAKE_GCLOUD_SERVICES='')
    assert result.returncode == 0, result.stderr
    assert result.gcloud('projects') == [] and result.gcloud('services') == []


@pytest.mark.parametrize('kind', ['impersonated_service_account', 'external_account',
                                  'external_account_authorized_user'])
def test_credentials_tensorflow_cannot_use_are_one_line_before_any_step(
        run_cloud, tmp_path, kind: str):
    adc = tmp_path / 'adc.json'
    adc.write_text(json.dumps({'type': kind}))
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, *OFFLINE,
                       GOOGLE_APPLICATION_CREDENTIALS=str(adc))
    line = one_error_line(result)
    assert repr(kind) in line and 'gcloud auth application-default login' in line
    assert result.gcloud('ai') == [] and result.gcloud('projects') == []


@pytest.mark.parametrize('kind', ['authorized_user', 'service_account'])
def test_user_and_key_file_credentials_pass(run_cloud, tmp_path, kind: str):
    config = tmp_path / 'gcloud-config'
    config.mkdir()
    (config / 'application_default_credentials.json').write_text(json.dumps({'type': kind}))
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, *OFFLINE,
                       CLOUDSDK_CONFIG=str(config))
    assert result.returncode == 0, result.stderr


# --- Endpoint cost: earlier models undeployed; --teardown. ---------------------------------
def test_deploy_undeploys_the_earlier_models_once_the_new_one_serves(run_cloud):
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, '--deploy',
                       '--serving-image', IMAGE + '-serving', *OFFLINE,
                       FAKE_GCLOUD_ENDPOINT='projects/1/locations/us-central1/endpoints/42',
                       FAKE_GCLOUD_DEPLOYED='111:movielens_mf_20260101_000000,'
                                            '222:movielens_mf_20260102_000000')
    assert result.returncode == 0, result.stderr
    (deploy,) = result.gcloud('ai', 'endpoints', 'deploy-model')
    undeploys = result.gcloud('ai', 'endpoints', 'undeploy-model')
    assert sorted(flag(call['argv'], '--deployed-model-id') for call in undeploys) == [
        '111', '222']
    assert all(call['argv'][3] == '42' for call in undeploys)
    assert all(result.calls.index(call) > result.calls.index(deploy) for call in undeploys)


def test_a_failed_deployment_leaves_the_earlier_models_serving(run_cloud, tmp_path):
    # A stand-in whose deploy-model fails, as when the container never answers its health route.
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    wrapper = bin_dir / 'gcloud'
    wrapper.write_text('#!/bin/sh\n'
                       'case "$*" in *deploy-model*) "$REAL_GCLOUD" "$@"; echo "ERROR: '
                       'health check failed" >&2; exit 1 ;; esac\n'
                       'exec "$REAL_GCLOUD" "$@"\n')
    wrapper.chmod(0o755)
    result = run_cloud('--work-dir', WORK_DIR, '--image', IMAGE, '--deploy',
                       '--serving-image', IMAGE + '-serving', *OFFLINE,
                       FAKE_GCLOUD_ENDPOINT='projects/1/locations/us-central1/endpoints/42',
                       FAKE_GCLOUD_DEPLOYED='111:movielens_mf_20260101_000000',
                       REAL_GCLOUD=str(FAKE_GCLOUD_DIR / 'gcloud'),
                       PATH=f'{bin_dir}{os.pathsep}{FAKE_GCLOUD_DIR}{os.pathsep}'
                            f'{os.environ["PATH"]}')
    assert result.returncode != 0
    assert result.gcloud('ai', 'endpoints', 'deploy-model')
    assert result.gcloud('ai', 'endpoints', 'undeploy-model') == []


def test_teardown_dry_run_prints_the_commands_and_calls_nothing(run_cloud):
    result = run_cloud('--teardown', '--dry-run')
    assert result.returncode == 0, result.stderr
    assert result.calls == []
    for command in ('+ gcloud ai endpoints list', '+ gcloud ai endpoints delete E',
                    '+ gcloud ai models delete MODEL', '+ gcloud artifacts packages delete'):
        assert command in result.stdout


def test_teardown_removes_endpoints_models_and_images(run_cloud):
    result = run_cloud('--teardown', '--project', 'my-project',
                       FAKE_GCLOUD_ENDPOINT='projects/1/locations/us-central1/endpoints/42',
                       FAKE_GCLOUD_DEPLOYED='111:movielens_mf_a,222:movielens_mf_b')
    assert result.returncode == 0, result.stderr
    (endpoints,) = result.gcloud('ai', 'endpoints', 'list')
    assert flag(endpoints['argv'], '--filter') == 'labels.app=movielens-mf'
    assert sorted(flag(c['argv'], '--deployed-model-id')
                  for c in result.gcloud('ai', 'endpoints', 'undeploy-model')) == ['111', '222']
    (delete_endpoint,) = result.gcloud('ai', 'endpoints', 'delete')
    assert delete_endpoint['argv'][3] == '42'
    assert result.calls.index(delete_endpoint) > max(
        result.calls.index(c) for c in result.gcloud('ai', 'endpoints', 'undeploy-model'))
    (delete_model,) = result.gcloud('ai', 'models', 'delete')
    assert delete_model['argv'][3] == '5555555555'
    assert sorted(c['argv'][3] for c in result.gcloud('artifacts', 'packages', 'delete')) == [
        'serving', 'trainer', 'trainer-dataflow']
    assert result.gcloud('ai', 'custom-jobs') == [] and result.gcloud('builds') == []


# --- scripts/cloud-setup.sh: one command to create what the runs need, one to remove it. ---
SET_UP = REPO / 'scripts' / 'cloud-setup.sh'


def run_set_up(tmp_path: pathlib.Path, *args: str) -> CloudRun:
    log = tmp_path / 'set-up-calls.jsonl'
    env = {**os.environ, 'FAKE_GCLOUD_LOG': str(log),
           'PATH': f'{FAKE_GCLOUD_DIR}{os.pathsep}{os.environ["PATH"]}'}
    done = subprocess.run([str(SET_UP), *args], env=env, capture_output=True, text=True,
                          timeout=120)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return CloudRun(done.returncode, done.stdout, done.stderr, calls)


def granted_policies(set_up: CloudRun, tmp_path: pathlib.Path) -> dict[str, str]:
    """The project's and the runner's IAM policies after the recorded set-up, as files."""
    policies: dict[str, dict[str, list[str]]] = {'project': {}, 'account': {}}
    for call in set_up.calls:
        argv = call['argv']
        kind = ('project' if argv[:2] == ['projects', 'add-iam-policy-binding'] else
                'account' if argv[:3] == ['iam', 'service-accounts', 'add-iam-policy-binding']
                else None)
        if kind:
            policies[kind].setdefault(flag(argv, '--role'), []).append(flag(argv, '--member'))
    return {f'FAKE_GCLOUD_{"IAM" if kind == "project" else "SA"}_POLICY': write_policy(
                tmp_path, f'{kind}.json', {'bindings': [
                    {'role': role, 'members': members} for role, members in grants.items()]})
            for kind, grants in policies.items()}


def preflight(tmp_path: pathlib.Path, env: dict[str, str], *flags: str
              ) -> subprocess.CompletedProcess:
    environ = {**os.environ, **env, 'FAKE_GCLOUD_LOG': str(tmp_path / 'preflight.jsonl'),
               'FAKE_GCLOUD_DATASETS': 'my-project:movielens',
               'PATH': f'{FAKE_GCLOUD_DIR}{os.pathsep}{os.environ["PATH"]}'}
    return subprocess.run([sys.executable, str(REPO / 'scripts' / 'preflight.py'),
                           '--project', 'my-project', '--service-account', RUNNER, '--build',
                           *flags], env=environ, capture_output=True, text=True, timeout=60)


def test_the_set_up_grants_what_preflight_asks_for_in_either_mode(tmp_path):
    set_up = run_set_up(tmp_path, 'create', '--project', 'my-project', '--bucket', 'my-bucket',
                        '--pipeline', '--bigquery-dataset', 'movielens')
    assert set_up.returncode == 0, set_up.stderr
    env = granted_policies(set_up, tmp_path)
    for mode in ([], ['--pipeline']):
        done = preflight(tmp_path, env, *mode, '--bigquery-table', 'my-project:movielens.recs')
        assert done.returncode == 0, done.stderr
    assert [c['argv'][:4] for c in set_up.gcloud('bq')] == [
        ['bq', '--location', 'us-central1', 'mk']]


def test_the_script_mode_set_up_is_refused_by_the_pipeline_preflight(tmp_path):
    set_up = run_set_up(tmp_path, 'create', '--project', 'my-project', '--bucket', 'my-bucket')
    assert set_up.returncode == 0, set_up.stderr
    env = granted_policies(set_up, tmp_path)
    assert preflight(tmp_path, env).returncode == 0
    refused = preflight(tmp_path, env, '--pipeline')
    assert refused.returncode == 1 and 'roles/dataflow.developer' in refused.stderr


def test_the_set_up_delete_removes_it_all(tmp_path):
    done = run_set_up(tmp_path, 'delete', '--project', 'my-project', '--bucket', 'my-bucket',
                      '--bigquery-dataset', 'movielens')
    assert done.returncode == 0, done.stderr
    assert done.gcloud('ai', 'models', 'delete')  # through run-cloud.sh --teardown
    (repository,) = done.gcloud('artifacts', 'repositories', 'delete')
    assert repository['argv'][3] == 'movielens'
    (bucket,) = done.gcloud('storage', 'rm')
    assert 'gs://my-bucket' in bucket['argv'] and '--recursive' in bucket['argv']
    assert [c['argv'] for c in done.gcloud('bq')] == [
        ['bq', 'rm', '-r', '-f', '--dataset', 'my-project:movielens']]
    removed = {flag(c['argv'], '--role')
               for c in done.gcloud('projects', 'remove-iam-policy-binding')}
    assert {'roles/dataflow.worker', 'roles/dataflow.developer',
            'roles/bigquery.jobUser'} <= removed
    (account,) = done.gcloud('iam', 'service-accounts', 'delete')
    assert done.calls.index(account) == len(done.calls) - 1


@pytest.mark.parametrize('args, named', [
    (['make'], 'create or delete'),
    (['create', '--bucket', 'b-1'], '--project'),
    (['create', '--project', 'my-project', '--bucket', 'B; touch CANARY'], '--bucket'),
    (['delete', '--project', 'my-project', '--bucket', 'b-1', '--pipeline'], '--pipeline'),
])
def test_bad_set_up_flags_are_one_line(tmp_path, args: list[str], named: str):
    done = run_set_up(tmp_path, *args)
    assert done.returncode == 2 and done.calls == []
    assert len(done.stderr.splitlines()) == 1 and named in done.stderr


def test_the_flag_reference_in_the_docs_is_the_help_text():
    help_text = subprocess.run([str(RUN_CLOUD), '--help'], capture_output=True, text=True,
                               check=True).stdout
    docs = (REPO / 'docs' / 'cloud.md').read_text()
    assert '```\n' + help_text + '```' in docs
