"""Dockerfile and cloudbuild.yaml: what Cloud Build would build, checked offline.

No Docker engine runs in the tests; they read the two files and check that each
Cloud Build step builds one Dockerfile target with BuildKit, that the images
pushed are the ones run-cloud.sh passes, and that the targets run what their
service expects.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml

from conftest import REPO

CLOUDBUILD = REPO / 'cloudbuild.yaml'
DOCKERFILE = REPO / 'Dockerfile'
# The substitutions run-cloud.sh passes (tests/test_run_cloud.py checks it does).
SUBSTITUTIONS = {'_TRAINER_IMAGE', '_DATAFLOW_IMAGE', '_SERVING_IMAGE'}
TARGETS = {'trainer': '_TRAINER_IMAGE', 'dataflow': '_DATAFLOW_IMAGE',
           'serving': '_SERVING_IMAGE'}


def stages(dockerfile: str) -> dict[str, list[str]]:
    """Stage name -> its instructions (joined continuation lines), in order."""
    result: dict[str, list[str]] = {}
    current: list[str] = []
    for line in re.sub(r'\\\n', ' ', dockerfile).splitlines():
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        match = re.fullmatch(r'FROM\s+(\S+)\s+AS\s+(\S+)', line, flags=re.IGNORECASE)
        if match:
            current = result.setdefault(match.group(2), [f'FROM {match.group(1)}'])
        elif line.startswith('FROM'):
            raise ValueError(f'unnamed stage: {line}')
        else:
            current.append(line)
    return result


@pytest.fixture(scope='module')
def build() -> dict:
    return yaml.safe_load(CLOUDBUILD.read_text())


@pytest.fixture(scope='module')
def dockerfile_stages() -> dict[str, list[str]]:
    return stages(DOCKERFILE.read_text())


def test_each_step_builds_one_target_with_buildkit(build: dict, dockerfile_stages):
    built = {}
    for step in build['steps']:
        assert step['name'] == 'gcr.io/cloud-builders/docker'
        assert 'DOCKER_BUILDKIT=1' in step['env']
        args = step['args']
        assert args[0] == 'build' and args[-1] == '.'
        target = args[args.index('--target') + 1]
        assert target in dockerfile_stages
        built[target] = args[args.index('--tag') + 1]
    assert built == {target: f'${{{name}}}' for target, name in TARGETS.items()}
    assert sorted(build['images']) == sorted(built.values())


def test_substitutions_are_exactly_what_run_cloud_passes(build: dict):
    used = set(re.findall(r'\$\{(_[A-Z_]+)\}', CLOUDBUILD.read_text()))
    assert used == SUBSTITUTIONS
    # A misspelt or missing substitution fails the build instead of building '' tags.
    assert build['options']['substitutionOption'] == 'MUST_MATCH'
    assert 'substitutions' not in build  # no defaults that would hide a missing one


def test_targets_run_what_their_service_expects(dockerfile_stages):
    entrypoints = {name: next(line for line in reversed(lines) if line.startswith('ENTRYPOINT'))
                   for name, lines in dockerfile_stages.items() if name in TARGETS}
    assert entrypoints == {
        'trainer': 'ENTRYPOINT ["python", "-m", "trainer.task"]',
        'dataflow': 'ENTRYPOINT ["/opt/apache/beam/boot"]',
        'serving': 'ENTRYPOINT ["python", "-m", "trainer.serving"]'}
    for name in TARGETS:
        assert dockerfile_stages[name][0] == 'FROM base'  # one stack for all three
    assert 'EXPOSE 8080' in dockerfile_stages['serving']  # Vertex's default AIP_HTTP_PORT


def test_the_default_target_is_the_trainer(dockerfile_stages):
    assert list(dockerfile_stages)[-1] == 'trainer'


def test_the_beam_boot_binary_matches_the_pinned_beam_and_python(dockerfile_stages):
    text = DOCKERFILE.read_text()
    sdk = re.search(r'ARG BEAM_SDK_IMAGE=apache/beam_python(\d+\.\d+)_sdk:(\S+)', text)
    python = re.search(r'ARG PYTHON_IMAGE=python:(\d+\.\d+)-', text)
    pin = re.search(r'^apache-beam\[gcp\]==(\S+)$', (REPO / 'requirements.txt').read_text(),
                    flags=re.MULTILINE)
    assert sdk and python and pin
    assert sdk.group(1) == python.group(1) == '3.11'
    assert sdk.group(2) == pin.group(1)
    assert 'COPY --from=beam-sdk /opt/apache/beam /opt/apache/beam' in dockerfile_stages['dataflow']


def test_the_build_context_holds_what_the_base_stage_copies(dockerfile_stages):
    allowed = [line[1:] for line in (REPO / '.dockerignore').read_text().splitlines()
               if line.startswith('!')]
    copied = [word for line in dockerfile_stages['base'] if line.startswith('COPY ')
              for word in line.split()[1:-1]]
    assert copied and all(any(path.rstrip('/') == a.rstrip('/') for a in allowed)
                          for path in copied)
    for path in copied:
        assert (REPO / path).exists()


def trainer_user(lines: list[str]) -> tuple[str, int, str, list[str]]:
    """The trainer stage's user, its uid, and the mode and directories it owns (install -d)."""
    (user,) = [line.split()[1] for line in lines if line.startswith('USER ')]
    words = [word for line in lines if line.startswith('RUN ') for word in shlex.split(line[4:])]
    uid = int(words[words.index('--uid') + 1])
    start = words.index('install')
    command = words[start:words.index('&&', start) if '&&' in words[start:] else None]
    assert command[command.index('-o') + 1] == command[command.index('-g') + 1] == user
    mode = command[command.index('-m') + 1]
    return user, uid, mode, [word for word in command[1:] if word.startswith('/')]


def test_the_trainer_user_owns_the_tuning_metric_directories(dockerfile_stages):
    from trainer import config  # pylint: disable=import-outside-toplevel
    user, uid, _, directories = trainer_user(dockerfile_stages['trainer'])
    assert user == 'trainer' and uid != 0
    # Vertex AI's metric directory, and cloudml-hypertune's default (the trainer's too).
    assert '/var/hypertune' in directories
    assert os.path.dirname(config.DEFAULT_HP_METRIC_FILE) in directories


def run_as(uid: int, code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Python code as uid, with this interpreter; reading anything stays allowed
    (the virtualenv may live under a directory only root can enter), writing
    follows uid's permissions."""
    return subprocess.run(
        ['setpriv', '--reuid', str(uid), '--regid', str(uid), '--clear-groups',
         '--inh-caps', '+dac_read_search', '--ambient-caps', '+dac_read_search',
         sys.executable, '-c', code],
        env={'PATH': os.environ['PATH'], 'PYTHONPATH': str(REPO), **env},
        capture_output=True, text=True, timeout=120, check=False)


# What trainer.task does in a trial: the path from the environment, then the report.
REPORT = """
import json, os, sys
from trainer import config, reporting
path = config.make_config('gs://b/w', environ=dict(os.environ)).hypertune_file
try:
    reporting.report_tuning_metric(path, 0.91, 7, '3', 0.0)
except PermissionError as error:
    sys.exit(f'refused: {error}')
print(json.dumps([path, os.stat(path).st_uid, open(path).read()]))
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which('setpriv') is None,
                    reason='needs root and setpriv to run as the image user')
def test_a_tuning_trial_reports_its_metric_as_the_image_user(dockerfile_stages):
    """The Dockerfile's directories, laid out in a scratch root, written by its uid."""
    _, uid, mode, _ = trainer_user(dockerfile_stages['trainer'])
    root = pathlib.Path(tempfile.mkdtemp(prefix='image-root-'))
    try:
        root.chmod(0o755)
        home = root / 'home'
        home.mkdir()
        os.chown(home, uid, uid)
        env = {'HOME': str(home), 'MPLCONFIGDIR': str(home), 'CLOUD_ML_TRIAL_ID': '3'}
        metric = root / 'var' / 'hypertune' / 'output.metrics'
        (root / 'var').mkdir(mode=0o755)  # owned by root, as /var is in the image
        # Without the Dockerfile's directory, the image user cannot write the metric.
        refused = run_as(uid, REPORT, {**env, 'CLOUD_ML_HP_METRIC_FILE': str(metric)})
        assert refused.returncode != 0 and 'refused' in refused.stderr
        metric.parent.mkdir()  # install -d -o trainer -g trainer -m MODE /var/hypertune
        os.chown(metric.parent, uid, uid)
        metric.parent.chmod(int(mode, 8))
        done = run_as(uid, REPORT, {**env, 'CLOUD_ML_HP_METRIC_FILE': str(metric)})
        assert done.returncode == 0, done.stderr
        path, owner, text = json.loads(done.stdout.strip().splitlines()[-1])
        assert (path, owner) == (str(metric), uid)
        line = json.loads(text)
        assert (line['validation_rmse'], line['trial'], line['global_step']) == ('0.91', '3', '7')
    finally:
        shutil.rmtree(root)
