"""Emulated WAN: wall-clock to a target training loss, DiLoCo vs per-step gradient all-reduce (`swarm.sync_mode=sync`),
2 stages x 2 peers, every peer in its own Linux network namespace behind a rate-limited link.

    sudo .venv/bin/python scripts/bench_wan.py [--rate 50mbit] [--tiny] [--steps N] [--target-loss L]
                                               [--out runs/bench_wan] [--link-check-only] [--set KEY=VALUE ...]

Topology (all created here, all removed at the end, also on Ctrl-C/SIGTERM): a "switch" namespace holding a bridge,
and one namespace per peer joined to it by a veth pair, addresses 10.214.0.x/24 (nothing is added to the root
namespace or to any existing interface). Both ends of every pair get `tc qdisc ... tbf rate RATE burst 32kbit
latency 50ms`: each peer has RATE up and RATE down (a home-internet link); there is no added delay (netem is not
available here). Every byte between peers (activations, gradients, DHT, all-reduce) crosses two such links.

Each mode runs the same config and --max-steps on the same topology, one after the other. Time to target = from
the moment the first stage-0 peer serves until the stage-0 peers' mean training loss (per inner step, trailing
moving average) first reaches the target; a step's time is interpolated from the peers' progress lines (one per
5 s, time-stamped as they arrive). Target: --target-loss if both modes reach it, else the best smoothed loss the
worse mode reached (both reach it by construction). The ratio is sync's time / DiLoCo's time (> 1: DiLoCo faster).

Before training, the link check sends a few MiB over TCP between two peer namespaces: measured rate / RATE shows
the emulation works (--link-check-only stops there). Needs root and `ip netns`/`tc tbf`: otherwise it prints one line
saying why and exits 0 with {"status": "skipped"} in the JSON.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib.common import (ENV, PEER_OVERRIDES, ROOT, TINY_OVERRIDES, log, peer_command,  # noqa: E402
                             progress_steps, read_summaries)
from benchlib.procs import Procs, install_signal_handlers  # noqa: E402
from benchlib.report import fmt, json_safe  # noqa: E402
from benchlib.wan_net import Wan, link_check, preflight, rate_bits  # noqa: E402

PROGRESS_RE = r"^\[stage 0\] step (\d+) \|"


def step_times(lines: list[tuple[float, str]], t_serving: float) -> list[tuple[float, int]]:
    """(time, inner step) points: the serving line (step 0) and every progress line."""
    points = [(t_serving, 0)]
    for t, step in progress_steps(lines, PROGRESS_RE):
        if step >= points[-1][1]:
            points.append((t, step))
    return points


def time_of_step(points: list[tuple[float, int]], k: float) -> float:
    """Linear interpolation; past the last point, the last rate carries on."""
    for (t0, s0), (t1, s1) in zip(points, points[1:]):
        if s0 <= k <= s1 and s1 > s0:
            return t0 + (t1 - t0) * (k - s0) / (s1 - s0)
    (t0, s0), (t1, s1) = points[-2], points[-1]
    rate = (s1 - s0) / (t1 - t0) if s1 > s0 else 1e-9
    return t1 + (k - s1) / rate


def smooth(values: list[float], w: int) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - w + 1): i + 1]
        out.append(sum(window) / len(window))
    return out


class WanBench:
    def __init__(self, args):
        self.args, self.tiny = args, args.tiny
        self.out = Path(args.out)
        self.overrides = (TINY_OVERRIDES + ["swarm.sync_every=5"] if self.tiny else []) + [
            "swarm.num_stages=2", "run.eval_interval=0", *args.overrides]
        self.steps = args.steps or (16 if self.tiny else 60)
        self.mode_budget = args.mode_timeout or (150 if self.tiny else 420)

    def run_mode(self, wan: Wan, mode: str) -> dict:
        run_dir = self.out / mode
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        run_id = f"wan-{mode}"
        deadline = time.time() + self.mode_budget
        procs = Procs(run_dir)
        # peer i lives in namespace i: s1p0, s1p1, s0p0, s0p1 (stage 1 first: s1p0 is the bootstrap)
        layout = [("s1p0", 1), ("s1p1", 1), ("s0p0", 0), ("s0p1", 0)]
        overrides = [*self.overrides, *PEER_OVERRIDES, f"swarm.sync_mode={mode}"]

        def args_for(i: int, name: str, stage: int, bootstrap: str | None) -> list[str]:
            extra = ["--max-steps", str(self.steps)] + (["--data-shard", f"{name[-1]}/2"] if stage == 0 else [])
            return peer_command(self.args.config, run_id, stage, name, run_dir, overrides, bootstrap, extra,
                                host=wan.ips[i])

        finished = False
        try:
            procs.start("s1p0", args_for(0, "s1p0", 1, None), prefix=wan.prefix(0))
            maddrs = run_dir / "s1p0.maddrs"
            while not (maddrs.exists() and maddrs.read_text().strip()):
                if procs.procs["s1p0"].poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the bootstrap peer did not start:\n{procs.tail('s1p0')}")
                time.sleep(0.2)
            boot = maddrs.read_text().split()[0]
            for i, (name, stage) in enumerate(layout[1:], start=1):
                procs.start(name, args_for(i, name, stage, boot), prefix=wan.prefix(i))
            t_serving = min(procs.wait_line(n, r"serving layers", deadline, "serving") for n in ("s0p0", "s0p1"))
            log(f"{mode}: stage 0 serving; training {self.steps} steps (at most {deadline - time.time():.0f} s)")
            names = [n for n, _ in layout]
            finished = procs.wait_all(["s0p0", "s0p1"], deadline)
            if finished:
                procs.wait_all(names, min(deadline, time.time() + 60))
            lines = {n: list(procs.lines[n]) for n in ("s0p0", "s0p1")}
        finally:  # stopped early, a peer in the middle of an outer round finishes it first (averaging_timeout)
            procs.close(grace=30.0 if finished else 90.0)
        summaries = read_summaries(run_dir, [n for n, _ in layout])
        if "s0p0" not in summaries or "s0p1" not in summaries:
            raise RuntimeError(f"{mode}: no stage-0 summary:\n{procs.tail('s0p0')}")
        # per-step mean loss of the stage-0 peers and the step's time (mean over the peers)
        points = {n: step_times(lines[n], procs.find(n, r"serving layers")[0]) for n in lines}
        curves = {n: dict((int(k), v) for k, v in summaries[n]["loss_curve"]) for n in lines}
        common = sorted(set(curves["s0p0"]) & set(curves["s0p1"]))
        loss = [(curves["s0p0"][k] + curves["s0p1"][k]) / 2 for k in common]
        times = [sum(time_of_step(points[n], k) for n in lines) / 2 - t_serving for k in common]
        sent = {n: s["transport"]["bytes_sent"] + sum(r["bytes_sent"] for r in s["sync"]["rounds"])
                for n, s in summaries.items()}
        return {"mode": mode, "finished": finished, "steps": common, "loss": loss, "times": times,
                "inner_steps": {n: summaries[n]["inner_steps"] for n in lines},
                "tokens_per_s": sum(summaries[n]["tokens_per_s"] for n in lines),
                "rounds": len(summaries["s0p0"]["sync"]["rounds"]),
                "mib_sent_per_peer": {n: b / 2**20 for n, b in sent.items()},
                "wall_s": max(t for t in times) if times else None}

    def run(self) -> dict:
        wan = Wan(4, self.args.rate)
        atexit.register(wan.delete)
        report = {"status": "measured", "rate": self.args.rate, "tiny": self.tiny, "steps": self.steps,
                  "config": self.args.config, "overrides": self.overrides, "cpus": os.cpu_count(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": os.getloadavg()[0]}
        t_start = time.time()
        try:
            wan.create()
            report["link_check"] = link_check(wan, int(min(8 << 20, rate_bits(self.args.rate) / 8 * 1.0)),
                                              time.time() + 60)
            log(f"link check: {report['link_check']['bits_per_s'] / 1e6:.1f} Mbit/s through two "
                f"{self.args.rate} tbf links ({report['link_check']['ratio_to_rate']:.2f} of the rate)")
            if self.args.link_check_only:
                report["status"] = "link-check"
                return report
            from swarm_peer.config import load_config
            from swarm_peer.data import load_corpus

            load_corpus(load_config(self.args.config, self.overrides))  # tokenize once, before the peers start
            runs = {}
            for mode in ("diloco", "sync"):
                log(f"mode {mode} ...")
                runs[mode] = self.run_mode(wan, mode)
                log(f"mode {mode}: {runs[mode]['steps'][-1] if runs[mode]['steps'] else 0} steps in "
                    f"{runs[mode]['wall_s'] or 0:.0f} s")
        finally:
            wan.delete()
        report["seconds"] = time.time() - t_start
        report["loadavg_end"] = os.getloadavg()[0]
        w = max(3, self.steps // 10)
        for r in runs.values():
            r["smoothed"] = smooth(r["loss"], w)
        reached = lambda r, target: next(  # noqa: E731
            ((k, t) for k, s, t in zip(r["steps"], r["smoothed"], r["times"]) if s <= target), None)
        target, source = self.args.target_loss, "--target-loss"
        if target is None or not all(reached(r, target) for r in runs.values()):
            target, source = max(min(r["smoothed"]) for r in runs.values()), "auto: the best the worse mode reached"
        hit = {m: reached(r, target) for m, r in runs.items()}
        report.update(smoothing_steps=w, target_loss=target, target_source=source, runs=runs,
                      time_to_target_s={m: h[1] for m, h in hit.items()},
                      steps_to_target={m: h[0] for m, h in hit.items()})
        report["ratio"] = hit["sync"][1] / hit["diloco"][1]
        report["steps_ratio"] = hit["sync"][0] / hit["diloco"][0]
        return report


def markdown(r: dict) -> str:
    if r["status"] == "skipped":
        return f"# Emulated WAN benchmark: skipped\n\n{r['reason']}\n"
    lc = r["link_check"]
    lines = [f"# Emulated WAN: DiLoCo vs per-step all-reduce ({r['rate']} per peer, {'tiny' if r['tiny'] else 'full'})",
             "", f"{r['started']}, {r['cpus']} CPUs, load average {r['loadavg_start']:.1f} at start; config "
             f"`{r['config']}` {' '.join(r['overrides'])}; 2 stages x 2 peers, one network namespace per peer, tbf "
             f"{r['rate']} up and down per peer, no added delay. Link check: {lc['bits_per_s'] / 1e6:.1f} Mbit/s "
             f"measured ({fmt(lc['ratio_to_rate'])} of the rate). Numbers taken on a shared machine are indicative."]
    if r["status"] != "measured":
        return "\n".join(lines) + "\n"
    lines += ["", f"Target training loss {r['target_loss']:.4f} ({r['target_source']}; stage-0 mean, trailing "
              f"{r['smoothing_steps']}-step average).", "",
              "| mode | steps run | time to target s | steps to target | final smoothed loss | stage-0 tok/s | "
              "outer rounds | MiB sent per peer (stage 0 / stage 1) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for m, run in r["runs"].items():
        mib = run["mib_sent_per_peer"]
        lines.append(f"| {m} | {run['steps'][-1] if run['steps'] else 0} | {fmt(r['time_to_target_s'][m])} | "
                     f"{r['steps_to_target'][m]} | {run['smoothed'][-1]:.4f} | {fmt(run['tokens_per_s'])} | "
                     f"{run['rounds']} | {fmt(mib.get('s0p0', 0.0))} / {fmt(mib.get('s1p0', 0.0))} |")
    lines += ["", f"**Ratio: sync time to target / DiLoCo time to target = {fmt(r['ratio'])}** (> 1: DiLoCo gets "
              f"there sooner); steps to target, sync / DiLoCo = {fmt(r['steps_ratio'])}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", default="50mbit", help="tbf rate per peer and direction (default 50mbit)")
    parser.add_argument("--tiny", action="store_true", help="tiny model, few steps")
    parser.add_argument("--steps", type=int, default=None, help="--max-steps of every peer (60; tiny 16)")
    parser.add_argument("--target-loss", type=float, default=None)
    parser.add_argument("--mode-timeout", type=float, default=None, help="seconds per mode (420; tiny 150)")
    parser.add_argument("--link-check-only", action="store_true", help="set up the WAN, measure the link, clean up")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_wan"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        rate_bits(args.rate)
    except ValueError as e:
        parser.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reason = preflight()
    if reason:
        report = {"status": "skipped", "reason": reason}
        print(f"bench_wan: skipped: {reason}")
    else:
        install_signal_handlers()
        os.environ.update(ENV)
        report = WanBench(args).run()
    (out / "bench_wan.json").write_text(json.dumps(json_safe(report), indent=1))
    md = markdown(report)
    (out / "bench_wan.md").write_text(md)
    print(md)
    print(f"bench_wan: wrote {out / 'bench_wan.json'} and {out / 'bench_wan.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
