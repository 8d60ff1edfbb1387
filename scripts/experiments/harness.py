"""Run one method of an experiment (the single-process baseline, or a local S-stage x P-peer swarm on loopback) and
evaluate its final model with `swarm_peer.baseline.evaluate` on the same held-out microbatches as every other method.

Processes are started and stopped by swarm_peer.launch (each in its own process group, so its hivemind DHT process
and p2pd are stopped with it); every wait is bounded; they are all stopped on success, error, Ctrl-C and SIGTERM.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # swarm_peer from the checkout, as the peers import it
from swarm_peer.launch import PYTHON, Launcher, LaunchError, peer_args  # noqa: E402
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
       "HIVEMIND_LOGLEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _tail(path: Path, n: int = 2500) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def run_baseline(out: Path, config: str, overrides: list[str], steps: int, timeout: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    args = ["-m", "swarm_peer.baseline", "--config", config, *_sets(overrides), "--max-steps", str(steps),
            "--summary-json", str(out / "summary.json"), "--save-weights", str(out / "weights.pt")]
    t0 = time.monotonic()
    procs = Launcher(out, env=ENV)
    try:
        procs.start("baseline", [PYTHON, *args])
        rc = procs.wait_exit("baseline", timeout)
    except LaunchError:
        raise RuntimeError(f"baseline still running after {timeout:.0f}s; see {out / 'baseline.log'}") from None
    finally:
        procs.close()
    if rc != 0:
        raise RuntimeError(f"baseline exited {rc}:\n{_tail(out / 'baseline.log')}")
    return _save_raw(out, {"kind": "baseline", "process_wall_s": time.monotonic() - t0})


def _save_raw(out: Path, raw: dict) -> dict:
    """What the report needs besides the files in `out` (which load_raw reads back: --reuse)."""
    (out / "raw.json").write_text(json.dumps(raw))
    return load_raw(out)


def load_raw(out: Path) -> dict:
    raw = json.loads((out / "raw.json").read_text())
    if raw["kind"] == "baseline":
        return {**raw, "summary": json.loads((out / "summary.json").read_text()), "weights": [out / "weights.pt"]}
    names = [f"stage{s}_peer{p}" for s in range(raw["stages"]) for p in range(raw["peers"])]
    return {**raw, "summaries": {n: json.loads((out / f"{n}.json").read_text()) for n in names},
            "weights": [out / f"stage{s}_peer0.pt" for s in range(raw["stages"])],
            "replica_weights": [[out / f"stage{s}_peer{p}.pt" for s in range(raw["stages"])]
                                for p in range(raw["peers"])]}


def run_swarm(out: Path, config: str, overrides: list[str], steps: int, timeout: float, stages: int = 2,
              peers: int = 2) -> dict:
    """S stages x P peers on 127.0.0.1; stage-0 peer k reads shard k/P. Stage 0 starts first and its peers wait
    for a pipeline, so they all train from the first step (a tiny run is over before a late starter is up); then the
    later stages. Waits for every peer to exit by itself (bounded by `timeout`); all must exit 0."""
    out.mkdir(parents=True, exist_ok=True)
    run_id = f"exp-{os.getpid()}-{int(time.time() * 1000) % 10**9}"
    names = [f"stage{s}_peer{p}" for s in range(stages) for p in range(peers)]
    t0 = time.monotonic()
    deadline = t0 + timeout
    procs = Launcher(out, env=ENV)
    try:
        boot = None
        for s in range(stages):
            for p in range(peers):
                n = f"stage{s}_peer{p}"
                extra = ["--data-shard", f"{p}/{peers}"] if s == 0 else []
                procs.start(n, peer_args(s, run_id, maddrs_file=out / f"{n}.maddrs", config=config,
                                         overrides=overrides, initial_peers=boot, summary_json=out / f"{n}.json",
                                         extra=["--max-steps", str(steps), "--save-weights", str(out / f"{n}.pt"),
                                                *extra]))
                if not boot:  # the first peer bootstraps the DHT: wait for its address before starting the rest
                    boot = procs.wait_file(n, out / f"{n}.maddrs", min(deadline - time.monotonic(), 120))
            for p in range(peers):
                n = f"stage{s}_peer{p}"
                procs.wait_file(n, out / f"{n}.maddrs", min(deadline - time.monotonic(), 120))
                if s == 0:  # announced in the stage (it waits for stage 1 now)
                    procs.wait_line(n, "serving layers", time.time() + min(deadline - time.monotonic(), 120))
        for n in names:
            rc = procs.wait_exit(n, max(0.1, deadline - time.monotonic()))
            if rc != 0:
                raise RuntimeError(f"{n} exited {rc}:\n{_tail(out / f'{n}.log')}")
    except (LaunchError, TimeoutError) as e:
        raise RuntimeError(f"swarm run failed: {e}") from None
    finally:
        procs.close()
    return _save_raw(out, {"kind": "swarm", "process_wall_s": time.monotonic() - t0, "peers": peers,
                           "stages": stages})


# ------------------------------------------------------------------------------------------- evaluation
def full_model(cfg, weight_files: list[Path]):
    """The unsplit model from the baseline's weights, or from one stage file per stage (blocks renumbered)."""
    from swarm_peer.model import build_stage, stage_spec

    model = build_stage(cfg, None)
    state: dict[str, torch.Tensor] = {}
    if len(weight_files) == 1:
        state = torch.load(weight_files[0], map_location="cpu")
    else:
        for s, path in enumerate(weight_files):
            start = stage_spec(cfg, s).start
            for k, v in torch.load(path, map_location="cpu").items():
                if k.startswith("blocks."):
                    _, i, rest = k.split(".", 2)
                    k = f"blocks.{start + int(i)}.{rest}"
                state[k] = v
    model.load_state_dict(state, strict=True)
    return model


def stage_file_hashes(cfg, weight_files: list[Path]) -> list[dict]:
    """Per saved stage file: `weights` as a peer computes its `final_weights_hash`, and `params` as sync.py computes
    the stage's `sync.global_hash` (DiLoCo: the global weights after the last outer round)."""
    from swarm_peer.diloco import tensors_hash
    from swarm_peer.model import build_stage, weights_hash

    hashes = []
    for s, path in enumerate(weight_files):
        m = build_stage(cfg, s)
        m.load_state_dict(torch.load(path, map_location="cpu"), strict=True)
        hashes.append({"weights": weights_hash(m), "params": tensors_hash([p.detach() for p in m.parameters()])})
    return hashes


_CORPORA: dict = {}


def final_eval(cfg, weight_files: list[Path]) -> float:
    """Mean loss of the final model over `run.eval_batches` fixed held-out microbatches (baseline.evaluate)."""
    from swarm_peer.baseline import evaluate
    from swarm_peer.data import load_corpus

    key = (cfg.data.model_dump_json(), cfg.model.vocab_size)
    if key not in _CORPORA:
        _CORPORA[key] = load_corpus(cfg)
    loss = evaluate(full_model(cfg, weight_files), _CORPORA[key], cfg, torch.device("cpu"))
    if not math.isfinite(loss):
        raise RuntimeError(f"final validation loss is {loss}")
    return loss
