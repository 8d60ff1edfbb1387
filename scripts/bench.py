"""swarm_peer benchmarks: every figure is a RATIO of two measurements taken in the same invocation (machines are
noisy; absolute numbers from a shared box mean little, ratios of neighbours in time a bit more).

    .venv/bin/python scripts/bench.py [--tiny] [--only a,b,c,d,e,f] [--out runs/bench] [--config configs/tiny.yaml]
                                      [--stages 2] [--set KEY=VALUE ...]

Parts (their exact definitions are printed into the markdown and the JSON):
  a  swarm tokens/s (S stages x 1 peer, run.threads=1 each) / single-process baseline (run.threads=S), same model
     and batch: steady state (middle of the run) and end to end
  b  activation hop throughput through our transport (call_forward, codecs none/fp16/8bit) / raw loopback TCP
     moving the same tensor in fp32 (scripts/bench_hop.py)
  c  bytes sent per stage peer per DiLoCo outer round (averaging fp32/fp16/8bit) / what a per-step fp32 gradient
     all-reduce sends over the same inner steps, measured in the SAME run: one 4-stage x 2-peer swarm whose stages
     run diloco-fp32, diloco-fp16, diloco-8bit and sync-fp32 (stages synchronize independently; the fingerprint
     that neighbours and stage mates must share covers the model and split, not the sync settings)
  d  join time of a new stage peer (its "joining the stage" state download) / (state bytes / loopback bandwidth)
  e  after kill -9 of a stage-1 peer's process group in a 2x2 run: stall and recovery time / normal step interval
  f  peak RSS per peer / (parameters + gradients + optimizer states + averaging buffers + in-flight activations)
d, e and f share one 2-stage x 2-peer run (f also reads every other run's peers).

Writes OUT/bench.json and OUT/bench.md (plus logs and summaries under OUT/<part>/). Every part is bounded in time;
a part that fails or runs out of time is reported with its error and the others still run. Exit status 1 if any
requested part failed. Every process started is stopped by process group (SIGTERM, then SIGKILL), also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = sys.executable
PARTS = "abcdef"

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


# ------------------------------------------------------------------------------------------------ processes
def group_pids(pgid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgids) -> dict[int, float]:
    """CPU seconds (user + system, plus reaped children) of every process in each process group, from /proc."""
    totals = {g: 0.0 for g in pgids}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pgrp = int(fields[2])
        if pgrp in totals:
            totals[pgrp] += sum(int(x) for x in fields[11:15]) / _CLK_TCK
    return totals


class Procs:
    """Processes we start, each in its own session (process group: its DHT process and p2pd are in it). stdout is
    read by a thread that stamps every line with time.time() and copies it to the process's log file. With
    `sample_cpu`, a thread records every process group's CPU seconds every 0.25 s (`cpu_between`)."""

    live: list["Procs"] = []  # for the emergency cleanup (signals, atexit)

    def __init__(self, log_dir: Path, sample_cpu: bool = False):
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.lines: dict[str, list[tuple[float, str]]] = {}
        self.started_at: dict[str, float] = {}
        self.cpu: dict[str, list[tuple[float, float]]] = {}
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        Procs.live.append(self)
        if sample_cpu:
            t = threading.Thread(target=self._sample_cpu, daemon=True)
            t.start()
            self._threads.append(t)

    def _sample_cpu(self) -> None:
        while not self._closed.wait(0.25):
            running = {n: p.pid for n, p in list(self.procs.items()) if p.poll() is None}
            if not running:
                continue
            now, totals = time.time(), group_cpu_seconds(running.values())
            for name, pgid in running.items():
                self.cpu.setdefault(name, []).append((now, totals[pgid]))

    def cpu_between(self, names, t0: float, t1: float) -> float:
        """CPU seconds the groups of `names` used between t0 and t1 (samples interpolated linearly)."""
        def at(samples, t):
            if not samples:
                raise RuntimeError("no CPU samples")
            if t <= samples[0][0]:
                return samples[0][1]
            for (a, x), (b, y) in zip(samples, samples[1:]):
                if a <= t <= b:
                    return x + (y - x) * (t - a) / (b - a) if b > a else y
            return samples[-1][1]
        return sum(at(self.cpu[n], t1) - at(self.cpu[n], t0) for n in names)

    def start(self, name: str, args: list[str], prefix: tuple = (), env: dict | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")
        proc = subprocess.Popen([*prefix, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, **ENV, **(env or {})}, text=True, errors="replace")
        self.procs[name], self.lines[name], self.started_at[name] = proc, [], time.time()

        def pump():
            with log:
                for line in proc.stdout:
                    self.lines[name].append((time.time(), line.rstrip("\n")))
                    log.write(line)
                    log.flush()

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        self._threads.append(t)
        return proc

    def find(self, name: str, pattern: str, after: float = 0.0) -> tuple[float, re.Match] | None:
        rx = re.compile(pattern)
        for t, line in list(self.lines.get(name, [])):
            if t >= after:
                m = rx.search(line)
                if m:
                    return t, m
        return None

    def wait_line(self, name: str, pattern: str, deadline: float, what: str = "") -> float:
        while True:
            found = self.find(name, pattern)
            if found:
                return found[0]
            proc = self.procs[name]
            if proc.poll() is not None:
                time.sleep(0.3)  # let the pump catch up with the last lines
                found = self.find(name, pattern)
                if found:
                    return found[0]
                raise RuntimeError(f"{name} exited ({proc.returncode}) before {what or pattern!r}:\n{self.tail(name)}")
            if time.time() > deadline:
                raise PartTimeout(f"{name}: no {what or pattern!r} in time:\n{self.tail(name)}")
            time.sleep(0.2)

    def tail(self, name: str, n: int = 25) -> str:
        return "\n".join(line for _, line in self.lines.get(name, [])[-n:])

    def wait_exit(self, names, deadline: float) -> bool:
        for name in names:
            try:
                self.procs[name].wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def kill(self, name: str) -> None:
        """kill -9 the process and its whole group (as on a crashed host)."""
        try:
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.procs[name].wait(10)

    def stop(self, names=None, grace: float = 30.0) -> list[int]:
        """SIGTERM (a peer saves its summary and shuts hivemind down), then SIGKILL whatever is left of each group.
        Returns the PIDs that had to be killed."""
        names = list(self.procs) if names is None else list(names)
        for n in names:
            if self.procs[n].poll() is None:
                try:
                    self.procs[n].terminate()
                except ProcessLookupError:
                    pass
        deadline = time.time() + grace
        for n in names:
            try:
                self.procs[n].wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        leftovers_deadline = min(deadline, time.time() + 5.0)
        while time.time() < leftovers_deadline and any(group_pids(self.procs[n].pid) for n in names):
            time.sleep(0.2)  # children (DHT process, p2pd) may take a moment after their parent
        killed = []
        for n in names:
            for pid in group_pids(self.procs[n].pid):
                killed.append(pid)
            try:
                os.killpg(self.procs[n].pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.procs[n].wait(5)
            except subprocess.TimeoutExpired:
                pass
        return killed

    def close(self, grace: float = 30.0) -> list[int]:
        killed = self.stop(grace=grace)
        self._closed.set()
        for t in self._threads:
            t.join(2)
        if self in Procs.live:
            Procs.live.remove(self)
        return killed


def _emergency_cleanup() -> None:
    for procs in list(Procs.live):
        for proc in procs.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def install_signal_handlers() -> None:
    """SIGTERM/SIGINT/SIGHUP raise SystemExit in the main thread: `finally` blocks stop what they started."""
    def handler(signum, _frame):
        signal.signal(signum, signal.SIG_IGN)  # a second signal must not interrupt the cleanup
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)
    atexit.register(_emergency_cleanup)


# ------------------------------------------------------------------------------------------------ DHT timeline
class Tracker:
    """A bootstrap DHT node in this process (never killed: the swarm's entry point) that polls the stage records
    peers publish every swarm.announce_period and keeps each peer's (publication time, inner step, samples) series.
    Publication time = record expiration - swarm.record_ttl (DHT time = wall clock here): exact to the moment the
    peer stored it; a step is seen at most one announce period after it completed."""

    def __init__(self, run_id: str, num_stages: int, ttl: float, stages=(0,), host: str = "127.0.0.1"):
        from hivemind import DHT

        from swarm_peer.records import make_validators

        self.run_id, self.ttl, self.stages = run_id, ttl, tuple(stages)
        self.dht = DHT(start=True, host_maddrs=[f"/ip4/{host}/tcp/0"],
                       record_validators=make_validators(run_id, num_stages))
        self.maddr = str(self.dht.get_visible_maddrs()[0])
        self.events: dict[int, dict[str, dict[float, tuple]]] = {s: {} for s in self.stages}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        from swarm_peer.records import read_stage_records

        while not self._stop.is_set():
            for stage in self.stages:
                try:
                    infos = read_stage_records(self.dht, self.run_id, stage, timeout=2.0)
                except Exception:
                    continue
                with self._lock:
                    for info in infos:
                        r = info.record
                        t = round(info.expires_at - self.ttl, 4)
                        self.events[stage].setdefault(r.peer_id, {})[t] = (r.inner_step, r.samples, r.state, r.round)
            self._stop.wait(0.2)

    def series(self, stage: int = 0) -> dict[str, list[tuple]]:
        """peer -> [(t, inner_step, samples, state, round)] sorted by t."""
        with self._lock:
            return {p: sorted((t, *v) for t, v in ev.items()) for p, ev in self.events[stage].items()}

    def peer_steps(self, stage: int = 0) -> dict[str, int]:
        return {p: s[-1][1] for p, s in self.series(stage).items() if s}

    def wait(self, predicate, deadline: float, what: str, procs: Procs | None = None) -> None:
        while not predicate():
            if procs is not None:
                dead = [n for n, p in procs.procs.items() if p.poll() is not None and p.returncode not in (0, None)]
                if dead:
                    raise RuntimeError(f"{dead[0]} died ({procs.procs[dead[0]].returncode}) while waiting for {what}:"
                                       f"\n{procs.tail(dead[0])}")
            if time.time() > deadline:
                raise PartTimeout(f"timed out waiting for {what}")
            time.sleep(0.25)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.dht.shutdown()


def total_at(series: dict[str, list[tuple]], t: float, field: int = 2, peers=None) -> int:
    """Sum over peers of the last value of `field` (1 = inner step, 2 = samples) published at or before t."""
    total = 0
    for p, s in series.items():
        if peers is not None and p not in peers:
            continue
        last = 0
        for e in s:
            if e[0] > t:
                break
            last = e[field]
        total += last
    return total


def event_times(series: dict[str, list[tuple]]) -> list[float]:
    return sorted({e[0] for s in series.values() for e in s})


def longest_gap(series: dict[str, list[tuple]], t0: float, t1: float) -> float:
    """Longest time in [t0, t1] without a new inner step of any peer (as seen in its records)."""
    seen = [t0]
    for t in event_times(series):
        if t0 < t <= t1 and total_at(series, t, 1) > total_at(series, seen[-1], 1):
            seen.append(t)
    seen.append(t1)
    return max(b - a for a, b in zip(seen, seen[1:]))


# ------------------------------------------------------------------------------------------------ swarm runs
class Bench:
    def __init__(self, args):
        self.args, self.tiny = args, args.tiny
        self.out = Path(args.out)
        self.config = args.config
        self.overrides = (TINY_OVERRIDES if self.tiny else []) + list(args.overrides)
        from swarm_peer.config import load_config

        self.cfg = load_config(self.config, self.overrides)
        self.results: dict[str, dict] = {}
        self.summaries: dict[str, dict[str, dict]] = {}  # run -> peer name -> summary (for part f)
        self.bandwidth: dict | None = None
        self.hop: dict | None = None

    def t(self, full: float, tiny: float) -> float:
        return tiny if self.tiny else full

    def peer_args(self, run_id: str, stage: int, name: str, run_dir: Path, bootstrap: str, overrides=(),
                  extra=(), host: str = "127.0.0.1") -> list[str]:
        args = [PY, "-m", "swarm_peer", "--config", self.config, "--stage", str(stage), "--run-id", run_id,
                "--host-maddrs", f"/ip4/{host}/tcp/0", "--maddrs-file", str(run_dir / f"{name}.maddrs"),
                "--summary-json", str(run_dir / f"{name}.json")]
        for o in [*self.overrides, *PEER_OVERRIDES, *overrides]:
            args += ["--set", o]
        if bootstrap:
            args += ["--initial-peers", bootstrap]
        return args + list(extra)

    def prepare_corpus(self, overrides=()) -> None:
        """Tokenize/cache the corpus once here, so peers starting together do not all build it."""
        from swarm_peer.config import load_config
        from swarm_peer.data import load_corpus

        load_corpus(load_config(self.config, [*self.overrides, *overrides]))

    def read_summaries(self, run_dir: Path, names) -> dict[str, dict]:
        out = {}
        for n in names:
            f = run_dir / f"{n}.json"
            if f.exists():
                out[n] = json.loads(f.read_text())
        return out

    # -------------------------------------------------------------------------------------------- part a
    def part_a(self) -> dict:
        S = self.args.stages
        steps = int(self.t(30, 24))
        deadline = time.time() + self.t(420, 180)
        run_dir = self.out / "a"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        common = [f"swarm.num_stages={S}", "run.eval_interval=0"]  # eval only at the end (both sides)
        self.prepare_corpus(common)
        seq = self.cfg.data.seq_len
        series, summaries, killed, procs = self.swarm_line("a", S, steps, common, deadline)
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
        base_steps = steps if not self.tiny else 4 * steps  # tiny: long enough to time
        base = {threads: self.run_baseline(run_dir, base_steps, common, threads, deadline) for threads in (S, 1)}
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

    def swarm_line(self, run: str, S: int, steps: int, common: list, deadline: float):
        """S stages x 1 peer until the end (--max-steps); the stage-0 record series, summaries, leftover PIDs."""
        run_dir = self.out / run
        if run != "a":  # part a's directory is fresh already (and holds the baselines next)
            shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        procs = Procs(run_dir, sample_cpu=True)
        tracker = Tracker(f"bench-{run}", S, self.cfg.swarm.record_ttl, stages=(0,))
        names = [f"s{s}p0" for s in range(S)]
        try:
            for s in reversed(range(S)):
                procs.start(f"s{s}p0", self.peer_args(f"bench-{run}", s, f"s{s}p0", run_dir, tracker.maddr, common,
                                                      ["--max-steps", str(steps)]))
            if not procs.wait_exit(names, deadline):
                raise PartTimeout(f"the {S}-stage swarm did not finish {steps} steps in time")
            series = tracker.series(0)
        finally:
            killed = procs.close()
            tracker.close()
        bad = {n: p.returncode for n, p in procs.procs.items() if p.returncode != 0}
        if bad:
            raise RuntimeError(f"swarm peers failed: {bad}\n" + "\n".join(procs.tail(n) for n in bad))
        summaries = self.read_summaries(run_dir, names)
        self.summaries[run] = summaries
        return series, summaries, killed, procs

    def run_baseline(self, run_dir: Path, steps: int, common: list, threads: int, deadline: float) -> dict:
        """One baseline run; OMP_WAIT_POLICY=PASSIVE: with the cores shared, OpenMP's spin-waiting threads otherwise
        slow a 2-thread run down up to ~10x (measured on a loaded 2-core box)."""
        name = f"baseline_t{threads}"
        base_json = run_dir / f"{name}.json"
        bargs = [PY, "-m", "swarm_peer.baseline", "--config", self.config, "--max-steps", str(steps),
                 "--summary-json", str(base_json)]
        for o in [*self.overrides, *common, f"run.threads={threads}"]:
            bargs += ["--set", o]
        procs = Procs(run_dir, sample_cpu=True)
        try:
            procs.start(name, bargs, env={"OMP_WAIT_POLICY": "PASSIVE"})
            if not procs.wait_exit([name], deadline):
                raise PartTimeout(f"{name} did not finish in time")
        finally:
            procs.close()
        if procs.procs[name].returncode != 0:
            raise RuntimeError(f"{name} failed:\n{procs.tail(name)}")
        summary = json.loads(base_json.read_text())
        # its "step k/N | ... tok/s" lines (every run.log_interval steps), time-stamped as they arrived
        points = [(t, int(m.group(1))) for t, line in procs.lines[name]
                  for m in [re.search(r"step\s+(\d+)/\d+ \|", line)] if m]
        lo = next(p for p in points if p[1] >= 0.2 * steps)
        hi = next(p for p in points if p[1] >= 0.9 * steps)
        tokens = (hi[1] - lo[1]) * self.cfg.data.batch_size * self.cfg.data.seq_len
        cpu = procs.cpu_between([name], lo[0], hi[0])
        return {"tokens_per_s": tokens / (hi[0] - lo[0]), "tokens": tokens, "seconds": hi[0] - lo[0], "cpu_s": cpu,
                "tokens_per_cpu_s": tokens / cpu, "cores": cpu / (hi[0] - lo[0]),
                "end_to_end": summary["tokens_per_s"], "wall_s": summary["wall_time_s"]}

    # -------------------------------------------------------------------------------------------- part b
    def run_hop_bench(self, codecs: str, seconds: float, bulk_mib: float, tcp_only: bool = False) -> dict:
        d = self.cfg.data
        shape = f"{d.microbatch_size}x{d.seq_len}x{self.cfg.model.hidden_size}"
        out = self.out / "b" / ("tcp.json" if tcp_only else "hop.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [PY, str(ROOT / "scripts" / "bench_hop.py"), "--shapes", shape, "--codecs", codecs,
               "--seconds", str(seconds), "--max-iters", str(int(self.t(400, 150))), "--bulk-mib", str(bulk_mib),
               "--json", str(out)] + (["--tcp-only"] if tcp_only else [])
        procs = Procs(self.out / "b")
        try:
            procs.start("bench_hop" + ("_tcp" if tcp_only else ""), cmd, env={"OMP_NUM_THREADS": "1"})
            name = next(iter(procs.procs))
            if not procs.wait_exit([name], time.time() + self.t(300, 150)):
                raise PartTimeout("bench_hop.py did not finish in time")
        finally:
            procs.close()
        if procs.procs[name].returncode != 0:
            raise RuntimeError(f"bench_hop.py failed:\n{procs.tail(name)}")
        result = json.loads(out.read_text())
        self.bandwidth = result.get("tcp_bulk") or self.bandwidth
        return result

    def part_b(self) -> dict:
        codecs = ("none", "fp16", "8bit")
        hop = self.run_hop_bench(",".join(codecs), self.t(3.0, 1.0), self.t(8, 2))
        self.hop = hop
        rows = {r["codec"]: r for r in hop["rows"] if r["case"] == "call_forward"}
        tcp = next(r for r in hop["rows"] if r["case"] == "raw TCP")
        return {
            "ratios": {f"b.{c}": rows[c]["tensors_per_s"] / tcp["tensors_per_s"] for c in codecs},
            "figures": {"shape": tcp["shape"], "raw_tcp_tensors_per_s": tcp["tensors_per_s"],
                        **{f"{c}_tensors_per_s": rows[c]["tensors_per_s"] for c in codecs},
                        **{f"{c}_p50_ms": rows[c]["p50_ms"] for c in codecs},
                        "raw_tcp_p50_ms": tcp["p50_ms"], "chunk_bytes": hop["chunk_bytes"],
                        "tcp_bulk": hop.get("tcp_bulk")},
            "rows": hop["rows"],
            "definitions": {f"b.{c}": f"activation hops/s through call_forward (one {tcp['shape']} fp32 tensor out, "
                                      f"a same-shaped one back, forward/backward codec {c}, one call in flight, "
                                      f"server in another process) / hops/s of a raw loopback TCP echo of the same "
                                      f"tensor as fp32 bytes" for c in codecs},
        }

    # -------------------------------------------------------------------------------------------- part c
    C_STAGES = [("diloco", "fp32"), ("diloco", "fp16"), ("diloco", "8bit"), ("sync", "fp32")]

    def part_c(self) -> dict:
        S = len(self.C_STAGES)
        if self.cfg.model.num_layers < S:
            raise RuntimeError(f"part c needs a model with >= {S} layers")
        H = int(self.t(6, 4))
        steps = int(self.t(24, 12))
        deadline = time.time() + self.t(480, 240)
        run_dir = self.out / "c"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        common = [f"swarm.num_stages={S}", f"swarm.sync_every={H}", "run.eval_interval=0"]
        self.prepare_corpus(common)
        procs = Procs(run_dir)
        tracker = Tracker("bench-c", S, self.cfg.swarm.record_ttl, stages=())
        names = [f"s{s}p{p}" for s in reversed(range(S)) for p in range(2)]
        try:
            for s in reversed(range(S)):
                mode, codec = self.C_STAGES[s]
                for p in range(2):
                    extra = ["--max-steps", str(steps)] + (["--data-shard", f"{p}/2"] if s == 0 else [])
                    procs.start(f"s{s}p{p}", self.peer_args(
                        "bench-c", s, f"s{s}p{p}", run_dir, tracker.maddr,
                        [*common, f"swarm.sync_mode={mode}", f"swarm.compression.averaging={codec}"], extra))
            finished = procs.wait_exit(names, deadline)
        finally:
            killed = procs.close()  # SIGTERM first: a peer still in its final rounds writes its summary
            tracker.close()
        summaries = self.read_summaries(run_dir, names)
        self.summaries["c"] = summaries
        from swarm_peer.config import load_config
        from swarm_peer.model import build_stage

        cfg = load_config(self.config, [*self.overrides, *common])
        params = {s: sum(p.numel() for p in build_stage(cfg, s).parameters()) for s in range(S)}
        bs = self.cfg.data.batch_size
        per_stage = {}
        for s in range(S):
            mode, codec = self.C_STAGES[s]
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
        sync_stage = next(s for s in range(S) if self.C_STAGES[s][0] == "sync")
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

    # -------------------------------------------------------------------------------------------- d, e, f: one run
    def main_run(self) -> dict:
        """2 stages x 2 peers (DiLoCo, config defaults): warm up, steady window, kill -9 s1p1, watch stage 0 recover,
        start a replacement s1p2 (it downloads the stage state), stop everything with SIGTERM."""
        if "main" in self.results:
            return self.results["main"]
        if "main_error" in self.results:  # run once: parts d, e and f share it
            raise RuntimeError(f"the shared 2x2 run failed: {self.results['main_error']}")
        try:
            return self._main_run()
        except Exception as e:
            self.results["main_error"] = f"{type(e).__name__}: {e}"
            raise

    def _main_run(self) -> dict:
        ttl = self.cfg.swarm.record_ttl
        H = self.cfg.swarm.sync_every if not self.tiny else 5
        warm_steps = H + 2  # one outer round done before the steady window
        base_s = self.t(20, 10)
        # the dead peer's record expires (record_ttl) before the replacement starts; until then its stage mate may
        # still try to average with it
        obs_s = max(ttl + self.t(20, 6), self.t(25, 12))
        deadline = time.time() + self.t(420, 240)
        run_dir = self.out / "def"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        common = ["swarm.num_stages=2", f"swarm.sync_every={H}", "run.eval_interval=0"]
        self.prepare_corpus(common)
        procs = Procs(run_dir)
        tracker = Tracker("bench-def", 2, ttl, stages=(0, 1))
        info: dict = {"H": H, "record_ttl": ttl, "base_window_s": base_s, "observe_s": obs_s}
        try:
            start = lambda name, stage, extra=(): procs.start(name, self.peer_args(  # noqa: E731
                "bench-def", stage, name, run_dir, tracker.maddr, common, ["--max-steps", "1000000", *extra]))
            for p in range(2):
                start(f"s1p{p}", 1)
            for p in range(2):
                start(f"s0p{p}", 0, ["--data-shard", f"{p}/2"])
            for n in ("s1p0", "s1p1", "s0p0", "s0p1"):
                procs.wait_line(n, r"serving layers", deadline, "serving")
            log("4 peers serving")
            warm = lambda: len(tracker.peer_steps(0)) == 2 and min(tracker.peer_steps(0).values()) >= warm_steps  # noqa
            tracker.wait(warm, deadline, f"stage 0 at {warm_steps} steps", procs)
            log(f"stage 0 warmed up ({warm_steps} steps each); steady window {base_s:g} s")
            t_base0 = time.time()
            time.sleep(base_s)
            victim_id = (run_dir / "s1p1.maddrs").read_text().split()[0].split("/p2p/")[-1]
            t_kill = time.time()
            procs.kill("s1p1")
            info["t_kill"] = t_kill
            log(f"killed s1p1 (kill -9 of its process group); watching stage 0 for {obs_s:g} s")
            time.sleep(obs_s)
            t_join = time.time()
            start("s1p2", 1)
            t_serving = procs.wait_line("s1p2", r"serving layers", deadline, "the replacement serving")
            log(f"replacement s1p2 serving after {t_serving - t_join:.1f} s")
            time.sleep(2.0)
            info.update(join_start_to_serving_s=t_serving - t_join)
            series0, series1 = tracker.series(0), tracker.series(1)
            (run_dir / "timeline.json").write_text(json.dumps(
                {"t_base0": t_base0, "t_kill": t_kill, "t_join": t_join, "info": info, "stage0": series0,
                 "stage1": series1, "fields": ["t", "inner_step", "samples", "state", "round"]}))
        finally:
            # a peer stopped in the middle of an outer round finishes it first (up to swarm.averaging_timeout)
            killed = procs.close(grace=self.cfg.swarm.averaging_timeout + 20)
            tracker.close()
        names = ["s0p0", "s0p1", "s1p0", "s1p2"]
        summaries = self.read_summaries(run_dir, names)
        info["exit_codes"] = {n: procs.procs[n].returncode for n in [*names, "s1p1"]}
        self.summaries["def"] = summaries
        run = {"info": info, "series0": series0, "t_base0": t_base0, "t_kill": t_kill, "victim": victim_id,
               "summaries": summaries, "leftover_pids_killed": killed, "series1": series1}
        self.results["main"] = run  # parts d, e, f each use what they need from it
        return run

    def loopback_bandwidth(self) -> dict:
        if self.bandwidth is None:  # part b did not run: measure raw TCP alone
            self.run_hop_bench("", self.t(3.0, 1.0), self.t(8, 2), tcp_only=True)
        return self.bandwidth

    def part_d(self) -> dict:
        run = self.main_run()
        bw = self.loopback_bandwidth()
        if "s1p2" not in run["summaries"]:  # a peer writes its summary on SIGTERM before shutting hivemind down
            raise RuntimeError(f"no summary from the replacement s1p2 (exit codes {run['info']['exit_codes']}):\n"
                               + (self.out / "def" / "s1p2.log").read_text()[-3000:])
        joiner = run["summaries"]["s1p2"]
        joins = [r for r in joiner["sync"]["recoveries"] if r["reason"] == "joining the stage"]
        if not joins:
            raise RuntimeError(f"the replacement recorded no join download: {joiner['sync']['recoveries']}")
        j = joins[0]
        ideal = j["bytes"] / bw["bytes_per_s"]
        return {"ratios": {"d.join": j["seconds"] / ideal},
                "figures": {"join_seconds": j["seconds"], "state_bytes": j["bytes"], "donors": j["donors"],
                            "loopback_bytes_per_s": bw["bytes_per_s"], "loopback_payload_bytes": bw["bytes"],
                            "ideal_seconds": ideal,
                            "process_start_to_serving_s": run["info"]["join_start_to_serving_s"]},
                "definitions": {"d.join": "a replacement stage-1 peer's state download when joining (its "
                                          "sync.recoveries[0].seconds, reason 'joining the stage': request, download "
                                          "from the donors, hash check, load) / (downloaded state bytes / loopback "
                                          "bandwidth of one raw TCP stream, measured with a big echo payload)"}}

    def part_e(self) -> dict:
        run = self.main_run()
        s0, t_kill, t_b = run["series0"], run["t_kill"], run["t_base0"]
        base = t_kill - t_b
        steps_base = total_at(s0, t_kill, 1) - total_at(s0, t_b, 1)
        samples_base = total_at(s0, t_kill, 2) - total_at(s0, t_b, 2)
        if steps_base <= 0:
            raise RuntimeError("stage 0 made no step in the steady window")
        interval = base / steps_base  # stage-level: time between two inner steps of any stage-0 peer
        r0 = samples_base / base
        expected = r0 * 1 / 2  # stage 1 lost 1 of its 2 peers
        times = [t for t in event_times(s0) if t > t_kill]
        stall = longest_gap(s0, t_kill, t_kill + run["info"]["observe_s"])
        normal_gap = longest_gap(s0, t_b, t_kill)
        window = max(5 * interval, 2.0)
        obs_end = t_kill + run["info"]["observe_s"]
        # sustained recovery: from this reading on, every rolling-rate reading in the window stays >= 90 %
        recovered = None
        for t in [t for t in times if t_kill + window <= t <= obs_end]:
            ok = (total_at(s0, t, 2) - total_at(s0, t - window, 2)) / window >= 0.9 * expected
            recovered = (recovered or t) if ok else None
        half = (obs_end - t_kill) / 2
        r1 = (total_at(s0, obs_end, 2) - total_at(s0, obs_end - half, 2)) / half
        censored = recovered is None
        rec_s = (recovered if recovered is not None else obs_end) - t_kill  # >= window by construction
        seq = self.cfg.data.seq_len
        return {"ratios": {"e.stall": stall / interval, "e.stall_vs_pre_kill_gap": stall / normal_gap,
                           "e.recovery": rec_s / interval},
                "figures": {"step_interval_s": interval, "stall_s": stall, "pre_kill_longest_gap_s": normal_gap,
                            "recovery_s": rec_s,
                            "recovery_censored": censored, "rolling_window_s": window,
                            "recovery_window_start_s": rec_s - window,
                            "pre_kill_tokens_per_s": r0 * seq, "post_kill_tokens_per_s": r1 * seq,
                            "post_over_pre": r1 / r0, "expected_surviving_tokens_per_s": expected * seq,
                            "steady_window_s": base, "observe_s": run["info"]["observe_s"],
                            "announce_period_s": ANNOUNCE_PERIOD},
                "definitions": {
                    "e.stall": "longest time without any completed stage-0 inner step in the observation window "
                               "that starts at the kill -9 (whole process group of stage-1 peer s1p1, p2pd "
                               "included); steps are seen in the stage records (every 0.5 s: +-0.5 s) / normal step "
                               "interval (steady window before the kill / inner steps of all stage-0 peers in it)",
                    "e.stall_vs_pre_kill_gap": "the same longest gap / the longest gap in the steady window before "
                                               "the kill (DiLoCo rounds pause steps too)",
                    "e.recovery": "time from the kill until stage 0's rolling token rate (over the last W = "
                                  "max(5 step intervals, 2 s), all after the kill, so never below W) reads >= 90% of "
                                  "the expected surviving capacity (pre-kill rate x 1/2: stage 1 keeps 1 of 2 peers) "
                                  "and stays there to the end of the observation window / normal step interval"
                                  + (" (not reached: the observation window, a lower bound)" if censored else "")}}

    def part_f(self) -> dict:
        if not self.summaries:  # no swarm ran yet: a short 2-stage x 1-peer one
            self.swarm_line("f", 2, int(self.t(30, 12)), ["swarm.num_stages=2", "run.eval_interval=0"],
                            time.time() + self.t(300, 150))
        rows = []
        for run, peers in self.summaries.items():
            for name, s in peers.items():
                m = s.get("memory")
                if not m:
                    continue
                state = sum(m[k] for k in ("params_bytes", "grads_bytes", "inner_optimizer_bytes", "outer_state_bytes",
                                           "averaging_buffers_bytes", "inflight_activation_bytes"))
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


# ------------------------------------------------------------------------------------------------ report
def fmt(x) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, float):
        if x == 0 or math.isnan(x):
            return f"{x:g}"
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# swarm_peer benchmarks ({'tiny' if meta['tiny'] else 'full'})", "",
             f"{meta['started']}, {meta['cpus']} CPUs, load average {meta['loadavg_start']} at start, "
             f"{meta['loadavg_end']} at the end; config `{meta['config']}` {' '.join(meta['overrides']) or ''}; "
             f"{meta['seconds']:.0f} s. Every figure is a ratio of two measurements of this invocation; on a shared "
             f"machine they are indicative.", "",
             "| ratio | value | definition |", "|---|---:|---|"]
    for part, res in report["parts"].items():
        if "error" in res:
            lines.append(f"| {part} | **failed** | {res['error'].splitlines()[0][:200]} |")
            continue
        for name, value in res["ratios"].items():
            lines.append(f"| {name} | {fmt(value)} | {res['definitions'].get(name, '')} |")
    parts = report["parts"]
    if "ratios" in parts.get("a", {}):
        f = parts["a"]["figures"]
        sw, b, b1 = f["swarm_steady"], f["baseline_steady"], f["baseline_1_thread_steady"]
        lines += ["", f"**a.** steady tokens/s: swarm {fmt(sw['tokens_per_s'])} on {fmt(sw['cores'])} cores, baseline "
                  f"{fmt(b['tokens_per_s'])} on {fmt(b['cores'])} cores (1 thread: {fmt(b1['tokens_per_s'])} on "
                  f"{fmt(b1['cores'])}); tokens per CPU second: swarm {fmt(sw['tokens_per_cpu_s'])}, baseline "
                  f"{fmt(b['tokens_per_cpu_s'])} (1 thread: {fmt(b1['tokens_per_cpu_s'])}); end to end "
                  f"{fmt(f['swarm_end_to_end_tokens_per_s'])} vs {fmt(f['baseline_end_to_end_tokens_per_s'])}."]
    if "ratios" in parts.get("b", {}):
        lines += ["", "**b.** one hop = one tensor there and a same-shaped one back:", "",
                  "| case | shape | codec | hops/s | p50 ms | wire MiB/s | vs raw TCP |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for r in parts["b"]["rows"]:
            lines.append(f"| {r['case']} | {r['shape']} | {r['codec']} | {fmt(r['tensors_per_s'])} | "
                         f"{fmt(r['p50_ms'])} "
                         f"| {fmt(r['wire_mib_per_s']) if 'wire_mib_per_s' in r else '-'} | {fmt(r['ratio_to_tcp'])} |")
    if "ratios" in parts.get("c", {}):
        lines += ["", "**c.** one 4-stage x 2-peer run, one sync setting per stage:", "",
                  "| stage | mode | averaging | params | 2-peer rounds | inner steps/peer/round | "
                  "MiB sent/peer/round |",
                  "|---:|---|---|---:|---:|---:|---:|"]
        for s, st in parts["c"]["figures"]["stages"].items():
            lines.append(f"| {s} | {st['mode']} | {st['codec']} | {st['params']:,} | {st['rounds']} | "
                         f"{fmt(st['inner_steps_per_round'])} | {fmt(st['bytes_sent_per_round'] / 2**20)} |")
    if "ratios" in parts.get("d", {}):
        f = parts["d"]["figures"]
        lines += ["", f"**d.** join download {fmt(f['join_seconds'])} s for {fmt(f['state_bytes'] / 2**20)} MiB from "
                  f"{f['donors']} donor(s); loopback {fmt(f['loopback_bytes_per_s'] / 2**20)} MiB/s -> ideal "
                  f"{fmt(f['ideal_seconds'] * 1e3)} ms; process start to serving "
                  f"{fmt(f['process_start_to_serving_s'])} s."]
    if "ratios" in parts.get("e", {}):
        f = parts["e"]["figures"]
        lines += ["", f"**e.** stage-0 step interval {fmt(f['step_interval_s'])} s; longest gap without a step: "
                  f"{fmt(f['stall_s'])} s after the kill, {fmt(f['pre_kill_longest_gap_s'])} s in the steady window "
                  f"before; recovery {fmt(f['recovery_s'])} s{' (not reached)' if f['recovery_censored'] else ''} "
                  f"(rolling window {fmt(f['rolling_window_s'])} s); tokens/s before {fmt(f['pre_kill_tokens_per_s'])},"
                  f" in the 2nd half of the {fmt(f['observe_s'])} s after {fmt(f['post_kill_tokens_per_s'])} "
                  f"({fmt(f['post_over_pre'])} x)."]
    if "ratios" in parts.get("f", {}):
        lines += ["", "**f.** memory per peer:", "",
                  "| run | peer | mode | peak RSS MiB | state MiB | params | grads | inner opt | outer | avg buffers | "
                  "activations | RSS/state |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in parts["f"]["rows"]:
            mib = lambda k: fmt(r[k] / 2**20)  # noqa: E731
            lines.append(f"| {r['run']} | {r['peer']} | {r['mode']} | {mib('peak_rss_bytes')} | {mib('state_bytes')} | "
                         f"{mib('params_bytes')} | {mib('grads_bytes')} | {mib('inner_optimizer_bytes')} | "
                         f"{mib('outer_state_bytes')} | {mib('averaging_buffers_bytes')} | "
                         f"{mib('inflight_activation_bytes')} | {fmt(r['ratio'])} |")
    return "\n".join(lines) + "\n"


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model, short phases (the test uses it)")
    parser.add_argument("--only", default=PARTS, help="comma-separated parts (default: all of a,b,c,d,e,f)")
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
            res = getattr(bench, f"part_{part}")()
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
    (out / "bench.json").write_text(json.dumps(_json_safe(report), indent=1))
    md = markdown(report)
    (out / "bench.md").write_text(md)
    print(md)
    print(f"[bench] wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
