#!/usr/bin/env bash
# Thin dispatcher. Usage:
#   bash run.sh exp00 [key=value ...] [--data DIR] [--profile demo|none] [--restart]   train one experiment
#   bash run.sh exp07 --gpus 0,1,2,3 | --ddp N                                       folds in parallel / DDP
#   bash run.sh exp07 --ddp N --nnodes M --node-rank R --rdzv-endpoint HOST:PORT     DDP over M machines
#   bash run.sh ladder [exp01 exp02 ... | aug_* | feat*] [key=value ...]              several experiments in turn
#   bash run.sh score [exp ...] [--detail exp07]                                     ablation table from the OOFs
#   bash run.sh fewshot [--config exp00 --ways 5 --shots 1 5 10 --episodes 600]      few-shot artists, frozen features
#   bash run.sh eda [--data DIR]                                                     pictures of the data (outputs/eda)
#   bash run.sh tta exp07 [--mode hflip|flips|d4]                                    TTA run of a finished experiment
#   bash run.sh ensemble ens01                                                       vote over finished experiments
#   bash run.sh predict exp07 --data DIR [--tta hflip|flips|d4] [--out FILE]         predict from saved fold checkpoints
#   bash run.sh export exp07|ens01 [--precision auto|fp32|fp16]                      offline bundle (folder + .zip)
#   bash run.sh tune exp00 --trials 20 [--space basic --folds 0 --timeout S]         Optuna search (configs/tune/)
#   bash run.sh board [exp00 exp07 ...] [--port 6006]                                TensorBoard over outputs/*/tb
#   bash run.sh bench [--backbone NAME --img-size N --batch B]                       images/s, speed switches
#   bash run.sh gpucheck [--data DIR] [key=value ...]                                GPU acceptance run (CUDA)
#   bash run.sh test [pytest args]                                                   run the test suite
#   bash run.sh style [--rarest 11 --per-artist 5 | --published] [--size 256 ...]  style-transfer images (exp09/12/14)
#   bash run.sh demo-data [--root DIR --seed N --scale S]                            make the demo dataset
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

has_requirements() { "$1" -m src.envcheck requirements.txt >/dev/null 2>&1; }

# Use .venv, else the Python in use if it already has the pinned packages, else build .venv once.
pick_python() {
  if [ -x .venv/bin/python ] && has_requirements .venv/bin/python; then echo .venv/bin/python; return; fi
  local system_python="${PYTHON:-python3}"
  if has_requirements "$system_python"; then echo "$system_python"; return; fi
  local missing
  missing="$("$system_python" -m src.envcheck requirements.txt --verbose 2>&1)"
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

command="${1:-help}"
case "$command" in
  help|-h|--help)
    sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'
    echo "experiments: $(cd configs && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')"
    exit 0 ;;
esac

PY="$(pick_python)"
shift || true
case "$command" in
  test) exec "$PY" -m pytest -q tests "$@" ;;
  demo-data|ladder|score|tta|ensemble|predict|export|tune|board|bench|gpucheck|fewshot|eda|style) exec "$PY" -m src.cli "$command" "$@" ;;
  *)
    if [ -f "configs/$command.yaml" ]; then exec "$PY" -m src.cli run "$command" "$@"; fi
    echo "error: unknown command or experiment '$command' (see: bash run.sh help)" >&2
    exit 2 ;;
esac
