#!/usr/bin/env bash
# Every command of the repository: bash run.sh help lists them (the table lives in src/cli.py).
# This script only finds a Python with the pinned packages (building .venv on first use) and hands over.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

has_requirements() { "$1" -m src.core.envcheck requirements.txt >/dev/null 2>&1; }

# Use .venv, else the Python in use if it already has the pinned packages, else build .venv once.
pick_python() {
  if [ -x .venv/bin/python ] && has_requirements .venv/bin/python; then echo .venv/bin/python; return; fi
  local system_python="${PYTHON:-python3}"
  if has_requirements "$system_python"; then echo "$system_python"; return; fi
  local missing
  missing="$("$system_python" -m src.core.envcheck requirements.txt --verbose 2>&1)"
  echo "Setting up .venv: $system_python lacks the pinned packages (${missing:0:300})." >&2
  echo "Creating .venv and installing requirements.txt into it (one time, a few minutes; log in .venv/install.log)." >&2
  "$system_python" -m venv .venv
  if ! .venv/bin/python -m pip install --disable-pip-version-check -r requirements.txt >.venv/install.log 2>&1; then
    grep -v '^WARNING: Location' .venv/install.log | tail -n 20 >&2
    echo "error: installing requirements.txt into .venv failed (full log: .venv/install.log)" >&2
    exit 1
  fi
  echo "Installed the pinned requirements into .venv." >&2
  echo .venv/bin/python
}

case "${1:-help}" in
  help|-h|--help) exec "${PYTHON:-python3}" -m src.cli help ;;  # standard library only: nothing to install
esac
PY="$(pick_python)"
exec "$PY" -m src.cli "$@"
