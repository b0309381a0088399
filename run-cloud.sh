#!/usr/bin/env bash
# The whole workflow on Google Cloud: stage MovieLens ratings in gs://, build the
# training, Dataflow and serving images with Cloud Build (cloudbuild.yaml),
# preprocess on Dataflow in the Dataflow image, train as a Vertex AI custom job (or
# tune its hyperparameters), wait for the job, chart the loss, optionally deploy.
#
#   ./run-cloud.sh --work-dir gs://BUCKET/PREFIX [flags] [-- TRAINER_FLAGS...]
#   ./run-cloud.sh --teardown [--project ID] [--region REGION]
#
# Before any step that costs money, a preflight (scripts/preflight.py) checks the
# roles, APIs and BigQuery dataset the run needs.
#
# Every command is echoed before it runs.  --dry-run echoes the commands and the
# job config and runs none of them (it only renders the config, locally).  Flag
# values are checked against strict patterns before anything runs, and are only
# ever passed as single quoted arguments: nothing here evaluates them.
set -euo pipefail
cd "$(dirname "$0")"

readonly DATASETS="ml-100k ml-1m ml-10m ml-20m ml-25m ml-32m ml-latest-small synthetic"
readonly JOB_PREFIX="movielens_mf"
# The built images: IMAGE_REPOSITORY is the Artifact Registry Docker repository
# of the one-time set-up (docs/cloud.md); each Dockerfile target has an image in it.
readonly IMAGE_REPOSITORY="movielens"
readonly IMAGE_NAME="trainer"
readonly DATAFLOW_IMAGE_NAME="trainer-dataflow"
readonly SERVING_IMAGE_NAME="serving"
# Dataflow workers: 2 vCPUs and 13 GB.  Beam's Python SDK runs one process per
# vCPU, each with TensorFlow loaded and several read blocks (up to 64 MiB, about
# 2.7M ratings each) in flight through TFT; a single local process peaks at 5.6 GB
# on all of ml-25m.  The default n1-standard-1 gives one process 3.75 GB, highmem
# gives each 6.5 GB (docs/cloud.md, "Dataflow workers").
readonly DATAFLOW_MACHINE_TYPE="n1-highmem-2"
readonly DATAFLOW_MAX_WORKERS="8"
readonly TERMINAL_STATES=" JOB_STATE_SUCCEEDED JOB_STATE_FAILED JOB_STATE_CANCELLED JOB_STATE_EXPIRED JOB_STATE_PARTIALLY_SUCCEEDED "
# Consecutive failed `describe` calls (network blips) tolerated while waiting.
readonly MAX_DESCRIBE_FAILURES=5
# Labels on every job, model, endpoint and Dataflow job, so the bill splits by run.
readonly APP_LABEL="movielens-mf"

usage() {
  cat <<USAGE
usage: ./run-cloud.sh --work-dir gs://BUCKET/PREFIX [flags] [-- TRAINER_FLAGS...]
       ./run-cloud.sh --teardown [--project ID] [--region REGION] [--dry-run]
  --work-dir gs://B/P     where every step reads and writes (required; Cloud Storage)
  --project ID            Google Cloud project (default: gcloud config get-value project)
  --region REGION         Dataflow and Vertex AI region (default: us-central1)
  --service-account EMAIL identity of the Dataflow workers and the Vertex AI job
                          (default: each service's default identity; see docs/cloud.md)
  --tensorboard ID        Vertex AI TensorBoard instance (its ID or full resource name)
                          that shows the job's training curves; needs --service-account
  --dataset NAME          one of: ${DATASETS} (default: ml-100k)
  --data-sources PATH     a GroupLens-layout zip (path, URL or gs://) instead of the download
  --workers N             worker replicas besides the chief (default: 0): synchronous
                          data-parallel training; see docs/cloud.md, "Distributed training"
  --machine-type TYPE     machine of every replica (default: n1-standard-4)
  --gpu TYPE:COUNT        accelerators per replica, e.g. NVIDIA_TESLA_T4:1; only with
                          --image of your own CUDA build: the project's image is CPU-only
  --spot                  train on Spot VMs (scheduling.strategy SPOT); a preempted job
                          restarts and resumes from its checkpoints
  --timeout-hours N       cancel the training job (each trial) after N hours (default:
                          by dataset, 2 for ml-100k to 10 for ml-32m; at most 168)
  --hp-tuning             run a hyperparameter-tuning job (hptuning.yaml) instead
  --tuning-space FILE     --hp-tuning only: the study (default: hptuning.yaml, the rating
                          model by validation RMSE; hptuning-ranking.yaml: the top-N
                          model by validation NDCG@10)
  --max-trials N          --hp-tuning only: trials in all (default: 12)
  --parallel-trials N     --hp-tuning only: trials at a time (default: 3)
  --image URI             use this training image; skips the Cloud Build step (then
                          give --dataflow-image or --dataflow-setup-file for step 2,
                          and --serving-image for --deploy)
                          (default: REGION-docker.pkg.dev/PROJECT/${IMAGE_REPOSITORY}/${IMAGE_NAME}:JOB_NAME)
  --dataflow-image URI    Dataflow's custom SDK container (--sdk_container_image)
                          (default: the ${DATAFLOW_IMAGE_NAME} image built with the training image)
  --dataflow-setup-file   fallback: workers pip-install setup.py's package and its pins
                          at start-up instead of using the container (needs internet
                          access from the workers: public IPs or Cloud NAT)
  --dataflow-machine-type TYPE  Dataflow worker machine (default: ${DATAFLOW_MACHINE_TYPE})
  --dataflow-max-workers N      Dataflow autoscaling ceiling (default: ${DATAFLOW_MAX_WORKERS})
  --dataflow-network NAME       VPC network of the Dataflow workers
  --dataflow-subnetwork SUBNET  their subnetwork, e.g. regions/us-central1/subnetworks/NAME
  --dataflow-no-public-ips      workers get private IPs only (the subnetwork needs
                          Private Google Access)
  --dataflow-flag FLAG    any other Beam/Dataflow flag, verbatim and repeatable, e.g.
                          --dataflow-flag=--disk_size_gb=50
  --skip-extract          skip data-extractor.py (the data is staged already)
  --skip-preprocess       skip the Dataflow job (WORK_DIR/transformed/ is done already)
  --skip-plot             skip the loss chart (it reads the loss log from gs://)
  --fig-dir DIR           where the chart goes (default: workdir-cloud/fig, ignored by git)
  --overwrite             redo the steps (extract, preprocess, train), replacing earlier
                          outputs in the work dir
  --poll-seconds N        seconds between job-state checks (default: 60)
  --deploy                after training, upload the SavedModel to the Vertex AI Model
                          Registry and deploy it to an endpoint (created when missing)
  --endpoint NAME         --deploy only: the endpoint's display name (default: movielens-mf)
  --serving-image URI     --deploy only: the prediction container (default: the
                          ${SERVING_IMAGE_NAME} image built with the training image)
  --serving-machine-type TYPE  --deploy only: machine of the endpoint (default: n1-standard-2)
  --batch-recommend       after training, write every user's top-k movies as JSON lines
                          to WORK_DIR/recommendations/ with a Dataflow job (RunInference)
  --top-k N               --batch-recommend only: movies per user (default: 10)
  --bigquery-table P:D.T  --batch-recommend only: also write them to this BigQuery table
  --pipeline              run steps 1-3, training, the model upload (and --batch-recommend)
                          as one Vertex AI pipeline (scripts/pipeline.py) instead; each
                          step is cached, so a re-run with the same flags and images
                          skips what has not changed
  --skip-preflight        skip the check of roles, APIs and the BigQuery dataset (for
                          roles held through a group or a folder, which it cannot see)
  --dry-run               print the commands and the job config; run nothing
  --teardown              remove what runs left behind: endpoints (undeployed first),
                          models and images labelled app=${APP_LABEL}; needs no --work-dir
  -- FLAGS                passed to python -m trainer.task (e.g. -- --num-epochs 30)
USAGE
}

die() { echo "run-cloud.sh: error: $*" >&2; exit 2; }
fail() { echo "run-cloud.sh: error: $*" >&2; exit 1; }

# Shows a flag value on one line, whatever characters it holds.
shown() {
  if [[ "$1" =~ ^[[:print:]]*$ ]]; then printf "'%s'" "$1"; else printf '%q' "$1"; fi
}

# check FLAG VALUE PATTERN WHAT: dies naming the flag unless VALUE matches PATTERN.
check() { [[ "$2" =~ $3 ]] || die "$1 $(shown "$2") is not $4"; }

need_value() { [[ $# -ge 2 ]] || die "$1 needs a value; see ./run-cloud.sh --help"; }

echo_command() { printf '+'; printf ' %q' "$@"; printf '\n'; }

# Echoes a command, then runs it unless --dry-run.
run() {
  echo_command "$@"
  [[ "${dry_run}" == true ]] || "$@"
}

work_dir=""
project=""
region="us-central1"
service_account=""
tensorboard=""
dataset="ml-100k"
data_sources=""
workers="0"
machine_type="n1-standard-4"
gpu=""
spot=false
timeout_hours=""
skip_preflight=false
teardown=false
hp_tuning=false
tuning_space=""
max_trials=""
parallel_trials=""
image=""
skip_extract=false
skip_preprocess=false
skip_plot=false
fig_dir="workdir-cloud/fig"
overwrite=()
poll_seconds="60"
dry_run=false
deploy=false
endpoint=""
serving_image=""
serving_machine_type=""
dataflow_image=""
dataflow_setup_file=false
dataflow_machine_type="${DATAFLOW_MACHINE_TYPE}"
dataflow_max_workers="${DATAFLOW_MAX_WORKERS}"
dataflow_network=""
dataflow_subnetwork=""
dataflow_public_ips=true
dataflow_flags=()
batch_recommend=false
pipeline=false
top_k=""
bigquery_table=""
trainer_flags=()

parse_flags() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --) shift; trainer_flags=("$@"); return ;;
      --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
      -h|--help) usage; exit 0 ;;
      --work-dir) need_value "$@"; work_dir="$2"; shift 2 ;;
      --project) need_value "$@"; project="$2"; shift 2 ;;
      --region) need_value "$@"; region="$2"; shift 2 ;;
      --service-account) need_value "$@"; service_account="$2"; shift 2 ;;
      --tensorboard) need_value "$@"; tensorboard="$2"; shift 2 ;;
      --dataset) need_value "$@"; dataset="$2"; shift 2 ;;
      --data-sources) need_value "$@"; data_sources="$2"; shift 2 ;;
      --workers) need_value "$@"; workers="$2"; shift 2 ;;
      --machine-type) need_value "$@"; machine_type="$2"; shift 2 ;;
      --gpu) need_value "$@"; gpu="$2"; shift 2 ;;
      --tuning-space) need_value "$@"; tuning_space="$2"; shift 2 ;;
      --max-trials) need_value "$@"; max_trials="$2"; shift 2 ;;
      --parallel-trials) need_value "$@"; parallel_trials="$2"; shift 2 ;;
      --image) need_value "$@"; image="$2"; shift 2 ;;
      --fig-dir) need_value "$@"; fig_dir="$2"; shift 2 ;;
      --poll-seconds) need_value "$@"; poll_seconds="$2"; shift 2 ;;
      --hp-tuning) hp_tuning=true; shift ;;
      --spot) spot=true; shift ;;
      --timeout-hours) need_value "$@"; timeout_hours="$2"; shift 2 ;;
      --skip-preflight) skip_preflight=true; shift ;;
      --teardown) teardown=true; shift ;;
      --skip-extract) skip_extract=true; shift ;;
      --skip-preprocess) skip_preprocess=true; shift ;;
      --skip-plot) skip_plot=true; shift ;;
      --overwrite) overwrite=(--overwrite); shift ;;
      --dry-run) dry_run=true; shift ;;
      --deploy) deploy=true; shift ;;
      --endpoint) need_value "$@"; endpoint="$2"; shift 2 ;;
      --serving-image) need_value "$@"; serving_image="$2"; shift 2 ;;
      --serving-machine-type) need_value "$@"; serving_machine_type="$2"; shift 2 ;;
      --dataflow-image) need_value "$@"; dataflow_image="$2"; shift 2 ;;
      --dataflow-setup-file) dataflow_setup_file=true; shift ;;
      --dataflow-machine-type) need_value "$@"; dataflow_machine_type="$2"; shift 2 ;;
      --dataflow-max-workers) need_value "$@"; dataflow_max_workers="$2"; shift 2 ;;
      --dataflow-network) need_value "$@"; dataflow_network="$2"; shift 2 ;;
      --dataflow-subnetwork) need_value "$@"; dataflow_subnetwork="$2"; shift 2 ;;
      --dataflow-no-public-ips) dataflow_public_ips=false; shift ;;
      --dataflow-flag) need_value "$@"; dataflow_flags+=("$2"); shift 2 ;;
      --batch-recommend) batch_recommend=true; shift ;;
      --pipeline) pipeline=true; shift ;;
      --top-k) need_value "$@"; top_k="$2"; shift 2 ;;
      --bigquery-table) need_value "$@"; bigquery_table="$2"; shift 2 ;;
      *) die "unknown flag $(shown "$1"); see ./run-cloud.sh --help (trainer flags go after --)" ;;
    esac
  done
}

# Every value is checked here, before anything runs; the patterns admit no
# spaces and no shell metacharacters.
validate_flags() {
  if [[ "${teardown}" == true ]]; then
    validate_teardown_flags
    return 0
  fi
  [[ -n "${work_dir}" ]] || die "--work-dir is required: a Cloud Storage path, e.g. --work-dir gs://my-bucket/movielens"
  [[ "${work_dir}" == gs://* ]] || die "--work-dir $(shown "${work_dir}") is not a gs:// path; the cloud steps share their files through Cloud Storage, e.g. --work-dir gs://my-bucket/movielens"
  check --work-dir "${work_dir}" '^gs://[a-z0-9][-_.a-z0-9]{1,61}[a-z0-9](/[-_.=+A-Za-z0-9]+)*/?$' \
    "a gs://BUCKET/PREFIX path (bucket: 3-63 lowercase letters, digits, -_.; prefix: letters, digits, -_.=+)"
  work_dir="${work_dir%/}"
  [[ -z "${project}" ]] || check --project "${project}" '^[a-z][-a-z0-9]{4,28}[a-z0-9]$' \
    "a project ID (6-30 lowercase letters, digits or hyphens, starting with a letter), e.g. --project my-project"
  check --region "${region}" '^[a-z]+-[a-z]+[0-9]+$' "a region such as --region us-central1"
  [[ -z "${service_account}" ]] || check --service-account "${service_account}" \
    '^[a-z0-9][-a-z0-9]*@[a-z0-9][-a-z0-9.]*\.gserviceaccount\.com$' \
    "a service account email such as --service-account movielens-runner@my-project.iam.gserviceaccount.com"
  if [[ -n "${tensorboard}" ]]; then
    check --tensorboard "${tensorboard}" '^([0-9]+|projects/[-a-z0-9]+/locations/[a-z]+-[a-z]+[0-9]+/tensorboards/[0-9]+)$' \
      "a TensorBoard instance ID (gcloud ai tensorboards list) or projects/P/locations/R/tensorboards/ID"
    [[ -n "${service_account}" ]] \
      || die "--tensorboard needs --service-account: Vertex AI uploads the job's TensorBoard logs only for a job that runs as a service account"
  fi
  [[ " ${DATASETS} " == *" ${dataset} "* ]] || die "--dataset $(shown "${dataset}") is unknown; use one of: ${DATASETS}"
  [[ -z "${data_sources}" ]] || check --data-sources "${data_sources}" '^[[:graph:]]+$' \
    "a path or URL without spaces, e.g. --data-sources gs://my-bucket/ml-100k.zip"
  check --workers "${workers}" '^(0|[1-9][0-9]{0,2})$' \
    "a non-negative integer (worker replicas besides the chief, at most 999), e.g. --workers 2"
  check --machine-type "${machine_type}" '^[a-z][a-z0-9]*(-[a-z0-9]+)+$' \
    "a Compute Engine machine type such as --machine-type n1-standard-4"
  [[ -z "${gpu}" ]] || check --gpu "${gpu}" '^[A-Z][A-Z0-9_]*:[1-9][0-9]?$' \
    "TYPE:COUNT with COUNT a positive integer, e.g. --gpu NVIDIA_TESLA_T4:1"
  # The built image runs TensorFlow's CPU wheel and the C++ ops have CPU kernels
  # only: an accelerator would be billed every hour and used by nothing.
  [[ -z "${gpu}" || -n "${image}" ]] \
    || die "--gpu ${gpu}: the project's training image is CPU-only (TensorFlow's CPU build, CPU kernels for the C++ ops), so the accelerator would be billed and idle; drop --gpu, or pass --image with a CUDA build of your own"
  timeout_hours="${timeout_hours:-$(default_timeout_hours "${dataset}")}"
  check --timeout-hours "${timeout_hours}" '^([1-9]|[1-9][0-9]|1[0-5][0-9]|16[0-8])$' \
    "a whole number of hours from 1 to 168 (Vertex's limit is 7 days), e.g. --timeout-hours 6"
  [[ -z "${image}" ]] || check --image "${image}" \
    '^[a-z0-9][-.a-z0-9]*(:[0-9]+)?(/[a-z0-9][-_.a-z0-9]*)+(:[A-Za-z0-9_][-_.A-Za-z0-9]{0,127}|@sha256:[a-f0-9]{64})?$' \
    "an image URI such as --image us-central1-docker.pkg.dev/my-project/${IMAGE_REPOSITORY}/${IMAGE_NAME}:v1"
  check --fig-dir "${fig_dir}" '^[[:graph:]]+$' "a directory without spaces, e.g. --fig-dir workdir-cloud/fig"
  check --poll-seconds "${poll_seconds}" '^(0|[1-9][0-9]{0,3})$' "a number of seconds from 0 to 9999, e.g. --poll-seconds 60"
  validate_tuning_flags
  validate_deploy_flags
  validate_dataflow_flags
  validate_batch_flags
  validate_pipeline_flags
}

# The training job's time limit by dataset: far above the measured run (25M
# ratings train in about 4 minutes of compute, docs/cloud.md "What it costs"),
# far below Vertex's default of 7 days.
default_timeout_hours() {
  case "$1" in
    ml-1m) echo 3 ;;
    ml-10m) echo 6 ;;
    ml-20m|ml-25m) echo 8 ;;
    ml-32m) echo 10 ;;
    *) echo 2 ;;
  esac
}

validate_teardown_flags() {
  [[ -z "${project}" ]] || check --project "${project}" '^[a-z][-a-z0-9]{4,28}[a-z0-9]$' \
    "a project ID (6-30 lowercase letters, digits or hyphens, starting with a letter), e.g. --project my-project"
  check --region "${region}" '^[a-z]+-[a-z]+[0-9]+$' "a region such as --region us-central1"
  [[ -z "${work_dir}${image}${gpu}" && "${deploy}${pipeline}${hp_tuning}${batch_recommend}" == falsefalsefalsefalse ]] \
    || die "--teardown runs alone: it takes only --project, --region and --dry-run"
}

validate_pipeline_flags() {
  [[ "${pipeline}" == true ]] || return 0
  [[ "${hp_tuning}" == false ]] || die "--pipeline does not go with --hp-tuning; tune with --hp-tuning alone"
  [[ "${skip_extract}${skip_preprocess}" == falsefalse ]] \
    || die "--skip-extract and --skip-preprocess do not go with --pipeline: its cache skips the steps that have not changed"
  [[ "${deploy}" == false ]] || die "--deploy does not go with --pipeline: the pipeline uploads the model; deploy it with gcloud ai endpoints deploy-model (see docs/cloud.md)"
  [[ -z "${image}" || -n "${serving_image}" ]] \
    || die "--image skips the build, so the pipeline has no serving image for the model upload: add --serving-image URI"
}

validate_batch_flags() {
  if [[ "${batch_recommend}" == false ]]; then
    [[ -z "${top_k}${bigquery_table}" ]] || die "--top-k and --bigquery-table only apply with --batch-recommend; add --batch-recommend or drop them"
    return 0
  fi
  [[ "${hp_tuning}" == false ]] || die "--batch-recommend does not go with --hp-tuning (trials export no model): train the best trial's flags in a plain job with --batch-recommend"
  top_k="${top_k:-10}"
  check --top-k "${top_k}" '^[1-9][0-9]{0,3}$' "a positive integer up to 9999, e.g. --top-k 10"
  [[ -z "${bigquery_table}" ]] || check --bigquery-table "${bigquery_table}" \
    '^[a-z][-a-z0-9]{4,28}[a-z0-9]:[A-Za-z0-9_]{1,1024}\.[-A-Za-z0-9_]{1,1024}$' \
    "PROJECT:DATASET.TABLE, e.g. --bigquery-table my-project:movielens.recommendations"
}

# Prints where run-cloud.sh takes the Beam flag --NAME from, if it sets it.
beam_flag_source() {
  case "$1" in
    runner) echo "its Dataflow step (always DataflowRunner)" ;;
    project|region) echo "--$1" ;;
    temp_location|staging_location) echo "--work-dir" ;;
    job_name) echo "the job name" ;;
    labels|label) echo "its labels (app, dataset, run)" ;;
    setup_file) echo "--dataflow-setup-file" ;;
    sdk_container_image|sdk_location) echo "--dataflow-image" ;;
    service_account_email) echo "--service-account" ;;
    worker_machine_type|machine_type) echo "--dataflow-machine-type" ;;
    max_num_workers) echo "--dataflow-max-workers" ;;
    network) echo "--dataflow-network" ;;
    subnetwork) echo "--dataflow-subnetwork" ;;
    use_public_ips|no_use_public_ips) echo "--dataflow-no-public-ips" ;;
  esac
}

validate_dataflow_flags() {
  local image_pattern='^[a-z0-9][-.a-z0-9]*(:[0-9]+)?(/[a-z0-9][-_.a-z0-9]*)+(:[A-Za-z0-9_][-_.A-Za-z0-9]{0,127}|@sha256:[a-f0-9]{64})?$'
  local flag name source
  [[ -z "${dataflow_image}" ]] || check --dataflow-image "${dataflow_image}" "${image_pattern}" \
    "an image URI such as --dataflow-image us-central1-docker.pkg.dev/my-project/${IMAGE_REPOSITORY}/${DATAFLOW_IMAGE_NAME}:v1"
  [[ -z "${dataflow_image}" || "${dataflow_setup_file}" == false ]] \
    || die "--dataflow-image and --dataflow-setup-file are two ways to give workers the package; pass one"
  if [[ -n "${image}" && -z "${dataflow_image}" && "${dataflow_setup_file}" == false ]] \
     && [[ "${skip_preprocess}" == false || "${batch_recommend}" == true ]]; then
    die "--image skips the build, so Dataflow has no SDK container: add --dataflow-image URI (Dockerfile target dataflow) or --dataflow-setup-file"
  fi
  check --dataflow-machine-type "${dataflow_machine_type}" '^[a-z][a-z0-9]*(-[a-z0-9]+)+$' \
    "a Compute Engine machine type such as --dataflow-machine-type ${DATAFLOW_MACHINE_TYPE}"
  check --dataflow-max-workers "${dataflow_max_workers}" '^[1-9][0-9]{0,3}$' \
    "a positive integer, e.g. --dataflow-max-workers ${DATAFLOW_MAX_WORKERS}"
  [[ -z "${dataflow_network}" ]] || check --dataflow-network "${dataflow_network}" '^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$' \
    "a VPC network name such as --dataflow-network default"
  [[ -z "${dataflow_subnetwork}" ]] || check --dataflow-subnetwork "${dataflow_subnetwork}" \
    '^(https://www\.googleapis\.com/compute/v1/projects/[a-z][-a-z0-9]*/)?regions/[a-z]+-[a-z]+[0-9]+/subnetworks/[a-z]([-a-z0-9]{0,61}[a-z0-9])?$' \
    "regions/REGION/subnetworks/NAME (or its full https://www.googleapis.com/compute/v1/projects/P/... URL)"
  for flag in ${dataflow_flags[@]+"${dataflow_flags[@]}"}; do
    check --dataflow-flag "${flag}" '^--[a-z][a-z0-9_]*(=[-_.,:=/@A-Za-z0-9]+)?$' \
      "one Beam flag as --NAME or --NAME=VALUE, e.g. --dataflow-flag=--disk_size_gb=50"
    name="${flag#--}"; name="${name%%=*}"
    source="$(beam_flag_source "${name}")"
    [[ -z "${source}" ]] \
      || die "--dataflow-flag $(shown "${flag}"): run-cloud.sh sets --${name} itself, from ${source}; drop it from --dataflow-flag"
  done
}

validate_deploy_flags() {
  if [[ "${deploy}" == false ]]; then
    # --pipeline takes --serving-image too: its model upload names the container.
    [[ -z "${endpoint}${serving_machine_type}" && ( -z "${serving_image}" || "${pipeline}" == true ) ]] \
      || die "--endpoint, --serving-image and --serving-machine-type only apply with --deploy (--serving-image also with --pipeline); add --deploy or drop them"
    return 0
  fi
  [[ "${hp_tuning}" == false ]] || die "--deploy does not go with --hp-tuning: train the best trial's flags in a plain job with --deploy"
  endpoint="${endpoint:-movielens-mf}"
  [[ -n "${serving_image}" || -z "${image}" ]] \
    || die "--image skips the build, so there is no serving image: add --serving-image URI (Dockerfile target serving)"
  serving_machine_type="${serving_machine_type:-n1-standard-2}"
  check --endpoint "${endpoint}" '^[a-z][-_a-z0-9]{0,62}$' "an endpoint name of lowercase letters, digits, - and _, e.g. --endpoint movielens-mf"
  [[ -z "${serving_image}" ]] || check --serving-image "${serving_image}" \
    '^[a-z0-9][-.a-z0-9]*(:[0-9]+)?(/[a-z0-9][-_.a-z0-9]*)+(:[A-Za-z0-9_][-_.A-Za-z0-9]{0,127}|@sha256:[a-f0-9]{64})?$' \
    "an image URI such as --serving-image us-central1-docker.pkg.dev/my-project/${IMAGE_REPOSITORY}/${SERVING_IMAGE_NAME}:v1"
  check --serving-machine-type "${serving_machine_type}" '^[a-z][a-z0-9]*(-[a-z0-9]+)+$' \
    "a Compute Engine machine type such as --serving-machine-type n1-standard-2"
}

validate_tuning_flags() {
  if [[ "${hp_tuning}" == false ]]; then
    [[ -z "${max_trials}${parallel_trials}${tuning_space}" ]] || die "--max-trials, --parallel-trials and --tuning-space only apply with --hp-tuning; add --hp-tuning or drop them"
    return 0
  fi
  tuning_space="${tuning_space:-hptuning.yaml}"
  [[ -f "${tuning_space}" ]] || die "--tuning-space ${tuning_space}: no such file; pass hptuning.yaml, hptuning-ranking.yaml or a study of your own"
  max_trials="${max_trials:-12}"
  parallel_trials="${parallel_trials:-3}"
  check --max-trials "${max_trials}" '^[1-9][0-9]{0,3}$' "a positive integer, e.g. --max-trials 12"
  check --parallel-trials "${parallel_trials}" '^[1-9][0-9]{0,3}$' "a positive integer, e.g. --parallel-trials 3"
  (( parallel_trials <= max_trials )) || die "--parallel-trials ${parallel_trials} is more than --max-trials ${max_trials}; pass at most ${max_trials}"
}

resolve_project() {
  [[ -z "${project}" ]] || return 0
  if [[ "${dry_run}" == true ]]; then
    project="PROJECT_ID"
    echo "# --project not given: PROJECT_ID stands for the output of: gcloud config get-value project"
    return 0
  fi
  echo_command gcloud config get-value project
  project="$(gcloud config get-value project 2>/dev/null || true)"
  [[ -n "${project}" ]] || die "--project is not given and gcloud has no default project; pass --project YOUR_PROJECT_ID (or run gcloud config set project YOUR_PROJECT_ID)"
  check "--project (from gcloud config)" "${project}" '^[a-z][-a-z0-9]{4,28}[a-z0-9]$' \
    "a project ID of 6-30 lowercase letters, digits or hyphens; pass --project YOUR_PROJECT_ID"
}

# Steps 1-2 and the chart run here and reach gs:// through Application Default
# Credentials, which `gcloud auth login` does not set up: check them before any step.
check_credentials() {
  local token=(gcloud auth application-default print-access-token)
  echo_command "${token[@]}"
  if [[ "${dry_run}" == true ]]; then
    echo_command python scripts/preflight.py --credentials
    return 0
  fi
  "${token[@]}" >/dev/null 2>&1 \
    || fail "no Application Default Credentials: run gcloud auth application-default login (or set GOOGLE_APPLICATION_CREDENTIALS to a key file), then run again"
  # A token is not enough: TensorFlow's GCS client reads user and key-file
  # credentials only, not impersonation or workload identity federation.
  echo_command python scripts/preflight.py --credentials
  python scripts/preflight.py --credentials || exit 1
}

# Renders the job config into ${job_config} and prints it.
render_job_config() {
  local base_output_dir="${work_dir}/model" render=()
  [[ "${hp_tuning}" == false ]] || base_output_dir="${work_dir}/hptuning/${job_name}"
  render=(python scripts/render_job_config.py --out "${job_config}" --image-uri "${image}"
          --machine-type "${machine_type}" --work-dir "${work_dir}"
          --base-output-dir "${base_output_dir}" --workers "${workers}"
          --timeout "$((timeout_hours * 3600))")
  [[ -z "${gpu}" ]] || render+=(--gpu "${gpu}")
  [[ "${spot}" == false ]] || render+=(--spot)
  if [[ -n "${tensorboard}" ]]; then
    # A bare ID is an instance in this project and region.
    [[ "${tensorboard}" == projects/* ]] || tensorboard="projects/${project}/locations/${region}/tensorboards/${tensorboard}"
    render+=(--tensorboard "${tensorboard}")
  fi
  [[ "${hp_tuning}" == false ]] || render+=(--hp-tuning --tuning-template "${tuning_space}")
  render+=("${overwrite[@]}")
  echo_command "${render[@]}" -- "${trainer_flags[@]}"
  "${render[@]}" -- "${trainer_flags[@]}" || exit 2
  echo "# ${job_config}:"
  cat "${job_config}"
}

run_extract() {
  local flags=(--work-dir "${work_dir}" --dataset "${dataset}" "${overwrite[@]}")
  [[ -z "${data_sources}" ]] || flags+=(--data-sources "${data_sources}")
  run python data-extractor.py "${flags[@]}"
}

# Beam's own flags, spelled as Beam spells them; preprocess.py hands them to
# PipelineOptions.
# Sets the caller's beam_flags to the flags of a Dataflow job named $1.
set_dataflow_flags() {
  beam_flags=(--runner DataflowRunner --project "${project}" --region "${region}"
              --temp_location "${work_dir}/tmp" --staging_location "${work_dir}/staging"
              ${1:+--job_name "$1"})
  if [[ "${dataflow_setup_file}" == true ]]; then
    beam_flags+=(--setup_file ./setup.py)
  else
    # The image holds the pinned stack and `trainer`; `container` stops Beam from
    # staging its own SDK tarball on top of it.
    beam_flags+=(--sdk_container_image "${dataflow_image}" --sdk_location container)
  fi
  beam_flags+=(--worker_machine_type "${dataflow_machine_type}" --max_num_workers "${dataflow_max_workers}")
  [[ -z "${service_account}" ]] || beam_flags+=(--service_account_email "${service_account}")
  [[ -z "${dataflow_network}" ]] || beam_flags+=(--network "${dataflow_network}")
  [[ -z "${dataflow_subnetwork}" ]] || beam_flags+=(--subnetwork "${dataflow_subnetwork}")
  [[ "${dataflow_public_ips}" == true ]] || beam_flags+=(--no_use_public_ips)
  # The run label changes every run; the pipeline leaves it out of its steps
  # (it would change their cache keys) and puts it on the pipeline run.
  beam_flags+=(--labels "app=${APP_LABEL}" --labels "dataset=${dataset}")
  [[ -z "$1" ]] || beam_flags+=(--labels "run=${run_label}")
  beam_flags+=(${dataflow_flags[@]+"${dataflow_flags[@]}"})
}

run_preprocess() {
  local beam_flags=()
  set_dataflow_flags "${dataflow_job}"
  run python preprocess.py --work-dir "${work_dir}" "${overwrite[@]}" "${beam_flags[@]}"
}

# Every user's top-k from the SavedModel the job exported (AIP_MODEL_DIR), on Dataflow.
run_batch_recommend() {
  local beam_flags=() flags=(--work-dir "${work_dir}" --export-dir "${work_dir}/model/model" -k "${top_k}")
  set_dataflow_flags "${dataflow_job}-recommend"
  [[ -z "${bigquery_table}" ]] || flags+=(--bigquery-table "${bigquery_table}")
  run python -m trainer.serving.batch "${flags[@]}" "${overwrite[@]}" "${beam_flags[@]}"
}

# The pipeline: compiled here, then submitted to Vertex AI Pipelines; each step
# names its own Dataflow job.
run_pipeline() {
  local beam_flags=() flags=(--out "${tmp_dir}/pipeline.yaml" --job-config "${job_config}"
    --project "${project}" --region "${region}" --work-dir "${work_dir}" --display-name "${job_name}"
    --image "${image}" --serving-image "${serving_image}" --dataset "${dataset}" --submit)
  set_dataflow_flags ""
  [[ -z "${data_sources}" ]] || flags+=(--data-sources "${data_sources}")
  [[ -z "${service_account}" ]] || flags+=(--service-account "${service_account}")
  [[ -z "${tensorboard}" ]] || flags+=(--tensorboard "${tensorboard}")
  [[ "${batch_recommend}" == false ]] || flags+=(--batch-recommend --top-k "${top_k}")
  [[ -z "${bigquery_table}" ]] || flags+=(--bigquery-table "${bigquery_table}")
  flags+=(--label "app=${APP_LABEL}" --label "dataset=${dataset}" --run-label "run=${run_label}")
  flags+=("${overwrite[@]}")
  run python scripts/pipeline.py "${flags[@]}" -- "${beam_flags[@]}"
}

# One Cloud Build of the three Dockerfile targets (cloudbuild.yaml); each builds
# only the stages it needs and they share the base layers.
build_images() {
  run gcloud builds submit --project "${project}" --region "${region}" --config cloudbuild.yaml \
    --substitutions "_TRAINER_IMAGE=${image},_DATAFLOW_IMAGE=${built_dataflow_image},_SERVING_IMAGE=${built_serving_image}" .
}

# Creates the Vertex AI job; sets job_id (the numeric id of the resource name).
submit_job() {
  local create=(gcloud ai "${job_kind}" create --project "${project}" --region "${region}"
                --display-name "${job_name}" --config "${job_config}" --labels "${labels}")
  [[ "${hp_tuning}" == false ]] || create+=(--max-trial-count "${max_trials}" --parallel-trial-count "${parallel_trials}")
  [[ -z "${service_account}" ]] || create+=(--service-account "${service_account}")
  create+=(--format 'value(name)')
  echo_command "${create[@]}"
  if [[ "${dry_run}" == true ]]; then
    job_id="JOB_ID"
    return 0
  fi
  local resource
  resource="$("${create[@]}")" || fail "gcloud ai ${job_kind} create failed (see above)"
  job_id="${resource##*/}"
  [[ "${job_id}" =~ ^[0-9A-Za-z_-]+$ ]] || fail "gcloud ai ${job_kind} create printed $(shown "${resource}"), not a job resource name"
  echo "run-cloud.sh: submitted ${resource} (${job_name})"
}

stop_stream() {
  if [[ -n "${stream_pid}" ]]; then
    kill "${stream_pid}" 2>/dev/null || true
    wait "${stream_pid}" 2>/dev/null || true
    stream_pid=""
  fi
}

# Streams the job's logs in the background and polls its state until it ends;
# exits 1 unless it succeeded.
wait_for_job() {
  local where=("${job_id}" --project "${project}" --region "${region}")
  local describe=(gcloud ai "${job_kind}" describe "${where[@]}" --format 'value(state)')
  echo_command gcloud ai "${job_kind}" stream-logs "${where[@]}"
  echo_command "${describe[@]}"
  echo "# (the state is checked every ${poll_seconds} s until it is one of:${TERMINAL_STATES% })"
  [[ "${dry_run}" == false ]] || return 0
  gcloud ai "${job_kind}" stream-logs "${where[@]}" &
  stream_pid=$!
  local state="" previous="" failures=0
  while true; do
    if state="$("${describe[@]}")" && [[ -n "${state}" ]]; then
      failures=0
      [[ "${state}" == "${previous}" ]] || echo "run-cloud.sh: ${job_name} is ${state}"
      previous="${state}"
      [[ "${TERMINAL_STATES}" != *" ${state} "* ]] || break
    else
      failures=$((failures + 1))
      (( failures < MAX_DESCRIBE_FAILURES )) || fail "could not read the state of ${job_name} ${failures} times in a row; check it with: gcloud ai ${job_kind} describe ${job_id} --region ${region}"
    fi
    sleep "${poll_seconds}"
  done
  stop_stream
  [[ "${state}" == JOB_STATE_SUCCEEDED ]] || fail "${job_name} ended in ${state}; its logs: gcloud ai ${job_kind} stream-logs ${job_id} --project ${project} --region ${region}"
}

summarize() {
  [[ "${dry_run}" == false ]] || return 0
  echo "run-cloud.sh: ${job_name} succeeded"
  if [[ "${hp_tuning}" == true ]]; then
    echo "  trials: ${work_dir}/hptuning/${job_name}/<trial id>/loss_log.csv (trials run --metric-only: no export)"
    echo "  best trial: gcloud ai hp-tuning-jobs describe ${job_id} --project ${project} --region ${region}"
    echo "  chart a trial: python plot.py --model-dir ${work_dir}/hptuning/${job_name}/TRIAL_ID"
    return 0
  fi
  echo "  model dir: ${work_dir}/model (loss_log.csv, metrics.json, checkpoints/)"
  echo "  SavedModel: ${work_dir}/model/model/ (Vertex's AIP_MODEL_DIR)"
  [[ "${skip_plot}" == true ]] || echo "  chart: ${chart}"
  [[ "${batch_recommend}" == false ]] || echo "  recommendations: ${work_dir}/recommendations/part-*.jsonl"
  [[ -z "${deployed_endpoint}" ]] || echo "  endpoint: ${deployed_endpoint} in ${region} (predict: see the Serving section of docs/cloud.md)"
}

# Runs a gcloud command that prints one resource name and keeps its last part
# (the numeric id) in the variable named by $1; in --dry-run it keeps $2.
resource_id() {
  local into="$1" placeholder="$2" name
  shift 2
  echo_command "$@"
  if [[ "${dry_run}" == true ]]; then
    printf -v "${into}" '%s' "${placeholder}"
    return 0
  fi
  name="$("$@" | head -n 1)" || fail "$(printf '%s ' "${@:1:3}")failed (see above)"
  printf -v "${into}" '%s' "${name##*/}"
}

# Uploads the SavedModel to the Model Registry and deploys it to the endpoint,
# creating the endpoint when none has that display name.
deploy_model() {
  local where=(--project "${project}" --region "${region}") model_id="" endpoint_id=""
  # The serving image (trainer/serving/server.py) reads the port and routes Vertex passes.
  run gcloud ai models upload "${where[@]}" --display-name "${job_name}" \
    --artifact-uri "${work_dir}/model/model" --container-image-uri "${serving_image}" \
    --container-ports 8080 --container-health-route /health --container-predict-route /predict \
    --labels "${labels}"
  resource_id model_id MODEL_ID gcloud ai models list "${where[@]}" \
    --filter "display_name=${job_name}" --format 'value(name)'
  [[ -n "${model_id}" ]] || fail "the uploaded model ${job_name} is not in the Model Registry"
  resource_id endpoint_id "" gcloud ai endpoints list "${where[@]}" \
    --filter "display_name=${endpoint}" --format 'value(name)'
  if [[ -z "${endpoint_id}" ]]; then
    [[ "${dry_run}" == false ]] || echo "# only when no endpoint is named ${endpoint}:"
    resource_id endpoint_id ENDPOINT_ID gcloud ai endpoints create "${where[@]}" \
      --display-name "${endpoint}" --labels "app=${APP_LABEL}" --format 'value(name)'
  fi
  # deploy-model returns once Vertex has the container up and answering its
  # health route; if it fails, set -e stops here and the earlier models serve on.
  run gcloud ai endpoints deploy-model "${endpoint_id}" "${where[@]}" --model "${model_id}" \
    --display-name "${job_name}" --machine-type "${serving_machine_type}" --traffic-split 0=100
  undeploy_others "${endpoint_id}" "${job_name}"
  deployed_endpoint="${endpoint_id}"
}

# Prints "ID<TAB>DISPLAY_NAME" for each model deployed on endpoint $1.
deployed_models() {
  gcloud ai endpoints describe "$1" --project "${project}" --region "${region}" \
    --flatten deployedModels --format 'value(deployedModels.id,deployedModels.displayName)'
}

# Undeploys every model on endpoint $1 except the one displayed as $2 (which now
# takes all the traffic): Vertex bills each deployed model around the clock.
undeploy_others() {
  local endpoint_id="$1" keep="$2" listing id name found=false
  echo_command gcloud ai endpoints describe "${endpoint_id}" --project "${project}" --region "${region}" \
    --flatten deployedModels --format 'value(deployedModels.id,deployedModels.displayName)'
  if [[ "${dry_run}" == true ]]; then
    echo "# then, for each other model on the endpoint: gcloud ai endpoints undeploy-model ${endpoint_id} --deployed-model-id ID"
    return 0
  fi
  listing="$(deployed_models "${endpoint_id}")" || fail "could not list the models on endpoint ${endpoint_id}; the earlier ones are still deployed (see docs/cloud.md, Tear down)"
  while IFS=$'\t' read -r id name; do
    [[ "${name}" != "${keep}" ]] || found=true
  done <<< "${listing}"
  [[ "${found}" == true ]] || fail "${keep} is not among the models deployed on endpoint ${endpoint_id}; the earlier ones were left deployed"
  while IFS=$'\t' read -r id name; do
    [[ -n "${id}" && "${name}" != "${keep}" ]] || continue
    run gcloud ai endpoints undeploy-model "${endpoint_id}" --project "${project}" --region "${region}" \
      --deployed-model-id "${id}"
  done <<< "${listing}"
}

# --teardown: every endpoint (its models undeployed first), model and image the
# runs left, found by their app label and the image repository.
teardown() {
  local where=(--project "${project}" --region "${region}") endpoint_id model package listing id name
  local list_endpoints=(gcloud ai endpoints list "${where[@]}" --filter "labels.app=${APP_LABEL}" --format 'value(name)')
  local list_models=(gcloud ai models list "${where[@]}" --filter "labels.app=${APP_LABEL}" --format 'value(name)')
  local list_packages=(gcloud artifacts packages list --project "${project}" --location "${region}"
                       --repository "${IMAGE_REPOSITORY}" --format 'value(name)')
  if [[ "${dry_run}" == true ]]; then
    echo_command "${list_endpoints[@]}"
    echo "# for each endpoint E: gcloud ai endpoints undeploy-model E --deployed-model-id ID (each model), then:"
    echo_command gcloud ai endpoints delete E "${where[@]}" --quiet
    echo_command "${list_models[@]}"
    echo_command gcloud ai models delete MODEL "${where[@]}" --quiet
    echo_command "${list_packages[@]}"
    echo_command gcloud artifacts packages delete PACKAGE --project "${project}" --location "${region}" --repository "${IMAGE_REPOSITORY}" --quiet
    return 0
  fi
  echo_command "${list_endpoints[@]}"
  for endpoint_id in $("${list_endpoints[@]}"); do
    endpoint_id="${endpoint_id##*/}"
    echo_command gcloud ai endpoints describe "${endpoint_id}" "${where[@]}" --flatten deployedModels \
      --format 'value(deployedModels.id,deployedModels.displayName)'
    listing="$(deployed_models "${endpoint_id}")"
    while IFS=$'\t' read -r id name; do
      [[ -z "${id}" ]] || run gcloud ai endpoints undeploy-model "${endpoint_id}" "${where[@]}" --deployed-model-id "${id}"
    done <<< "${listing}"
    run gcloud ai endpoints delete "${endpoint_id}" "${where[@]}" --quiet
  done
  echo_command "${list_models[@]}"
  for model in $("${list_models[@]}"); do
    run gcloud ai models delete "${model##*/}" "${where[@]}" --quiet
  done
  echo_command "${list_packages[@]}"
  for package in $("${list_packages[@]}"); do
    run gcloud artifacts packages delete "${package##*/}" --project "${project}" --location "${region}" \
      --repository "${IMAGE_REPOSITORY}" --quiet
  done
  echo "run-cloud.sh: torn down the endpoints, models and images labelled app=${APP_LABEL} in ${project}/${region}; the bucket, the repository and the service account stay (docs/cloud.md, Tear down)"
}

# The roles, APIs and BigQuery dataset the run needs, checked before anything
# is paid for (scripts/preflight.py); it stops in one line naming the fix.
run_preflight() {
  local flags=(--project "${project}" --region "${region}")
  [[ "${pipeline}" == false ]] || flags+=(--pipeline)
  [[ -z "${service_account}" ]] || flags+=(--service-account "${service_account}")
  [[ "${build_image}" == false ]] || flags+=(--build)
  [[ -z "${tensorboard}" ]] || flags+=(--tensorboard)
  [[ -z "${bigquery_table}" ]] || flags+=(--bigquery-table "${bigquery_table}")
  echo_command python scripts/preflight.py "${flags[@]}"
  [[ "${dry_run}" == false ]] || return 0
  python scripts/preflight.py "${flags[@]}" || exit 1
}

on_interrupt() {
  stop_stream
  if [[ -n "${job_id}" && "${job_id}" != JOB_ID ]]; then
    echo "run-cloud.sh: stopped waiting; ${job_name} keeps running. Cancel it with: gcloud ai ${job_kind} cancel ${job_id} --project ${project} --region ${region}" >&2
  fi
  exit 130
}

cleanup() {
  stop_stream
  [[ -z "${tmp_dir}" ]] || rm -rf "${tmp_dir}"
}

parse_flags "$@"
validate_flags
if [[ "${dry_run}" == false ]]; then
  command -v gcloud >/dev/null 2>&1 || die "gcloud is not on PATH; install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), or use --dry-run to see the commands"
else
  echo "# --dry-run: these are the commands run-cloud.sh would run; none is run (the job config below is only rendered locally)"
fi
resolve_project

if [[ "${teardown}" == true ]]; then
  teardown
  exit 0
fi

# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_venv

job_name="${JOB_PREFIX}_$(date -u +%Y%m%d_%H%M%S)"
dataflow_job="${job_name//_/-}"  # Dataflow job names: lowercase letters, digits, dashes
run_label="${job_name}"  # label values: lowercase letters, digits, _ and -
labels="app=${APP_LABEL},dataset=${dataset},run=${run_label}"
build_image=false
if [[ -z "${image}" ]]; then
  # Built from this checkout by Cloud Build, tagged with the job name.
  build_image=true
  registry="${region}-docker.pkg.dev/${project}/${IMAGE_REPOSITORY}"
  image="${registry}/${IMAGE_NAME}:${job_name}"
  built_dataflow_image="${registry}/${DATAFLOW_IMAGE_NAME}:${job_name}"
  built_serving_image="${registry}/${SERVING_IMAGE_NAME}:${job_name}"
  dataflow_image="${dataflow_image:-${built_dataflow_image}}"
  serving_image="${serving_image:-${built_serving_image}}"
fi
job_kind="custom-jobs"
[[ "${hp_tuning}" == false ]] || job_kind="hp-tuning-jobs"
chart="${fig_dir}/${dataset}-cloud-loss.png"
job_id=""
deployed_endpoint=""
stream_pid=""
tmp_dir="$(mktemp -d)"
job_config="${tmp_dir}/${job_name}.yaml"
trap cleanup EXIT
trap on_interrupt INT TERM

# The config is rendered first: a bad trainer flag stops the run before any step.
render_job_config
check_credentials
[[ "${skip_preflight}" == true ]] || run_preflight
if [[ "${pipeline}" == true ]]; then
  [[ "${build_image}" == false ]] || build_images
  run_pipeline
  [[ "${dry_run}" == true ]] || echo "run-cloud.sh: pipeline ${job_name} submitted; follow it in the Vertex AI console (Pipelines)"
  exit 0
fi
[[ "${skip_extract}" == true ]] || run_extract
# Built before step 2: Dataflow workers start from the Dataflow image.
[[ "${build_image}" == false ]] || build_images
[[ "${skip_preprocess}" == true ]] || run_preprocess
submit_job
wait_for_job
[[ "${skip_plot}" == true || "${hp_tuning}" == true ]] \
  || run python plot.py --model-dir "${work_dir}/model" --out "${chart}"
[[ "${batch_recommend}" == false ]] || run_batch_recommend
[[ "${deploy}" == false ]] || deploy_model
summarize
