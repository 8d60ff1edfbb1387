"""Parts a and b: how fast the pipeline moves data.

  a  swarm tokens/s (S stages x 1 peer) / the single-process baseline's, steady state and end to end
  b  activation hops/s through call_forward (per codec) / a raw loopback TCP echo of the same tensor
"""
from __future__ import annotations

import shutil
import time

from benchlib.harness import Bench


def part_a(bench: Bench) -> dict:
    S = bench.args.stages
    steps = int(bench.sized(30, 24))
    deadline = time.time() + bench.sized(420, 180)
    run_dir = bench.out / "a"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    common = [f"swarm.num_stages={S}", "run.eval_interval=0"]  # eval only at the end (both sides)
    bench.prepare_corpus(common)
    seq = bench.cfg.data.seq_len
    series, summaries, killed, procs = bench.swarm_line("a", S, steps, common, deadline)
    # steady state: stage-0 samples between its first records at >= 20 % and >= 90 % of the steps
    (s0,) = series.values()
    lo = next(e for e in s0 if e[1] >= 0.2 * steps)
    hi = next(e for e in s0 if e[1] >= 0.9 * steps)
    swarm = {"tokens_per_s": (hi[2] - lo[2]) * seq / (hi[0] - lo[0]),
             "cpu_s": procs.cpu_between(list(procs.procs), lo[0], hi[0]), "tokens": (hi[2] - lo[2]) * seq,
             "seconds": hi[0] - lo[0]}
    swarm["tokens_per_cpu_s"] = swarm["tokens"] / swarm["cpu_s"]
    swarm["cores"] = swarm["cpu_s"] / swarm["seconds"]
    swarm_e2e = summaries["s0p0"]["tokens_per_s"]

    # the baseline: same config, model, batch; S torch threads in one process (and 1 thread, for reference)
    base_steps = steps if not bench.tiny else 4 * steps  # tiny: long enough to time
    base = {threads: bench.run_baseline(run_dir, base_steps, common, threads, deadline) for threads in (S, 1)}
    b = base[S]
    return {
        "ratios": {"a.steady": swarm["tokens_per_s"] / b["tokens_per_s"],
                   "a.end_to_end": swarm_e2e / b["end_to_end"],
                   "a.steady_vs_1_thread": swarm["tokens_per_s"] / base[1]["tokens_per_s"],
                   "a.tokens_per_cpu_s": swarm["tokens_per_cpu_s"] / b["tokens_per_cpu_s"]},
        "figures": {"stages": S, "steps": steps, "baseline_steps": base_steps, "swarm_steady": swarm,
                    "baseline_steady": b, "baseline_1_thread_steady": base[1],
                    "swarm_end_to_end_tokens_per_s": swarm_e2e, "baseline_end_to_end_tokens_per_s": b["end_to_end"],
                    "swarm_wall_s": summaries["s0p0"]["wall_time_s"], "baseline_wall_s": b["wall_s"],
                    "leftover_pids_killed": killed},
        "definitions": {
            "a.steady": f"swarm tokens/s ({S} stages x 1 peer, run.threads=1 each, DiLoCo lone outer steps every "
                        f"H) / baseline tokens/s (python -m swarm_peer.baseline, run.threads={S}, "
                        f"OMP_WAIT_POLICY=PASSIVE), same config, eval only at the end; steady state: swarm "
                        f"stage-0 samples x seq_len between its stage records at >=20% and >=90% of its {steps} "
                        f"steps; baseline: between its log lines at >=20% and >=90% of its {base_steps} steps",
            "a.end_to_end": "summary tokens_per_s of the stage-0 peer (all its steps / its wall time from the "
                            "pipeline start, incl. the first hops) / baseline summary tokens_per_s (training "
                            "loop wall time)",
            "a.steady_vs_1_thread": "a.steady's numerator / the baseline with run.threads=1 (what one peer gets)",
            "a.tokens_per_cpu_s": "steady tokens per CPU second, swarm / baseline (run.threads=S): CPU seconds of "
                                  "every process of every peer (main, DHT, averager, p2pd) or of the baseline "
                                  "over the same steady windows, from /proc every 0.25 s. Unlike tokens/s, this "
                                  "does not depend on how many cores each side got from a shared machine"},
    }


def part_b(bench: Bench) -> dict:
    codecs = ("none", "fp16", "8bit")
    hop = bench.run_hop_bench(",".join(codecs), bench.sized(3.0, 1.0), bench.sized(8, 2))
    p2p = {r["codec"]: r for r in hop["rows"] if r["case"] == "call_forward"}
    lane = {r["codec"]: r for r in hop["rows"] if r["case"] == "call_forward lane"}
    tcp = next(r for r in hop["rows"] if r["case"] == "raw TCP")
    paths = {"": lane, "p2p.": p2p}  # b.none: over the direct lane (what peers use); b.p2p.none: through p2pd
    via = {"": "over the direct TCP lane", "p2p.": "through hivemind P2P"}
    return {
        "ratios": {f"b.{path}{c}": rows[c]["tensors_per_s"] / tcp["tensors_per_s"]
                   for path, rows in paths.items() for c in codecs},
        "figures": {"shape": tcp["shape"], "raw_tcp_tensors_per_s": tcp["tensors_per_s"],
                    **{f"{path}{c}_tensors_per_s": rows[c]["tensors_per_s"]
                       for path, rows in paths.items() for c in codecs},
                    **{f"{path}{c}_p50_ms": rows[c]["p50_ms"] for path, rows in paths.items() for c in codecs},
                    "raw_tcp_p50_ms": tcp["p50_ms"], "chunk_bytes": hop["chunk_bytes"],
                    "tcp_bulk": hop.get("tcp_bulk")},
        "rows": hop["rows"],
        "definitions": {f"b.{path}{c}": f"activation hops/s through call_forward ({via[path]}; one {tcp['shape']} "
                                        f"fp32 tensor out, a same-shaped one back, forward/backward codec {c}, one "
                                        f"call in flight, server in another process) / hops/s of a raw loopback "
                                        f"TCP echo of the same tensor as fp32 bytes" for path in paths for c in codecs},
    }
