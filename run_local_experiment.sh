#!/usr/bin/env bash
# Spawn a whole swarm on this machine: S stages x P peers on loopback, one merged log, summaries under runs/<id>/.
#
#   ./run_local_experiment.sh [-s STAGES] [-p PEERS_PER_STAGE] [-c CONFIG] [--run-id ID] [--max-steps N]
#                             [--timeout SECONDS] [--wandb-project P] [--no-monitor] [--private]
#                             [-- extra args for every peer]
#   ./run_local_experiment.sh stop [RUN_ID]          # stop a running experiment (default: the latest)
#
# A monitor peer starts first (the swarm's bootstrap) and logs the global loss to W&B (offline without an API key,
# files under runs/<id>/wandb). --private: a new swarm key in runs/<id>/swarm.key for every process. Env defaults: N_STAGES, PEERS_PER_STAGE, CONFIG, WANDB_PROJECT. Exits non-zero if
# any peer failed.
set -uo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

die() { echo "run_local_experiment: $*" >&2; exit 2; }

stop_run() {  # stop_run DIR: TERM every peer's process group, then KILL what is left
  local dir=$1 pid
  [ -f "$dir/pids" ] || return 0
  while read -r pid _; do kill -TERM -- "-$pid" 2>/dev/null; done < "$dir/pids"
  for _ in $(seq 50); do
    local alive=0
    while read -r pid _; do kill -0 "$pid" 2>/dev/null && alive=1; done < "$dir/pids"
    [ $alive = 0 ] && break
    sleep 0.2
  done
  while read -r pid _; do kill -KILL -- "-$pid" 2>/dev/null; done < "$dir/pids"
  return 0
}

if [ "${1:-}" = "stop" ]; then
  id=${2:-$(ls -t runs 2>/dev/null | head -1)}
  [ -n "$id" ] && [ -d "runs/$id" ] || die "no run to stop${2:+ named $2}"
  if [ -f "runs/$id/runner.pid" ] && kill -0 "$(cat "runs/$id/runner.pid")" 2>/dev/null; then
    kill -TERM "$(cat "runs/$id/runner.pid")"
    for _ in $(seq 100); do kill -0 "$(cat "runs/$id/runner.pid")" 2>/dev/null || break; sleep 0.2; done
  fi
  stop_run "runs/$id"
  echo "stopped run $id"
  exit 0
fi

STAGES=${N_STAGES:-2}; PEERS=${PEERS_PER_STAGE:-2}; CFG=${CONFIG:-configs/tiny.yaml}
RUN_ID="local-$(date +%Y%m%d-%H%M%S)"; MAX_STEPS=""; TIMEOUT=3600; EXTRA=(); MONITOR=1; PRIVATE=0
WANDB_PROJECT=${WANDB_PROJECT:-swarm_peer}
while [ $# -gt 0 ]; do
  case "$1" in
    -s|--stages) STAGES=${2:?}; shift 2 ;;
    -p|--peers-per-stage) PEERS=${2:?}; shift 2 ;;
    -c|--config) CFG=${2:?}; shift 2 ;;
    --run-id) RUN_ID=${2:?}; shift 2 ;;
    --max-steps) MAX_STEPS=${2:?}; shift 2 ;;
    --timeout) TIMEOUT=${2:?}; shift 2 ;;
    --wandb-project) WANDB_PROJECT=${2:?}; shift 2 ;;
    --no-monitor) MONITOR=0; shift ;;
    --private) PRIVATE=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ $STAGES =~ ^[1-9][0-9]*$ ]] || die "--stages must be a positive integer"
[[ $STAGES -ge 2 ]] || die "--stages must be at least 2 (use python -m swarm_peer.baseline for one process)"
[[ $PEERS =~ ^[1-9][0-9]*$ ]] || die "--peers-per-stage must be a positive integer"
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout must be seconds"
[ -f "$CFG" ] || die "config $CFG not found"
[[ $RUN_ID =~ ^[A-Za-z0-9][A-Za-z0-9-]*$ ]] || die "--run-id: use letters, digits and '-'"

DIR="runs/$RUN_ID"
[ -e "$DIR" ] && die "$DIR already exists; pick another --run-id"
mkdir -p "$DIR"
echo $$ > "$DIR/runner.pid"
: > "$DIR/pids"
TAILS=()
COMMON=(--config "$CFG" --run-id "$RUN_ID" --host-maddrs /ip4/127.0.0.1/tcp/0 --set "swarm.num_stages=$STAGES"
        --set run.threads=1)
KEY=()
if [ $PRIVATE = 1 ]; then
  "$PY" -m swarm_peer keygen "$DIR/swarm.key" > /dev/null || die "could not write $DIR/swarm.key"
  KEY=(--swarm-key-file "$DIR/swarm.key"); COMMON+=("${KEY[@]}")
fi
[ -n "$MAX_STEPS" ] && COMMON+=(--max-steps "$MAX_STEPS")

cleanup() {
  stop_run "$DIR"
  for t in "${TAILS[@]}"; do kill "$t" 2>/dev/null; done
}
on_signal() { echo "run_local_experiment: stopping $RUN_ID"; cleanup; exit 130; }
trap on_signal INT TERM

start_peer() {  # start_peer STAGE INDEX [args...]: own session/process group, so stop_run reaches its children
  local stage=$1 idx=$2; shift 2
  local name="stage${stage}_peer${idx}"
  setsid "$PY" -m swarm_peer --stage "$stage" "${COMMON[@]}" --maddrs-file "$DIR/$name.maddrs" \
      --summary-json "$DIR/$name.json" "$@" "${EXTRA[@]}" > "$DIR/$name.log" 2>&1 < /dev/null &
  echo "$! $name" >> "$DIR/pids"
  tail -n +1 -F "$DIR/$name.log" 2>/dev/null | sed -u "s|^|[stage${stage}/peer${idx}] |" &
  TAILS+=($!)
}

wait_ready() {  # wait_ready NAME: poll for the peer's maddrs file (or its death)
  local name=$1 pid
  pid=$(awk -v n="$name" '$2 == n {print $1}' "$DIR/pids")
  for _ in $(seq 600); do
    [ -s "$DIR/$name.maddrs" ] && return 0
    kill -0 "$pid" 2>/dev/null || { echo "run_local_experiment: $name died at startup (see $DIR/$name.log)"; return 1; }
    sleep 0.1
  done
  echo "run_local_experiment: $name not ready after 60 s"; return 1
}

echo "run $RUN_ID: $STAGES stages x $PEERS peers, config $CFG, logs in $DIR/"
if [ $MONITOR = 1 ]; then  # the monitor bootstraps the DHT and logs the global loss to W&B
  SETS=(); for ((i = 0; i < ${#EXTRA[@]}; i++)); do
    [ "${EXTRA[$i]}" = "--set" ] && SETS+=(--set "${EXTRA[$((i + 1))]}"); done
  setsid "$PY" -m swarm_peer monitor --config "$CFG" --run-id "$RUN_ID" --host-maddrs /ip4/127.0.0.1/tcp/0 \
      --set "swarm.num_stages=$STAGES" "${SETS[@]}" "${KEY[@]}" --maddrs-file "$DIR/monitor.maddrs" --until-done \
      --wandb-project "$WANDB_PROJECT" --wandb-dir "$DIR" --history-json "$DIR/monitor.jsonl" \
      > "$DIR/monitor.log" 2>&1 < /dev/null &
  echo "$! monitor" >> "$DIR/pids"
  tail -n +1 -F "$DIR/monitor.log" 2>/dev/null | sed -u "/^\[monitor\]/!s|^|[monitor] |" &
  TAILS+=($!)
  wait_ready monitor || { cleanup; exit 1; }
  BOOT=$(head -1 "$DIR/monitor.maddrs")
else  # the last stage's first peer bootstraps the DHT
  start_peer $((STAGES - 1)) 0
  wait_ready "stage$((STAGES - 1))_peer0" || { cleanup; exit 1; }
  BOOT=$(head -1 "$DIR/stage$((STAGES - 1))_peer0.maddrs")
fi
echo "$BOOT" > "$DIR/bootstrap.maddr"
# later stages start first so stage 0 finds a pipeline
for ((s = STAGES - 1; s >= 0; s--)); do
  for ((p = 0; p < PEERS; p++)); do
    [ $MONITOR = 0 ] && [ $s = $((STAGES - 1)) ] && [ $p = 0 ] && continue
    shard=(); [ $s = 0 ] && shard=(--data-shard "$p/$PEERS")
    start_peer $s $p --initial-peers "$BOOT" "${shard[@]}"
  done
  for ((p = 0; p < PEERS; p++)); do wait_ready "stage${s}_peer${p}" || { cleanup; exit 1; }; done
done
echo "run $RUN_ID: all $((STAGES * PEERS)) peers up"

# wait for every peer to exit by itself (bounded by --timeout)
FAILED=0; deadline=$((SECONDS + TIMEOUT))
declare -A DONE=()
while :; do
  alive=0
  while read -r pid name; do
    [ -n "${DONE[$name]:-}" ] && continue
    if kill -0 "$pid" 2>/dev/null && ! grep -q '^State:\s*Z' "/proc/$pid/status" 2>/dev/null; then
      alive=1
    else
      wait "$pid"; rc=$?; DONE[$name]=$rc
      [ $rc = 0 ] || { FAILED=1; echo "run_local_experiment: $name exited with $rc (see $DIR/$name.log)"; }
    fi
  done < "$DIR/pids"
  [ $alive = 0 ] && break
  if [ $SECONDS -ge $deadline ]; then echo "run_local_experiment: timeout after $TIMEOUT s"; FAILED=1; break; fi
  sleep 0.5
done
cleanup
"$PY" - "$DIR" <<'EOF'
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "stage*_peer*.json"))):
    s = json.load(open(path))
    loss = f"{s['loss_curve'][-1][1]:.4f}" if s["loss_curve"] else "-"
    sync = s.get("sync", {})
    rows.append(f"{os.path.basename(path)[:-5]:<16} steps {s['inner_steps']:>5}  samples {s['samples']:>7}  "
                f"tok/s {s['tokens_per_s']:>8,.0f}  last loss {loss:>7}  retries {s['retries']}  "
                f"{sync.get('mode', '-')} rounds {len(sync.get('rounds', []))}  global {sync.get('global_hash', '-')}")
print("\n".join(rows) if rows else "no peer summaries written")
EOF
echo "run $RUN_ID finished; summaries in $DIR/"
exit $FAILED
