#!/usr/bin/env bash
# Every command of the repository: bash run.sh help lists them (the table lives in src/cli.py).
# This script only finds the Python that has what the command needs (src/environment.py installs what is missing;
# docs/install.md) and hands over. --wheels DIR first installs from a folder of wheels alone (offline machines).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

case "${1:-help}" in
  help|-h|--help) exec "${PYTHON:-python3}" -m src.cli help ;;  # standard library only: nothing to install
esac
wheels=""  # else $ARTIST_WHEELS, which src/environment.py reads
if [ "$1" = --wheels ]; then
  wheels="${2:?--wheels needs a folder of wheels}"
  shift 2
fi
# The Python to start from: .venv once it exists, else $PYTHON, else python3.
python="${PYTHON:-python3}"
if [ -e .venv ]; then
  python=.venv/bin/python
  if ! "$python" -c '' 2>/dev/null; then
    echo "error: .venv/bin/python does not run (made on another machine or by another Python?);" \
      "remove .venv and run again" >&2
    exit 1
  fi
elif ! command -v "$python" >/dev/null; then
  echo "error: no $python here; install Python 3 or name one: PYTHON=/path/to/python bash run.sh $*" >&2
  exit 1
fi
PY="$("$python" -m src.environment --python "$python" ${wheels:+--wheels "$wheels"} -- "$@")"
exec "$PY" -m src.cli "$@"
