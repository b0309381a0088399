"""Checks, before anything is paid for, what a run-cloud.sh run needs from the project.

Owns the table of roles each identity needs per mode (the steps run from this
machine, or as a Vertex AI pipeline), the APIs, and the BigQuery dataset of
--bigquery-table.  It reads them through the Google Cloud CLI:

    gcloud config get-value account                       # you, the launcher
    gcloud projects get-iam-policy PROJECT --format json  # project-level roles
    gcloud iam service-accounts get-iam-policy SA ...     # actAs granted on the account itself
    gcloud services list --enabled --project PROJECT ...  # the APIs
    gcloud projects describe PROJECT ...                  # its number, without --service-account
    bq show --format json PROJECT:DATASET                 # with --bigquery-table

and stops at the first thing missing with one line naming it and the command
that grants (enables, creates) it.  Roles held through a group, a folder or the
organisation are not in the project's policy; run-cloud.sh --skip-preflight
skips this check for them.  With --credentials it checks only the type of the
Application Default Credentials (trainer.fileio.gcs_credentials_problem).

    python scripts/preflight.py --project P --region R [--pipeline] [--service-account SA]
        [--build] [--tensorboard] [--bigquery-table P:D.T]
    python scripts/preflight.py --credentials
    python scripts/preflight.py --print launcher|runner|apis [--pipeline] [--build] ...

--print lists the roles of one identity (or the APIs), one a line, for
scripts/cloud-setup.sh to grant: the table lives here only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as python scripts/preflight.py
    sys.path.insert(0, str(REPO))
from trainer import fileio  # noqa: E402  pylint: disable=wrong-import-position

# Basic roles that hold every permission below (Editor includes actAs and the
# Dataflow, Vertex AI, Cloud Storage, Artifact Registry and BigQuery ones).
_BASIC = ('roles/owner', 'roles/editor')
# A needed role -> the predefined roles that also grant what the run uses of it.
_ALSO_GRANTED_BY = {
    'roles/storage.objectAdmin': ('roles/storage.admin',),
    'roles/dataflow.developer': ('roles/dataflow.admin',),
    'roles/dataflow.worker': (),
    'roles/aiplatform.user': ('roles/aiplatform.admin',),
    'roles/artifactregistry.reader': ('roles/artifactregistry.writer',
                                      'roles/artifactregistry.repoAdmin',
                                      'roles/artifactregistry.admin'),
    'roles/cloudbuild.builds.editor': ('roles/cloudbuild.builds.builder',),
    'roles/iam.serviceAccountUser': ('roles/iam.serviceAccountAdmin',),
    'roles/bigquery.dataEditor': ('roles/bigquery.dataOwner', 'roles/bigquery.admin'),
    'roles/bigquery.jobUser': ('roles/bigquery.user', 'roles/bigquery.admin'),
}
ACT_AS = 'roles/iam.serviceAccountUser'
BIGQUERY_API = 'bigquery.googleapis.com'
# Every run: staging and work dir, Dataflow, Vertex AI, the images' registry.
BASE_APIS = ('compute.googleapis.com', 'storage.googleapis.com', 'dataflow.googleapis.com',
             'aiplatform.googleapis.com', 'artifactregistry.googleapis.com')
BUILD_API = 'cloudbuild.googleapis.com'


@dataclasses.dataclass(frozen=True)
class Run:
    """What the run does, as far as permissions go."""
    project: str
    region: str
    pipeline: bool = False
    service_account: str | None = None
    build: bool = False
    tensorboard: bool = False
    bigquery_table: str | None = None


@dataclasses.dataclass(frozen=True)
class Need:
    """One role an identity needs, and why."""
    role: str
    why: str


def launcher_needs(run: Run) -> list[Need]:
    """The roles of the person (or account) running run-cloud.sh."""
    needs = [Need('roles/aiplatform.user', 'to create the Vertex AI jobs' if not run.pipeline
                  else 'to submit the Vertex AI pipeline'),
             Need('roles/storage.objectAdmin', 'to write the work dir in Cloud Storage')]
    if not run.pipeline:
        needs.append(Need('roles/dataflow.developer', 'to launch the Dataflow jobs'))
    if run.build:
        needs.append(Need('roles/cloudbuild.builds.editor', 'to build the images'))
    return needs


def runner_needs(run: Run) -> list[Need]:
    """The roles of the identity the jobs run as (Dataflow workers, Vertex AI job, pipeline)."""
    needs = [Need('roles/dataflow.worker', 'to run Dataflow work items'),
             Need('roles/storage.objectAdmin', 'to read and write the work dir'),
             Need('roles/artifactregistry.reader', 'to pull the images')]
    if run.pipeline:
        # The pipeline's preprocess step launches Dataflow itself (dataflow.jobs.create,
        # which dataflow.worker lacks), as this same account, and creates the custom job.
        needs += [Need('roles/dataflow.developer', 'to launch Dataflow from the pipeline'),
                  Need('roles/aiplatform.user', 'to create the training job and upload the model')]
    elif run.tensorboard:
        needs.append(Need('roles/aiplatform.user', 'to upload TensorBoard logs'))
    if run.bigquery_table:
        needs += [Need('roles/bigquery.dataEditor', 'to write the BigQuery table'),
                  Need('roles/bigquery.jobUser', 'to run the BigQuery load jobs')]
    return needs


def needed_apis(run: Run) -> list[str]:
    apis = list(BASE_APIS)
    if run.build:
        apis.append(BUILD_API)
    if run.bigquery_table:
        apis.append(BIGQUERY_API)
    return apis


def roles_of(policy: dict, member: str) -> set[str]:
    """The roles a policy binds to member directly (not through groups)."""
    return {binding['role'] for binding in policy.get('bindings', [])
            if member in binding.get('members', [])}


def holds(roles: set[str], role: str) -> bool:
    return bool(roles & {role, *_ALSO_GRANTED_BY.get(role, ()), *_BASIC})


def member_of(account: str) -> str:
    return ('serviceAccount:' if account.endswith('.gserviceaccount.com') else 'user:') + account


def grant_command(project: str, member: str, role: str) -> str:
    return (f'gcloud projects add-iam-policy-binding {project} --member {member} '
            f'--role {role}')


class Missing(Exception):
    """Something the run needs is missing; the message is the one line to print."""


Gcloud = Callable[[Sequence[str]], subprocess.CompletedProcess]


def call(argv: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


def _json(gcloud: Gcloud, argv: Sequence[str], what: str) -> dict:
    text = _output(gcloud, argv, what)
    try:
        return json.loads(text or '{}')
    except ValueError as error:
        raise Missing(f'could not parse {what} ({error}); check it by hand or pass '
                      '--skip-preflight') from error


def _output(gcloud: Gcloud, argv: Sequence[str], what: str) -> str:
    done = gcloud(argv)
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ['no output'])[-1]
        raise Missing(f'could not read {what} ({" ".join(argv[:4])}...: {detail}); '
                      'check it by hand or pass --skip-preflight')
    return done.stdout


def check_apis(run: Run, gcloud: Gcloud) -> None:
    enabled = set(_output(gcloud, ['gcloud', 'services', 'list', '--enabled', '--project',
                                   run.project, '--format', 'value(config.name)'],
                          'the enabled APIs').split())
    for api in needed_apis(run):
        if api not in enabled:
            raise Missing(f'API {api} is not enabled in {run.project}: '
                          f'gcloud services enable {api} --project {run.project}')


def runner_account(run: Run, gcloud: Gcloud) -> str:
    """--service-account, or the Compute Engine default account the jobs then run as."""
    if run.service_account:
        return run.service_account
    number = _output(gcloud, ['gcloud', 'projects', 'describe', run.project, '--format',
                              'value(projectNumber)'], 'the project number').strip()
    return f'{number}-compute@developer.gserviceaccount.com'


def check_roles(run: Run, gcloud: Gcloud) -> None:
    policy = _json(gcloud, ['gcloud', 'projects', 'get-iam-policy', run.project,
                            '--format', 'json'], 'the IAM policy')
    account = _output(gcloud, ['gcloud', 'config', 'get-value', 'account'],
                      'your gcloud account').strip()
    runner = runner_account(run, gcloud)
    for member, needs in ((member_of(account), launcher_needs(run)),
                          (member_of(runner), runner_needs(run))):
        roles = roles_of(policy, member)
        for need in needs:
            if not holds(roles, need.role):
                raise Missing(f'{member} lacks {need.role} ({need.why}); grant it with: '
                              f'{grant_command(run.project, member, need.role)}')
    # Launching jobs that run as the runner account is acting as it; in pipeline
    # mode the runner also launches Dataflow workers as itself.
    actors = [member_of(account)] + ([member_of(runner)] if run.pipeline else [])
    for actor in actors:
        if holds(roles_of(policy, actor), ACT_AS):
            continue
        account_policy = _json(
            gcloud, ['gcloud', 'iam', 'service-accounts', 'get-iam-policy', runner, '--project',
                     run.project, '--format', 'json'], f'the IAM policy of {runner}')
        if not holds(roles_of(account_policy, actor), ACT_AS):
            raise Missing(f'{actor} lacks {ACT_AS} on {runner} (to run jobs as it); grant it '
                          f'with: gcloud iam service-accounts add-iam-policy-binding {runner} '
                          f'--project {run.project} --member {actor} --role {ACT_AS}')


def check_dataset(run: Run, gcloud: Gcloud) -> None:
    if not run.bigquery_table:
        return
    table_project, rest = run.bigquery_table.split(':', 1)
    dataset = f'{table_project}:{rest.split(".", 1)[0]}'
    if gcloud(['bq', 'show', '--format', 'json', dataset]).returncode != 0:
        raise Missing(f'BigQuery dataset {dataset} (of --bigquery-table) does not exist or is '
                      f'not readable: bq --location {run.region} mk --dataset {dataset}')


def check(run: Run, gcloud: Gcloud = call) -> None:
    """Raises Missing with one line for the first thing the run lacks."""
    check_apis(run, gcloud)
    check_roles(run, gcloud)
    check_dataset(run, gcloud)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python scripts/preflight.py', allow_abbrev=False,
        description='Checks the roles, APIs and BigQuery dataset a run-cloud.sh run needs.')
    add = parser.add_argument
    add('--credentials', action='store_true',
        help='check only that the Application Default Credentials suit the gs:// steps')
    add('--print', choices=('launcher', 'runner', 'apis'), dest='listing',
        help='print the roles this identity needs (or the APIs), one a line; check nothing')
    add('--project')
    add('--region', default='us-central1')
    add('--pipeline', action='store_true', help='run-cloud.sh --pipeline')
    add('--service-account')
    add('--build', action='store_true', help='the run builds the images with Cloud Build')
    add('--tensorboard', action='store_true', help='the job uploads to Vertex AI TensorBoard')
    add('--bigquery-table', metavar='P:D.T')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.credentials:
            problem = fileio.gcs_credentials_problem(os.environ)
            if problem:
                raise Missing(problem)
            return 0
        if not args.project and not args.listing:
            parser.error('--project is required (unless --credentials or --print)')
        run = Run(project=args.project or '', region=args.region, pipeline=args.pipeline,
                  service_account=args.service_account, build=args.build,
                  tensorboard=args.tensorboard, bigquery_table=args.bigquery_table)
        if args.listing:
            listing = {'launcher': [need.role for need in launcher_needs(run)],
                       'runner': [need.role for need in runner_needs(run)],
                       'apis': needed_apis(run)}[args.listing]
            print('\n'.join(listing))
            return 0
        check(run)
    except Missing as missing:
        print(f'run-cloud.sh: error: {missing}', file=sys.stderr)
        return 1
    print(f'preflight: roles, APIs{" and BigQuery dataset" if args.bigquery_table else ""} '
          f'in place for {"the pipeline" if args.pipeline else "the run"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
