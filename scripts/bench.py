"""swarm_peer benchmarks: every figure is a RATIO of two measurements taken in the same invocation (machines are
noisy; absolute numbers from a shared box mean little, ratios of neighbours in time a bit more).

    .venv/bin/python scripts/bench.py [--tiny] [--only a,b,c,d,e,f,g,h] [--out runs/bench] [--config configs/tiny.yaml]
                                      [--stages 2] [--set KEY=VALUE ...]

Parts (their exact definitions are printed into the markdown and the JSON):
  a  swarm tokens/s (S stages x 1 peer, run.threads=1 each) / single-process baseline (run.threads=S), same model
     and batch: steady state (middle of the run) and end to end
  b  activation hop throughput through our transport (call_forward over the direct lane and through p2pd, codecs
     none/fp16/8bit) / raw loopback TCP
     moving the same tensor in fp32 (scripts/bench_hop.py)
  c  bytes sent per stage peer per DiLoCo outer round (averaging fp32/fp16/8bit) / what a per-step fp32 gradient
     all-reduce sends over the same inner steps, measured in the SAME run: one 4-stage x 2-peer swarm whose stages
     run diloco-fp32, diloco-fp16, diloco-8bit and sync-fp32 (stages synchronize independently; the fingerprint
     that neighbours and stage mates must share covers the model and split, not the sync settings)
  d  join time of a new stage peer (its "joining the stage" state download) / (state bytes / loopback bandwidth)
  e  after kill -9 of a stage-1 peer's process group in a 2x2 run: stall and recovery time / normal step interval
  f  peak RSS per peer / (parameters + gradients + optimizer states + averaging buffers + in-flight activations)
  g  the state path at GPT-2 small's shape (configs/gpt2-small-local.yaml; --tiny: the tiny config): 2x2 DiLoCo +
     monitor + a fifth peer joining stage 1, checkpoints on: footprint (PSS) vs state, round time vs wire time,
     join time vs wire time, checkpoint compute pause vs step (benchlib/size.py). Not in the default set (minutes,
     ~20 GB): ask for it with --only g
  h  the sync mode's per-step synchronization: median seconds of a sync-mode round (2-peer single-stage swarm) /
     torch.distributed gloo's all-reduce of the same gradients between 2 processes (benchlib/sync_speed.py)
  i  the pipeline flush per inner step: a 2-stage x 1-peer swarm with swarm.split_backward false, then true:
     tokens/s and each stage's idle share in the steady state, next to GPipe's bubble (benchlib/flush.py)
d, e and f share one 2-stage x 2-peer run (f also reads every other run's peers).

Writes OUT/bench.json and OUT/bench.md (plus logs and summaries under OUT/<part>/). Every part is bounded in time;
a part that fails or runs out of time is reported with its error and the others still run. Exit status 1 if any
requested part failed. Every process started is stopped by process group (SIGTERM, then SIGKILL), also on Ctrl-C.

This file is the command line only: the parts and the process/swarm helpers live in scripts/benchlib/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from benchlib.churn import part_d, part_e
from benchlib.flush import part_i
from benchlib.common import ENV, ROOT
from benchlib.harness import Bench
from benchlib.memory import part_f
from benchlib.procs import install_signal_handlers
from benchlib.report import json_safe, markdown
from benchlib.size import part_g
from benchlib.sync_bytes import part_c
from benchlib.sync_speed import part_h
from benchlib.throughput import part_a, part_b

PART_FUNCTIONS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e, "f": part_f, "g": part_g, "h": part_h,
                  "i": part_i}  # run in this order
PARTS = "".join(PART_FUNCTIONS)
DEFAULT_PARTS = "abcdef"  # g only when asked for


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model, short phases (the test uses it)")
    parser.add_argument("--only", default=DEFAULT_PARTS, help="comma-separated parts of a..i (default: a,b,c,d,e,f)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--stages", type=int, default=2, help="part a: S stages x 1 peer")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (after --tiny's)")
    args = parser.parse_args(argv)
    parts = [p for p in args.only.replace(",", "") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f"--only: parts are {','.join(PARTS)}")
    install_signal_handlers()
    os.environ.update(ENV)
    started = time.time()
    bench = Bench(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    report = {"meta": {"tiny": args.tiny, "parts": parts, "config": args.config, "overrides": bench.overrides,
                       "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "loadavg_start": os.getloadavg()[0]}, "parts": {}}
    failed = []
    for part in PARTS:
        if part not in parts:
            continue
        t0 = time.time()
        print(f"[bench] part {part} ...", flush=True)
        try:
            res = PART_FUNCTIONS[part](bench)
            bad = {k: v for k, v in res["ratios"].items() if not (isinstance(v, float) and math.isfinite(v) and v > 0)}
            if bad:
                raise RuntimeError(f"ratios not finite and positive: {bad}")
        except Exception as e:  # one failed part does not stop the others
            res = {"error": f"{type(e).__name__}: {e}"}
            failed.append(part)
        res["seconds"] = time.time() - t0
        report["parts"][part] = res
        shown = res.get("ratios") or (res.get("error") or "").splitlines()[:1]
        print(f"[bench] part {part}: {shown} ({res['seconds']:.0f} s)", flush=True)
    report["meta"].update(seconds=time.time() - started, loadavg_end=os.getloadavg()[0])
    report["ratios"] = {k: v for res in report["parts"].values() for k, v in res.get("ratios", {}).items()}
    out = Path(args.out)
    (out / "bench.json").write_text(json.dumps(json_safe(report), indent=1))
    md = markdown(report)
    (out / "bench.md").write_text(md)
    print(md)
    print(f"[bench] wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
