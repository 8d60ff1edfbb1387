#!/usr/bin/env bash
# Spawn a whole swarm on this machine: S stages x P peers on loopback plus a monitor peer, one merged console,
# logs and summaries under runs/<id>/ (swarm_peer/local.py; --help for the options).
#
#   ./run_local_experiment.sh [-s STAGES] [-p PEERS_PER_STAGE] [-c CONFIG] [--run-id ID] [--max-steps N]
#                             [--timeout SECONDS] [--wandb-project P] [--no-monitor] [--private] [--checkpoints]
#                             [-- extra args for every peer]
#   ./run_local_experiment.sh stop [RUN_ID]          # stop a running experiment (default: the latest)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
exec "$PY" -m swarm_peer.local "$@"
