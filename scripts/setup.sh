#!/usr/bin/env bash
# Sets up swarm_peer in ./.venv: torch first (pinned, so pip never swaps in a multi-GB CUDA build), then the rest.
# Idempotent. For a CUDA machine install the matching torch build first, then run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Python >= 3.11 (pyproject.toml's requires-python, the version CI runs): refuse an older one before making .venv
need_py() {  # $1: interpreter; exits 2 with one line unless it runs and is >= 3.11
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1 && return 0
  echo "error: swarm_peer needs Python >= 3.11, $1 is $("$1" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo 'not runnable'); set PYTHON=python3.11 (or newer)${2:-}" >&2
  exit 2
}
if [ -x .venv/bin/python ]; then
  need_py .venv/bin/python " and remove .venv"
else
  need_py "$PY"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import torch, hivemind, transformers, datasets, wandb; print(f'swarm_peer ready: torch {torch.__version__}, hivemind {hivemind.__version__}, transformers {transformers.__version__}')"
