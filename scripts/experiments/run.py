"""DiLoCo-SWARM report's comparisons at CPU scale, compute-matched (equal training tokens).

    .venv/bin/python scripts/experiments/run.py {exp1,exp2,exp3,exp4,all} [--out DIR] [--steps N] [--tiny] [--set K=V ...]

exp1  single-process baseline vs SWARM (swarm.sync_mode=sync: gradient all-reduce every step) vs DiLoCo-SWARM
      (diloco, H = --sync-every), 2 stages x 2 peers; + the baseline on half the tokens (the published single-GPU run)
exp2  DiLoCo-SWARM communication frequency: H in --h-values (default 5 10 20 50)
exp3  model size: h128 L4 (0.8M parameters) and the config's model (tiny.yaml: h192 L6, 2.8M), baseline vs
      DiLoCo-SWARM (--exp3-large: the config's model and h256 L8, 6.4M; about 3x slower)
exp4  pipeline wire codecs: DiLoCo-SWARM with hidden states and their gradients in none (fp32), fp16, bf16, 8bit, and
      8-bit hidden states with bf16 gradients

Each stage-0 peer runs N inner steps of data.batch_size sequences on its half of the data, so a swarm trains on 2N
batches; the baseline gets 2N steps of the same batch. Every method's final model (the baseline's weights; for a
swarm, stage 0 + stage 1 of peer 0 saved at exit, i.e. the stage's global model after its last outer round) is
evaluated by swarm_peer.baseline.evaluate on the same --eval-batches held-out microbatches. Output:
runs/experiments/<exp>/{results.json,results.md,*.png} and one folder of logs/summaries/weights per method.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import report  # noqa: E402

sys.path.insert(0, str(harness.ROOT))
from swarm_peer.config import load_config  # noqa: E402

# --tiny: a seconds-long smoke setting (the test suite's fast model); not meant to say anything about training
TINY = ["model.hidden_size=64", "model.num_heads=4", "model.num_layers=4", "model.max_position_embeddings=64",
        "data.seq_len=32", "data.batch_size=8", "data.microbatch_size=2", "data.max_tokens=200000",
        "optim.inner.warmup_steps=2", "swarm.announce_period=0.5", "swarm.record_ttl=6", "swarm.matchmaking_time=2",
        "swarm.averaging_timeout=30", "swarm.averaging_chunk_timeout=5", "run.eval_interval=0"]
DEFAULT_STEPS = 50  # N: ~11 min for exp1 on 2 shared cores (load ~8); 100 doubles it
# exp4's (swarm.compression.forward, .backward): each codec both ways, and 8-bit hidden states with bf16 gradients
CODECS = (("none", "none"), ("fp16", "fp16"), ("bf16", "bf16"), ("8bit", "8bit"), ("8bit", "bf16"))
SIZES = {  # exp3's model pairs: label -> overrides ([] = the config's own model, tiny.yaml: h192 L6, 2.8M parameters)
    "default": {"small": ["model.hidden_size=128", "model.num_layers=4", "model.num_heads=4"], "config": []},
    "large": {"config": [], "large": ["model.hidden_size=256", "model.num_layers=8", "model.num_heads=8"]},
    "tiny": {"small": ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4"], "config": []},
}


def methods_for(exp: str, a) -> tuple[str, list[dict]]:
    """(description, [method specs]). A spec: name, kind, steps (baseline: its steps; swarm: per stage-0 peer),
    sets, group, published_key, compute_matched."""
    n, h = a.steps, a.sync_every
    diloco = lambda hh: ["swarm.sync_mode=diloco", f"swarm.sync_every={hh}"]  # noqa: E731
    if exp == "exp1":
        return (f"baseline vs SWARM vs DiLoCo-SWARM (H={h}), 2 stages x 2 peers, N={n} steps per stage-0 peer, "
                f"baseline 2N steps; baseline_fewer_tokens: N steps (half the tokens)", [
                    dict(name="baseline", kind="baseline", steps=2 * n, sets=[]),
                    dict(name="baseline_fewer_tokens", kind="baseline", steps=n, sets=[], compute_matched=False),
                    dict(name="swarm", kind="swarm", steps=n, sets=["swarm.sync_mode=sync"]),
                    dict(name="diloco_swarm", kind="swarm", steps=n, sets=diloco(h))])
    if exp == "exp2":
        return (f"DiLoCo-SWARM, H in {a.h_values}, 2 stages x 2 peers, N={n} steps per stage-0 peer",
                [dict(name=f"diloco_H{hh}", kind="swarm", steps=n, sets=diloco(hh), published_key=f"H={hh}")
                 for hh in a.h_values])
    if exp == "exp3":
        specs = []
        for model_sets in SIZES["tiny" if a.tiny else "large" if a.exp3_large else "default"].values():
            cfg = load_config(a.config, [*a.common, *model_sets])
            group = f"h{cfg.model.hidden_size}-L{cfg.model.num_layers}"
            for kind, steps, sets in (("baseline", 2 * n, []), ("swarm", n, diloco(h))):
                specs.append(dict(name=f"{'baseline' if kind == 'baseline' else 'diloco_swarm'}_{group}", kind=kind,
                                  steps=steps, sets=[*model_sets, *sets], group=group))
        return (f"model size: baseline (2N steps) vs DiLoCo-SWARM (H={h}, N={n} steps per stage-0 peer)", specs)
    if exp == "exp4":
        return (f"pipeline wire codecs: DiLoCo-SWARM (H={h}), 2 stages x 2 peers, N={n} steps per stage-0 peer, with "
                f"hidden states / their gradients sent as {', '.join('/'.join(c) for c in CODECS)}",
                [dict(name=f"diloco_swarm_{f}" + (f"_{b}" if b != f else ""), kind="swarm", steps=n,
                      published_key=f"{f}/{b}",
                      sets=[*diloco(h), f"swarm.compression.forward={f}", f"swarm.compression.backward={b}"])
                 for f, b in CODECS])
    raise ValueError(exp)


def run_method(exp: str, spec: dict, a, out: Path) -> dict:
    """Run one method (or, with --reuse, read back a finished run with the same settings) and evaluate its model."""
    sets = [*a.common, *spec["sets"]]
    cfg = load_config(a.config, [*sets, f"run.max_steps={spec['steps']}", f"run.eval_batches={a.eval_batches}"])
    where = out / spec["name"]
    settings = {"kind": spec["kind"], "config": a.config, "sets": sets, "steps": spec["steps"]}
    per_peer = " per stage-0 peer" if spec["kind"] == "swarm" else ""
    if a.reuse and (where / "raw.json").exists() and json.loads((where / "settings.json").read_text()) == settings:
        print(f"[{exp}] {spec['name']}: reusing the finished run in {where}", flush=True)
        raw = harness.load_raw(where)
    else:
        print(f"[{exp}] {spec['name']}: {spec['kind']}, {spec['steps']} steps{per_peer} -> {where}", flush=True)
        where.mkdir(parents=True, exist_ok=True)
        (where / "raw.json").unlink(missing_ok=True)  # written again only when this run succeeds
        (where / "settings.json").write_text(json.dumps(settings))
        run = harness.run_baseline if spec["kind"] == "baseline" else harness.run_swarm
        raw = run(where, a.config, sets, spec["steps"], a.timeout)
    loss = harness.final_eval(cfg, raw["weights"])
    hashes = replicas = None
    if spec["kind"] == "swarm":
        hashes = harness.stage_file_hashes(cfg, raw["weights"])
        replicas = [harness.final_eval(cfg, files) for files in raw["replica_weights"]]
    res = report.method_result(spec["kind"], raw, cfg, loss, hashes, replicas)
    res.update(group=spec.get("group", ""), compute_matched=spec.get("compute_matched", True),
               published_key=spec.get("published_key", spec["name"]), dir=str(where), overrides=spec["sets"],
               eval_sequences=a.eval_batches * cfg.data.microbatch_size)
    blocked = res.get("sync_blocked_share")
    blocked = f", sync-blocked {100 * max(blocked.values()):.1f}% of wall time at most" if blocked else ""
    print(f"[{exp}] {spec['name']}: final val loss {loss:.4f}, ppl {res['final_val_perplexity']:.3f}, "
          f"{res['tokens']:,} tokens, {res['process_wall_s']:.0f} s{blocked}", flush=True)
    return res


def run_experiment(exp: str, a) -> dict:
    out = Path(a.out) if a.out else harness.ROOT / "runs" / "experiments" / exp
    if a.out and a.exp == "all":
        out = out / exp
    description, specs = methods_for(exp, a)
    if a.methods:
        specs = [s for s in specs if s["name"] in a.methods]
        if not specs:
            raise SystemExit(f"--methods {a.methods}: none of them is a method of {exp}")
    results = {"experiment": exp, "description": description, "command": " ".join(sys.argv),
               "config": a.config, "overrides": a.common, "steps_per_stage0_peer": a.steps, "eval_batches":
               a.eval_batches, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
               "published": report.PUBLISHED[exp], "published_source": report.PUBLISHED["source"], "methods": {}}
    t0 = time.monotonic()
    for spec in specs:
        results["methods"][spec["name"]] = run_method(exp, spec, a, out)
    matched = [m for m in results["methods"].values() if m["compute_matched"]]
    # equal within one inner step per stage-0 peer: together they take the run's N x max_steps steps of the run
    # clock, give or take a step each (rounds align their clocks at the median), not exactly max_steps each
    slack = 1.0 + 1.0 / a.steps + 1e-9
    results["compute_matched_tokens"] = all(
        max(ts) <= slack * min(ts) for g in {m["group"] for m in matched}
        for ts in [[m["tokens"] for m in matched if m["group"] == g]])
    results["eval_sequences"] = next(iter(results["methods"].values()))["eval_sequences"]
    results["total_wall_s"] = time.monotonic() - t0
    table = report.write(results, out)
    print(table, flush=True)
    print(f"[{exp}] results: {out / 'results.json'} ({', '.join(results['plots'])})", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("exp", choices=["exp1", "exp2", "exp3", "exp4", "all"])
    p.add_argument("--out", help="output folder (default runs/experiments/<exp>; with 'all': DIR/<exp>)")
    p.add_argument("--steps", type=int, help=f"inner steps per stage-0 peer, N (default {DEFAULT_STEPS}; --tiny 6)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and few steps: a smoke test of the harness")
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every method and peer (repeatable)")
    p.add_argument("--sync-every", type=int, help="DiLoCo H for exp1/exp3 (default 10; --tiny 3)")
    p.add_argument("--exp3-large", action="store_true",
                   help="exp3: the config's model vs h256 L8 (2.4x; ~3x slower) instead of h128 L4 vs the config's")
    p.add_argument("--h-values", type=int, nargs="+", help="exp2's H values (default 5 10 20 50; --tiny 2 4)")
    p.add_argument("--methods", nargs="+", help="run only these methods (names as in results.json)")
    p.add_argument("--reuse", action="store_true",
                   help="keep methods already finished in the output folder with the same settings (resume)")
    p.add_argument("--eval-batches", type=int, default=32, help="held-out microbatches of the final evaluation")
    p.add_argument("--cache-dir", help="corpus cache (data.cache_dir)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per run (baseline or whole swarm)")
    a = p.parse_args(argv)
    a.sync_every = a.sync_every or (3 if a.tiny else 10)
    a.h_values = a.h_values or ([2, 4] if a.tiny else [5, 10, 20, 50])
    a.common = ["swarm.num_stages=2", "run.threads=1", *(TINY if a.tiny else []),
                *([f"data.cache_dir={a.cache_dir}"] if a.cache_dir else []), *a.sets]
    load_config(a.config, a.common)  # a bad override fails here, before anything starts

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)  # runs the cleanup of every child (harness.Procs) on the way out
    all_results, steps = {}, a.steps
    for exp in (["exp1", "exp2", "exp3"] if a.exp == "all" else [a.exp]):
        a.steps = steps or (6 if a.tiny else DEFAULT_STEPS)
        all_results[exp] = run_experiment(exp, a)
    if a.exp == "all" and a.out:
        Path(a.out, "all.json").write_text(json.dumps({e: r["methods"] for e, r in all_results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every process this run started has been stopped", file=sys.stderr)
        sys.exit(130)
