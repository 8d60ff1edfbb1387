"""Part f: peak RSS per peer / the bytes training must hold (parameters, gradients, optimizer states, averaging
buffers, in-flight activations), over every peer of this invocation's swarm runs."""
from __future__ import annotations

import statistics
import time

from benchlib.harness import Bench

STATE_KEYS = ("params_bytes", "grads_bytes", "inner_optimizer_bytes", "outer_state_bytes", "averaging_buffers_bytes",
              "inflight_activation_bytes")


def part_f(bench: Bench) -> dict:
    if not bench.summaries:  # no swarm ran yet: a short 2-stage x 1-peer one
        bench.swarm_line("f", 2, int(bench.sized(30, 12)), ["swarm.num_stages=2", "run.eval_interval=0"],
                         time.time() + bench.sized(300, 150))
    rows = []
    for run, peers in bench.summaries.items():
        for name, s in peers.items():
            m = s.get("memory")
            if not m:
                continue
            state = sum(m[k] for k in STATE_KEYS)
            rows.append({"run": run, "peer": name, "stage": s["stage"], "mode": s["sync"]["mode"],
                         "peak_rss_bytes": m["peak_rss_bytes"], "state_bytes": state, **m,
                         "ratio": m["peak_rss_bytes"] / state})
    if not rows:
        raise RuntimeError("no peer summary with a memory section")
    ratios = [r["ratio"] for r in rows]
    return {"ratios": {"f.median": statistics.median(ratios), "f.max": max(ratios)},
            "rows": rows,
            "figures": {"peers": len(rows),
                        "median_peak_rss_mib": statistics.median(r["peak_rss_bytes"] for r in rows) / 2**20,
                        "median_state_mib": statistics.median(r["state_bytes"] for r in rows) / 2**20},
            "definitions": {
                "f.median": "peak RSS of a peer's main process (ru_maxrss; its DHT/averager child processes and "
                            "p2pd not included) / bytes training must hold: parameters + gradients + inner AdamW "
                            "state + DiLoCo global copy and momentum + averaging buffers + boundary activations "
                            "of max_inflight microbatches (the summary's memory section); median over every peer "
                            "of this invocation's swarm runs",
                "f.max": "the same, the largest over those peers"}}
