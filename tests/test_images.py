"""Dockerfile and cloudbuild.yaml: what Cloud Build would build, checked offline.

No Docker engine runs in the tests; they read the two files and check that each
Cloud Build step builds one Dockerfile target with BuildKit, that the images
pushed are the ones run-cloud.sh passes, and that the targets run what their
service expects.
"""

from __future__ import annotations

import re

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
