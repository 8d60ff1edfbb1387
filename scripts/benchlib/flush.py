"""Part i: the pipeline flush of an inner step, with and without the split backward (swarm_peer/split_backward.py).

  i  a 2-stage x 1-peer swarm (run.threads=1 each, no same-stage sync) run twice in one invocation, with
     swarm.split_backward false and then true: steady tokens/s (split / plain), and each stage's idle share in the
     steady state (1 - its processes' CPU seconds / wall seconds), next to GPipe's bubble (S-1)/(M+S-1)
"""
from __future__ import annotations

from benchlib.harness import Bench


def _steady(bench: Bench, name: str, steps: int, common: list, deadline: float) -> dict:
    series, summaries, _, procs = bench.swarm_line(name, 2, steps, common, deadline)
    (s0,) = series.values()
    lo = next(e for e in s0 if e[1] >= 0.2 * steps)
    hi = next(e for e in s0 if e[1] >= 0.9 * steps)
    seconds = hi[0] - lo[0]
    idle = {f"stage{s}": 1 - procs.cpu_between([f"s{s}p0"], lo[0], hi[0]) / seconds for s in range(2)}
    busy = {f"stage{s}": summaries[f"s{s}p0"]["compute_busy_s"] / summaries[f"s{s}p0"]["wall_time_s"]
            for s in range(2)}
    return {"tokens_per_s": (hi[2] - lo[2]) * bench.cfg.data.seq_len / seconds, "seconds": seconds,
            "steps": hi[1] - lo[1], "step_s": seconds / max(hi[1] - lo[1], 1), "idle_share": idle,
            "compute_busy_share_whole_run": busy}


def part_i(bench: Bench) -> dict:
    import time

    steps = int(bench.sized(30, 16))
    deadline = time.time() + bench.sized(900, 300)
    common = ["swarm.num_stages=2", "swarm.sync_mode=none", "run.eval_interval=0"]
    bench.prepare_corpus(common)
    runs = {split: _steady(bench, f"i-{split}", steps, [*common, f"swarm.split_backward={split}"], deadline)
            for split in ("false", "true")}
    plain, split = runs["false"], runs["true"]
    d = bench.cfg.data
    M = d.batch_size // d.microbatch_size
    return {
        "ratios": {"i.split_tokens_per_s": split["tokens_per_s"] / plain["tokens_per_s"],
                   **{f"i.idle_{s}": split["idle_share"][s] / max(plain["idle_share"][s], 1e-9)
                      for s in plain["idle_share"]}},
        "figures": {"plain": plain, "split": split, "microbatches_per_step": M, "gpipe_bubble": 1 / (M + 1)},
        "definitions": {
            "i.split_tokens_per_s": f"steady tokens/s of a 2-stage x 1-peer swarm (run.threads=1 each, sync_mode "
                                    f"none, {steps} steps) with swarm.split_backward=true / the same with false, "
                                    f"one after the other; steady: stage-0 samples between its records at >=20% "
                                    f"and >=90% of the steps",
            "i.idle_stage0": "stage 0's idle share in that steady window (1 - CPU seconds of its processes / wall "
                             "seconds), split / plain",
            "i.idle_stage1": "the same for stage 1 (the last stage, whose reply no longer waits for its weight "
                             "gradients)"},
    }
