#!/usr/bin/env bash
# The whole workflow on this machine: stage MovieLens ratings, preprocess them
# with Beam + TFT (in-process runner), train and export the model, chart the loss.
#
#   ./run-local.sh [--work-dir DIR] [--dataset NAME] [--data-sources PATH_OR_URL]
#                  [--fig-dir DIR] [--overwrite] [-- TRAINER_FLAGS...]
#
# Sets up .venv (Python 3.11, pinned packages) on first use.
set -euo pipefail
cd "$(dirname "$0")"

readonly DATASETS="ml-100k ml-1m ml-10m ml-20m ml-25m ml-latest-small synthetic"

usage() {
  cat <<USAGE
usage: ./run-local.sh [--work-dir DIR] [--dataset NAME] [--data-sources PATH_OR_URL]
                      [--fig-dir DIR] [--overwrite] [-- TRAINER_FLAGS...]
  --work-dir DIR        where every step reads and writes (default: workdir, ignored by git)
  --dataset NAME        one of: ${DATASETS} (default: ml-100k)
  --data-sources PATH   a GroupLens-layout zip (path, file:// or http(s) URL) instead of the download
  --fig-dir DIR         where the loss chart goes (default: fig)
  --overwrite           redo every step, replacing earlier outputs in the work dir
  -- FLAGS              passed to python -m trainer.task (e.g. -- --num-epochs 30)
USAGE
}

die() { echo "run-local.sh: error: $*" >&2; exit 2; }

work_dir="workdir"
dataset="ml-100k"
data_sources=""
fig_dir="fig"
overwrite=()
trainer_flags=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --work-dir) [[ $# -ge 2 && -n "$2" ]] || die "--work-dir needs a directory, e.g. --work-dir workdir"; work_dir="$2"; shift 2 ;;
    --work-dir=*) work_dir="${1#*=}"; shift ;;
    --dataset) [[ $# -ge 2 ]] || die "--dataset needs a name: one of ${DATASETS}"; dataset="$2"; shift 2 ;;
    --dataset=*) dataset="${1#*=}"; shift ;;
    --data-sources) [[ $# -ge 2 && -n "$2" ]] || die "--data-sources needs a zip path or URL"; data_sources="$2"; shift 2 ;;
    --data-sources=*) data_sources="${1#*=}"; shift ;;
    --fig-dir) [[ $# -ge 2 && -n "$2" ]] || die "--fig-dir needs a directory, e.g. --fig-dir fig"; fig_dir="$2"; shift 2 ;;
    --fig-dir=*) fig_dir="${1#*=}"; shift ;;
    --overwrite) overwrite=(--overwrite); shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; trainer_flags=("$@"); break ;;
    *) die "unknown flag '$1'; see ./run-local.sh --help (trainer flags go after --)" ;;
  esac
done
[[ -n "${work_dir}" ]] || die "--work-dir is empty; pass a directory such as workdir"
[[ " ${DATASETS} " == *" ${dataset} "* ]] || die "--dataset '${dataset}' is unknown; use one of: ${DATASETS}"

# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_venv

timings=()
run_step() {
  local name="$1" started
  shift
  printf '+'; printf ' %q' "$@"; printf '\n'
  started="${EPOCHREALTIME/./}"
  "$@"
  timings+=("--step-seconds=${name}=$(( (${EPOCHREALTIME/./} - started) / 1000 ))ms")
}

extract_flags=(--work-dir "${work_dir}" --dataset "${dataset}" "${overwrite[@]}")
[[ -z "${data_sources}" ]] || extract_flags+=(--data-sources "${data_sources}")
run_step extract python data-extractor.py "${extract_flags[@]}"
run_step preprocess python preprocess.py --work-dir "${work_dir}" "${overwrite[@]}"
run_step train python -m trainer.task --work-dir "${work_dir}" "${overwrite[@]}" "${trainer_flags[@]}"
chart="${fig_dir}/${dataset}-loss.png"
run_step plot python plot.py --model-dir "${work_dir}/model" --out "${chart}"
python -m trainer.summary --work-dir "${work_dir}" --chart "${chart}" "${timings[@]}"
