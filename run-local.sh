#!/usr/bin/env bash
# The whole workflow on this machine: stage MovieLens ratings, preprocess them
# with Beam + TFT (in-process runner), train and export the model, chart the loss.
#
#   ./run-local.sh [--work-dir DIR] [--dataset NAME] [--data-sources PATH_OR_URL]
#                  [--fig-dir DIR] [--overwrite] [--verbose] [-- TRAINER_FLAGS...]
#
# Sets up .venv (Python 3.11, pinned packages) on first use; pip's log goes to
# .venv/install.log.  Every output lands in the work dir, charts in WORK_DIR/fig/.
set -euo pipefail
command_line="./run-local.sh $*"
caller_dir="$(pwd)"
cd "$(dirname "$0")"

readonly DATASETS=(ml-100k ml-1m ml-10m ml-20m ml-25m ml-32m ml-latest-small synthetic)

usage() {
  cat <<USAGE
usage: ./run-local.sh [--work-dir DIR] [--dataset NAME] [--data-sources PATH_OR_URL]
                      [--fig-dir DIR] [--overwrite] [--verbose] [-- TRAINER_FLAGS...]
  --work-dir DIR        where every step reads and writes (default: workdir, ignored by git)
  --dataset NAME        one of: ${DATASETS[*]} (default: ml-100k)
  --data-sources PATH   a GroupLens-layout zip (path, file:// or http(s) URL) instead of the download
  --fig-dir DIR         where the loss chart goes (default: WORK_DIR/fig)
  --overwrite           redo every step, replacing earlier outputs in the work dir
  --verbose             show DEBUG logs and TensorFlow's native start-up lines
  -- FLAGS              passed to python -m trainer.task (e.g. -- --num-epochs 30)
Values are used as given (spaces and shell characters included) and never run.
USAGE
}

die() { echo "run-local.sh: error: $*" >&2; exit 2; }

# Shows a flag value on one line, whatever characters it holds.
shown() {
  if [[ "$1" =~ ^[[:print:]]*$ ]]; then printf "'%s'" "$1"; else printf '%q' "$1"; fi
}

# Paths given on the command line are relative to where the script was started;
# the default work dir is relative to the repository.
from_caller() {
  case "$1" in
    /*|gs://*|http://*|https://*|file://*) printf '%s' "$1" ;;
    *) printf '%s/%s' "${caller_dir}" "$1" ;;
  esac
}

need_value() { [[ $# -ge 2 ]] || die "$1 needs a value; see ./run-local.sh --help"; }

# check_path FLAG VALUE: a path is used as given, but must be non-empty, must not
# look like a flag (a forgotten value) and must hold no control characters.
check_path() {
  [[ -n "$2" ]] || die "$1 is empty; pass a path, e.g. $1 $3"
  [[ "$2" != -* ]] || die "$1 $(shown "$2") looks like a flag (a missing value?); write ./$2 for a path starting with -"
  [[ "$2" =~ ^[[:print:]]*$ ]] || die "$1 $(shown "$2") holds a control character (a newline?); pass a plain path"
}

work_dir="workdir"
dataset="ml-100k"
data_sources=""
fig_dir=""
overwrite=()
verbose=()
trainer_flags=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --) shift; trainer_flags=("$@"); break ;;
    --work-dir=*|--dataset=*|--data-sources=*|--fig-dir=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    -h|--help) usage; exit 0 ;;
    --work-dir) need_value "$@"; check_path "$1" "$2" workdir; work_dir="$(from_caller "$2")"; shift 2 ;;
    --dataset) need_value "$@"; dataset="$2"; shift 2 ;;
    --data-sources) need_value "$@"; check_path "$1" "$2" ml-100k.zip; data_sources="$(from_caller "$2")"; shift 2 ;;
    --fig-dir) need_value "$@"; check_path "$1" "$2" fig; fig_dir="$(from_caller "$2")"; shift 2 ;;
    --overwrite) overwrite=(--overwrite); shift ;;
    --verbose) verbose=(--verbose); shift ;;
    *) die "unknown flag $(shown "$1"); see ./run-local.sh --help (trainer flags go after --)" ;;
  esac
done
known=false
for name in "${DATASETS[@]}"; do
  [[ "${dataset}" != "${name}" ]] || known=true
done
[[ "${known}" == true ]] || die "--dataset $(shown "${dataset}") is unknown; use one of: ${DATASETS[*]}"
for flag in "${trainer_flags[@]}"; do
  case "${flag}" in
    --work-dir|--work-dir=*) die "--work-dir after -- would train on another work dir than the one prepared; pass it before --" ;;
  esac
done

[[ -n "${fig_dir}" ]] || fig_dir="${work_dir}/fig"

# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_venv

# One lock on the work dir for the whole chain (trainer/worklock.py): a second run
# is refused before its first step, not between two steps of the first; the steps
# see the token and run under it.  Released on exit, whatever the exit.
lock_token="$(python -m trainer.worklock acquire --dir "${work_dir}" --pid $$ \
  --command "${command_line}" --name run-local.sh)" || exit 2
export WORK_DIR_LOCK_TOKEN="${lock_token}"
release_lock() {
  python -m trainer.worklock release --dir "${work_dir}" --token "${lock_token}" || true
}
trap release_lock EXIT

# SIGTERM or Ctrl-C: the running step gets SIGTERM (the trainer checkpoints and
# exits 0, the data steps remove what they half wrote), then the chain stops.
step_pid=""
stopping=false
stop_step() {
  stopping=true
  [[ -z "${step_pid}" ]] || kill -TERM "${step_pid}" 2>/dev/null || true
}
trap stop_step TERM INT

timings=()
run_step() {
  local name="$1" started status=0
  shift
  printf '+'; printf ' %q' "$@"; printf '\n'
  started="${EPOCHREALTIME/./}"
  "$@" &
  step_pid=$!
  wait "${step_pid}" || status=$?
  while kill -0 "${step_pid}" 2>/dev/null; do  # a signal interrupted the wait
    status=0
    wait "${step_pid}" || status=$?
  done
  step_pid=""
  if [[ "${stopping}" == true ]]; then
    echo "run-local.sh: stopped during ${name}; run the same command to resume" >&2
    exit 143
  fi
  [[ "${status}" -eq 0 ]] || exit "${status}"
  timings+=("--step-seconds=${name}=$(( (${EPOCHREALTIME/./} - started) / 1000 ))ms")
}

extract_flags=(--work-dir "${work_dir}" --dataset "${dataset}" "${overwrite[@]}" "${verbose[@]}")
[[ -z "${data_sources}" ]] || extract_flags+=(--data-sources "${data_sources}")
run_step extract python data-extractor.py "${extract_flags[@]}"
run_step preprocess python preprocess.py --work-dir "${work_dir}" "${overwrite[@]}" "${verbose[@]}"
run_step train python -m trainer.task --work-dir "${work_dir}" "${overwrite[@]}" "${verbose[@]}" \
  "${trainer_flags[@]}"
chart="${fig_dir}/${dataset}-loss.png"
run_step plot python plot.py --model-dir "${work_dir}/model" --out "${chart}" "${verbose[@]}"
python -m trainer.summary --work-dir "${work_dir}" --chart "${chart}" "${timings[@]}"
