"""Part h: the sync mode's per-step synchronization time / torch.distributed gloo's all-reduce of the same gradients.

Ours: a single-stage swarm of 2 peers in `swarm.sync_mode=sync` (every inner step averages the stage's gradients:
the first round through hivemind's matchmaking and all-reduce, the next ones over the standing group that round
formed, standing_group.py); the figure is the median of the standing-group rounds' seconds (each peer's
`sync.rounds`, completed 2-peer rounds), with the median of each phase; the hivemind rounds' median beside it. The reference: 2 processes running
gloo's all-reduce of gradients of the same shapes on loopback (scripts/benchlib/gloo_allreduce.py), as one flat
buffer and one call per parameter tensor. Both sides one torch thread per process, in the same invocation."""
from __future__ import annotations

import json
import shutil
import socket
import statistics
import time

from benchlib.common import PY, ROOT, read_summaries
from benchlib.harness import Bench
from benchlib.procs import Procs
from benchlib.tracker import Tracker

PHASES = ("prepare_s", "matchmaking_s", "allreduce_s", "waiting_s", "apply_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def part_h(bench: Bench) -> dict:
    steps = int(bench.sized(30, 16))
    deadline = time.time() + bench.sized(600, 300)
    run_dir = bench.out / "h"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    common = ["swarm.num_stages=1", "swarm.sync_mode=sync", "run.eval_interval=0"]
    bench.prepare_corpus(common)
    names = ["p0", "p1"]
    procs = Procs(run_dir)
    tracker = Tracker("bench-h", 1, bench.cfg.swarm.record_ttl, stages=())
    try:
        for i, name in enumerate(names):
            procs.start(name, bench.peer_args("bench-h", 0, name, run_dir, tracker.maddr, common,
                                              ["--max-steps", str(steps), "--data-shard", f"{i}/2"]))
        finished = procs.wait_all(names, deadline)
    finally:
        procs.close()
        tracker.close()
    summaries = read_summaries(run_dir, names)
    rounds = [r for n in names for r in summaries.get(n, {}).get("sync", {}).get("rounds", [])
              if r["group_size"] == 2 and r["ok"]]
    if len(rounds) < 4:
        raise RuntimeError(f"fewer than 4 completed 2-peer rounds (finished={finished})\n" + procs.tail("p0"))
    fast = [r for r in rounds if r["outcome"] == "averaged over the standing group"]  # no matchmaking
    matched = [r for r in rounds if r["outcome"] != "averaged over the standing group"]  # hivemind's path
    measured = fast or rounds
    ours = statistics.median(r["seconds"] for r in measured)
    phases = {k: statistics.median(r[k] or 0.0 for r in measured) for k in PHASES}

    port, gloo_dir = _free_port(), run_dir / "gloo"
    gloo_dir.mkdir()
    overrides = [*bench.overrides, *common]
    gloo = Procs(gloo_dir)
    try:
        for rank in range(2):
            args = [PY, str(ROOT / "scripts" / "benchlib" / "gloo_allreduce.py"), "--rank", str(rank), "--world", "2",
                    "--port", str(port), "--config", bench.config, "--iters", str(steps),
                    "--out", str(gloo_dir / f"rank{rank}.json")]
            for o in overrides:
                args += ["--set", o]
            gloo.start(f"rank{rank}", args)
        if not gloo.wait_all(["rank0", "rank1"], time.time() + 300):
            raise RuntimeError("the gloo all-reduce did not finish\n" + gloo.tail("rank0"))
    finally:
        gloo.close()
    res = [json.loads((gloo_dir / f"rank{r}.json").read_text()) for r in range(2)]
    flat = statistics.median(max(a, b) for a, b in zip(res[0]["flat_s"], res[1]["flat_s"]))
    per_tensor = statistics.median(max(a, b) for a, b in zip(res[0]["per_tensor_s"], res[1]["per_tensor_s"]))
    best = min(flat, per_tensor)
    return {
        "ratios": {"h.sync_vs_gloo": ours / best, "h.allreduce_vs_gloo": phases["allreduce_s"] / best},
        "figures": {"params": res[0]["params"], "rounds": len(rounds), "standing_group_rounds": len(fast),
                    "hivemind_rounds": len(matched), "ours_median_s": ours,
                    "hivemind_median_s": statistics.median(r["seconds"] for r in matched) if matched else None,
                    **{f"ours_median_{k}": v for k, v in phases.items()},
                    "gloo_flat_median_s": flat, "gloo_per_tensor_median_s": per_tensor,
                    "tokens_per_s": {n: summaries.get(n, {}).get("tokens_per_s") for n in names}},
        "definitions": {"h.sync_vs_gloo": "median seconds of a sync-mode round (gradient average of one inner step, "
                                          "2-peer single-stage swarm; its standing-group rounds where there are "
                                          "any, standing_group.py) / median seconds of gloo's all-reduce of the "
                                          "same gradients between 2 processes (the faster of flat and per-tensor); "
                                          "target <= 1.5",
                        "h.allreduce_vs_gloo": "the same with our round's all-reduce phase only (no writing of the "
                                               "gradients into the averaging buffers and back; it includes waiting "
                                               "for the groupmate to reach the round, which gloo's lock-stepped "
                                               "loop of all-reduces hardly has)"},
    }
