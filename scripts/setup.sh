#!/usr/bin/env bash
# Sets up swarm_peer in ./.venv: torch first (pinned, so pip never swaps in a multi-GB CUDA build), then the rest.
# Idempotent. For a CUDA machine install the matching torch build first, then run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import torch, hivemind, transformers, datasets, wandb; print(f'swarm_peer ready: torch {torch.__version__}, hivemind {hivemind.__version__}, transformers {transformers.__version__}')"
