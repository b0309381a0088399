#!/usr/bin/env bash
# Sets up .venv (Python 3.11, pinned packages) when needed, then runs the test
# suite.  Extra arguments go to pytest, e.g. ./run-tests.sh -k preprocess
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_venv
printf '+ python -m pytest'; printf ' %q' "$@"; printf '\n'
exec python -m pytest "$@"
