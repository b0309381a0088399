# Sourced by run-local.sh, run-tests.sh and run-cloud.sh: makes .venv when it is
# missing and installs the pinned packages when the pins changed since the last
# install, printing one line per stage; pip's own output goes to
# .venv/install.log, whose end is shown when pip fails.  Set PYTHON to choose the
# interpreter (default python3.11).

ensure_venv() {
  local repo venv python stamp want log
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="${repo}/.venv"
  python="${PYTHON:-python3.11}"
  if [[ ! -x "${venv}/bin/python" ]]; then
    if ! command -v "${python}" >/dev/null 2>&1; then
      echo "error: ${python} not found; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2
      return 1
    fi
    if ! "${python}" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      echo "error: ${python} is not Python 3.11 (the pinned TensorFlow/TFT/Beam stack needs it); set PYTHON=/path/to/python3.11" >&2
      return 1
    fi
    echo "== creating .venv with ${python}"
    "${python}" -m venv "${venv}"
  fi
  stamp="${venv}/.installed"
  log="${venv}/install.log"
  want="$(cat "${repo}/requirements.txt" "${repo}/requirements-dev.txt" "${repo}/constraints.txt" | sha256sum | cut -d' ' -f1)"
  if [[ ! -f "${stamp}" || "$(cat "${stamp}")" != "${want}" ]]; then
    echo "== installing the pinned packages into .venv (a few minutes the first time; log: .venv/install.log)"
    if ! "${venv}/bin/python" -m pip install --disable-pip-version-check \
        -r "${repo}/requirements.txt" -r "${repo}/requirements-dev.txt" -c "${repo}/constraints.txt" \
        > "${log}" 2>&1; then
      echo "error: pip install failed; the end of its log:" >&2
      tail -n 15 "${log}" >&2
      echo "error: full log: ${log}" >&2
      return 1
    fi
    echo "${want}" > "${stamp}"
    echo "== .venv ready"
  fi
  export PATH="${venv}/bin:${PATH}"
}
