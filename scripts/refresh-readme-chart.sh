#!/usr/bin/env bash
# Refreshes the charts the README shows (fig/synthetic-loss.png and
# fig/synthetic-loss-eval.png), on purpose: runs the README's quick start,
# ./run-local.sh --dataset synthetic, afresh in its own work dir, then copies
# that run's charts into fig/.  Nothing else writes to fig/.
#
#   scripts/refresh-readme-chart.sh [--work-dir DIR]
#
# --work-dir defaults to workdir-readme-chart (ignored by git); it is redone
# with --overwrite each time.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "refresh-readme-chart.sh: error: $*" >&2; exit 2; }

work_dir="workdir-readme-chart"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --work-dir) [[ $# -ge 2 && -n "$2" ]] || die "--work-dir needs a directory"
                work_dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown flag '$1'; see scripts/refresh-readme-chart.sh --help" ;;
  esac
done

dataset=synthetic
run() { printf '+'; printf ' %q' "$@"; printf '\n'; "$@"; }
run ./run-local.sh --dataset "${dataset}" --work-dir "${work_dir}" --overwrite
for chart in "${dataset}-loss.png" "${dataset}-loss-eval.png"; do
  run cp "${work_dir}/fig/${chart}" "fig/${chart}"
done
echo "== refreshed fig/${dataset}-loss.png and fig/${dataset}-loss-eval.png; review and commit them"
