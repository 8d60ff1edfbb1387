"""What every benchmark script shares: paths, the config overrides of tiny runs and of every peer, the environment of
the processes started, the peer command line, and reading what peers leave behind (summaries, progress lines)."""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # swarm_peer is imported from the checkout, as the peers do
PY = sys.executable

# --tiny: a small fast model (the test suite's FAST settings) and short phases
TINY_OVERRIDES = ["model.hidden_size=64", "model.num_heads=4", "model.num_layers=4", "model.max_position_embeddings=64",
                  "data.seq_len=32", "data.batch_size=8", "data.microbatch_size=2", "data.max_tokens=200000",
                  "optim.inner.warmup_steps=2", "swarm.record_ttl=6", "swarm.matchmaking_time=2",
                  "swarm.averaging_timeout=30", "swarm.averaging_chunk_timeout=5"]
# every swarm run: fresher stage records (the timeline of part e/a is read from them), console peers
ANNOUNCE_PERIOD = 0.5
PEER_OVERRIDES = [f"swarm.announce_period={ANNOUNCE_PERIOD}", "run.threads=1"]

ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "HIVEMIND_LOGLEVEL": "WARNING",
       "GOLOG_LOG_LEVEL": "error", "PYTHONUNBUFFERED": "1"}


class PartTimeout(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[bench] {time.strftime('%H:%M:%S')} {message}", flush=True)


def peer_command(config: str, run_id: str, stage: int, name: str, run_dir: Path, overrides, bootstrap: str | None,
                 extra=(), host: str = "127.0.0.1") -> list[str]:
    """`python -m swarm_peer` for peer `name`: it writes its addresses and summary to run_dir/name.{maddrs,json}."""
    args = [PY, "-m", "swarm_peer", "--config", config, "--stage", str(stage), "--run-id", run_id,
            "--host-maddrs", f"/ip4/{host}/tcp/0", "--maddrs-file", str(run_dir / f"{name}.maddrs"),
            "--summary-json", str(run_dir / f"{name}.json")]
    for o in overrides:
        args += ["--set", o]
    if bootstrap:
        args += ["--initial-peers", bootstrap]
    return args + list(extra)


def read_summaries(run_dir: Path, names) -> dict[str, dict]:
    """name -> summary, for the peers that wrote one (a peer writes it on exit, also on SIGTERM)."""
    out = {}
    for n in names:
        f = run_dir / f"{n}.json"
        if f.exists():
            out[n] = json.loads(f.read_text())
    return out


def progress_steps(lines: list[tuple[float, str]], pattern: str) -> list[tuple[float, int]]:
    """(arrival time, step) of every time-stamped line matching `pattern`, whose group 1 is the step."""
    rx = re.compile(pattern)
    return [(t, int(m.group(1))) for t, line in lines for m in [rx.search(line)] if m]
