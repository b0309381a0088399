#!/usr/bin/env bash
# Creates, or removes, everything run-cloud.sh needs in a Google Cloud project:
# the APIs, the bucket, the Docker repository, the runner service account with
# its roles, your right to act as it, and (with --bigquery-dataset) the dataset.
#
#   scripts/cloud-setup.sh create --project ID --bucket NAME [--region R] [--pipeline]
#                                 [--bigquery-dataset NAME] [--dry-run]
#   scripts/cloud-setup.sh delete --project ID --bucket NAME [--region R]
#                                 [--bigquery-dataset NAME] [--dry-run]
#
# The roles come from scripts/preflight.py, which checks them before each run:
# one table for both.  `create --pipeline` adds what the pipeline mode needs
# (the runner launches Dataflow and acts as itself).  `delete` runs
# ./run-cloud.sh --teardown (endpoints, models, images), then removes the
# repository, the bucket with every file in it, the dataset, the runner's roles
# and the account; the APIs stay enabled.  Every command is echoed first.
set -euo pipefail
cd "$(dirname "$0")/.."

readonly RUNNER_NAME="movielens-runner"
readonly IMAGE_REPOSITORY="movielens"
readonly ACT_AS="roles/iam.serviceAccountUser"

die() { echo "cloud-setup.sh: error: $*" >&2; exit 2; }
echo_command() { printf '+'; printf ' %q' "$@"; printf '\n'; }
run() {
  echo_command "$@"
  [[ "${dry_run}" == true ]] || "$@"
}

action="${1:-}"
[[ "${action}" == create || "${action}" == delete ]] \
  || die "the first argument is create or delete, e.g. scripts/cloud-setup.sh create --project my-project --bucket my-bucket"
shift
project="" bucket="" region="us-central1" pipeline=false dataset="" dry_run=false
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) [[ $# -ge 2 ]] || die "--project needs a value"; project="$2"; shift 2 ;;
    --bucket) [[ $# -ge 2 ]] || die "--bucket needs a value"; bucket="$2"; shift 2 ;;
    --region) [[ $# -ge 2 ]] || die "--region needs a value"; region="$2"; shift 2 ;;
    --bigquery-dataset) [[ $# -ge 2 ]] || die "--bigquery-dataset needs a value"; dataset="$2"; shift 2 ;;
    --pipeline) pipeline=true; shift ;;
    --dry-run) dry_run=true; shift ;;
    *) die "unknown flag $(printf '%q' "$1"); flags: --project ID --bucket NAME [--region R] [--pipeline] [--bigquery-dataset NAME] [--dry-run]" ;;
  esac
done
[[ "${project}" =~ ^[a-z][-a-z0-9]{4,28}[a-z0-9]$ ]] || die "--project $(printf '%q' "${project}") is not a project ID (6-30 lowercase letters, digits or hyphens), e.g. --project my-project"
[[ "${bucket}" =~ ^[a-z0-9][-_.a-z0-9]{1,61}[a-z0-9]$ ]] || die "--bucket $(printf '%q' "${bucket}") is not a bucket name (3-63 lowercase letters, digits, -_.), e.g. --bucket my-bucket"
[[ "${region}" =~ ^[a-z]+-[a-z]+[0-9]+$ ]] || die "--region $(printf '%q' "${region}") is not a region such as us-central1"
[[ -z "${dataset}" || "${dataset}" =~ ^[A-Za-z0-9_]{1,1024}$ ]] || die "--bigquery-dataset $(printf '%q' "${dataset}") is not a dataset name (letters, digits, _)"
[[ "${action}" == create || "${pipeline}" == false ]] || die "--pipeline only applies to create (delete removes both modes' set-up)"

# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_venv

runner="${RUNNER_NAME}@${project}.iam.gserviceaccount.com"
table=()
[[ "${pipeline}" == false ]] || table+=(--pipeline)
[[ -z "${dataset}" ]] || table+=(--bigquery-table "${project}:${dataset}.recommendations")
# What the runs need, from preflight's table (every run builds its images here).
mapfile -t apis < <(python scripts/preflight.py --print apis --build "${table[@]}")
# The script mode's launcher roles include the pipeline mode's.
mapfile -t launcher_roles < <(python scripts/preflight.py --print launcher --build)
mapfile -t runner_roles < <(python scripts/preflight.py --print runner --tensorboard "${table[@]}")
if [[ "${action}" == delete ]]; then
  # Every role either mode grants the runner, so delete leaves no binding behind.
  mapfile -t runner_roles < <(python scripts/preflight.py --print runner --pipeline --tensorboard \
    --bigquery-table "${project}:dataset.recommendations")
fi
(( ${#apis[@]} && ${#launcher_roles[@]} && ${#runner_roles[@]} )) \
  || die "scripts/preflight.py --print listed nothing; run python scripts/preflight.py --print apis to see why"

create() {
  local account member role
  echo_command gcloud config get-value account
  account="$( [[ "${dry_run}" == true ]] && echo YOU@example.com || gcloud config get-value account)"
  [[ -n "${account}" ]] || die "gcloud has no account; run gcloud auth login first"
  member="user:${account}"
  [[ "${account}" != *.gserviceaccount.com ]] || member="serviceAccount:${account}"
  run gcloud services enable "${apis[@]}" --project "${project}"
  run gcloud storage buckets create "gs://${bucket}" --project "${project}" --location "${region}" \
    --uniform-bucket-level-access
  run gcloud artifacts repositories create "${IMAGE_REPOSITORY}" --project "${project}" \
    --repository-format docker --location "${region}"
  [[ -z "${dataset}" ]] || run bq --location "${region}" mk --dataset "${project}:${dataset}"
  run gcloud iam service-accounts create "${RUNNER_NAME}" --project "${project}" \
    --display-name "run-cloud.sh jobs"
  for role in "${runner_roles[@]}"; do
    run gcloud projects add-iam-policy-binding "${project}" --member "serviceAccount:${runner}" \
      --role "${role}" --condition None
  done
  for role in "${launcher_roles[@]}"; do
    run gcloud projects add-iam-policy-binding "${project}" --member "${member}" --role "${role}" \
      --condition None
  done
  # You launch jobs that run as the runner; in pipeline mode the runner launches
  # Dataflow workers that run as itself.
  run gcloud iam service-accounts add-iam-policy-binding "${runner}" --project "${project}" \
    --member "${member}" --role "${ACT_AS}"
  [[ "${pipeline}" == false ]] || run gcloud iam service-accounts add-iam-policy-binding "${runner}" \
    --project "${project}" --member "serviceAccount:${runner}" --role "${ACT_AS}"
  echo "cloud-setup.sh: set up ${project} for run-cloud.sh$([[ "${pipeline}" == false ]] || echo ' --pipeline'): pass --work-dir gs://${bucket}/movielens --service-account ${runner}"
}

delete() {
  local role teardown=(./run-cloud.sh --teardown --project "${project}" --region "${region}")
  [[ "${dry_run}" == false ]] || teardown+=(--dry-run)
  run "${teardown[@]}"
  run gcloud artifacts repositories delete "${IMAGE_REPOSITORY}" --project "${project}" \
    --location "${region}" --quiet
  run gcloud storage rm --recursive "gs://${bucket}" --project "${project}"
  [[ -z "${dataset}" ]] || run bq rm -r -f --dataset "${project}:${dataset}"
  for role in "${runner_roles[@]}"; do
    # Either mode's roles: one the runner never had is not an error.
    run gcloud projects remove-iam-policy-binding "${project}" --member "serviceAccount:${runner}" \
      --role "${role}" --condition None || echo "# (${role} was not bound)"
  done
  run gcloud iam service-accounts delete "${runner}" --project "${project}" --quiet
  echo "cloud-setup.sh: removed the run-cloud.sh set-up of ${project} (the APIs stay enabled; your own roles stay)"
}

"${action}"
