"""Part c: bytes sent per stage peer per DiLoCo outer round (averaging fp32/fp16/8bit) / what a per-step fp32
gradient all-reduce sends over the same inner steps, both measured in one 4-stage x 2-peer swarm whose stages run
diloco-fp32, diloco-fp16, diloco-8bit and sync-fp32 (stages synchronize independently, so one run compares all)."""
from __future__ import annotations

import shutil
import time

from benchlib.common import read_summaries
from benchlib.harness import Bench
from benchlib.procs import Procs
from benchlib.tracker import Tracker

STAGE_SYNC = [("diloco", "fp32"), ("diloco", "fp16"), ("diloco", "8bit"), ("sync", "fp32")]  # (mode, codec) per stage


def part_c(bench: Bench) -> dict:
    S = len(STAGE_SYNC)
    if bench.cfg.model.num_layers < S:
        raise RuntimeError(f"part c needs a model with >= {S} layers")
    H = int(bench.sized(6, 4))
    steps = int(bench.sized(24, 12))
    deadline = time.time() + bench.sized(480, 240)
    run_dir = bench.out / "c"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    common = [f"swarm.num_stages={S}", f"swarm.sync_every={H}", "run.eval_interval=0"]
    bench.prepare_corpus(common)
    procs = Procs(run_dir)
    tracker = Tracker("bench-c", S, bench.cfg.swarm.record_ttl, stages=())  # the bootstrap node only
    names = [f"s{s}p{p}" for s in reversed(range(S)) for p in range(2)]
    try:
        for s in reversed(range(S)):
            mode, codec = STAGE_SYNC[s]
            for p in range(2):
                extra = ["--max-steps", str(steps)] + (["--data-shard", f"{p}/2"] if s == 0 else [])
                procs.start(f"s{s}p{p}", bench.peer_args(
                    "bench-c", s, f"s{s}p{p}", run_dir, tracker.maddr,
                    [*common, f"swarm.sync_mode={mode}", f"swarm.compression.averaging={codec}"], extra))
        finished = procs.wait_all(names, deadline)
    finally:
        killed = procs.close()  # SIGTERM first: a peer still in its final rounds writes its summary
        tracker.close()
    summaries = read_summaries(run_dir, names)
    bench.summaries["c"] = summaries
    from swarm_peer.config import load_config
    from swarm_peer.model import build_stage

    cfg = load_config(bench.config, [*bench.overrides, *common])
    params = {s: sum(p.numel() for p in build_stage(cfg, s).parameters()) for s in range(S)}
    bs = bench.cfg.data.batch_size
    per_stage = {}
    for s in range(S):
        mode, codec = STAGE_SYNC[s]
        rounds = [r for p in range(2) for r in summaries.get(f"s{s}p{p}", {}).get("sync", {}).get("rounds", [])
                  if r["group_size"] == 2 and r["ok"] and r["bytes_sent"] > 0]
        if not rounds:
            raise RuntimeError(f"stage {s} ({mode} {codec}): no completed 2-peer round "
                               f"(finished={finished})\n" + procs.tail(f"s{s}p0"))
        sent = sum(r["bytes_sent"] for r in rounds)
        steps_in = sum(r["samples"] for r in rounds) / bs  # inner steps (batch_size samples each) merged
        per_stage[s] = {"mode": mode, "codec": codec, "params": params[s], "rounds": len(rounds),
                        "bytes_sent_per_round": sent / len(rounds), "inner_steps_per_round": steps_in / len(rounds),
                        "bytes_sent_per_inner_step": sent / max(steps_in, 1e-9),
                        "formula_fp32_allreduce_bytes_per_step": 2 * (2 - 1) / 2 * 4 * params[s]}
    sync_stage = next(s for s in range(S) if STAGE_SYNC[s][0] == "sync")
    sync = per_stage[sync_stage]
    sync_bytes_per_param_step = sync["bytes_sent_per_round"] / params[sync_stage]  # 1 round = 1 step in sync
    ratios, defs = {}, {}
    for s in range(S):
        if s == sync_stage:
            continue
        st = per_stage[s]
        allreduce = sync_bytes_per_param_step * params[s] * st["inner_steps_per_round"]
        st["measured_fp32_allreduce_bytes_same_steps"] = allreduce
        ratios[f"c.{st['codec']}"] = st["bytes_sent_per_round"] / allreduce
        st["ratio_vs_formula"] = st["bytes_sent_per_round"] / (
            st["formula_fp32_allreduce_bytes_per_step"] * st["inner_steps_per_round"])
        defs[f"c.{st['codec']}"] = (
            f"bytes sent (all-reduce tensor payload) per peer per DiLoCo round (averaging {st['codec']}, "
            f"stage {s}, "
            f"{st['inner_steps_per_round']:.1f} inner steps per peer per round on average, H={H}) / bytes a "
            f"per-step fp32 gradient all-reduce sends over the same steps, measured in the same run: the "
            f"sync-fp32 stage's bytes per peer per step, scaled by parameter count ({params[sync_stage]:,} -> "
            f"{params[s]:,}) x inner steps")
    formula = sync["formula_fp32_allreduce_bytes_per_step"]
    ratios["c.sync_measured_vs_formula"] = sync["bytes_sent_per_round"] / formula
    defs["c.sync_measured_vs_formula"] = (
        "measured bytes per peer per step of the sync-fp32 stage / the formula 2(n-1)/n x 4 bytes x params "
        "(n = 2): a check of the counter (sync.rounds[].bytes_sent counts the all-reduce's tensor payload: "
        "compressed part buffers, not framing, matchmaking or DHT traffic)")
    return {"ratios": ratios, "definitions": defs,
            "figures": {"H": H, "steps": steps, "stages": {str(s): v for s, v in per_stage.items()},
                        "finished_in_time": finished, "leftover_pids_killed": killed}}
