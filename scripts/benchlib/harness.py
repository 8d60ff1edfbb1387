"""Bench: one scripts/bench.py invocation's settings (config, overrides, tiny or full phases) and what its parts hand
each other (peer summaries for part f, the loopback bandwidth for part d, the shared 2x2 run), plus the runs more
than one part uses: a line of S stages x 1 peer, the single-process baseline, and scripts/bench_hop.py."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from benchlib.common import PEER_OVERRIDES, PY, ROOT, TINY_OVERRIDES, PartTimeout, peer_command, progress_steps, \
    read_summaries
from benchlib.procs import Procs
from benchlib.tracker import Tracker


class Bench:
    def __init__(self, args):
        self.args, self.tiny = args, args.tiny
        self.out = Path(args.out)
        self.config = args.config
        self.overrides = (TINY_OVERRIDES if self.tiny else []) + list(args.overrides)
        from swarm_peer.config import load_config

        self.cfg = load_config(self.config, self.overrides)
        self.summaries: dict[str, dict[str, dict]] = {}  # run -> peer name -> summary (for part f)
        self.bandwidth: dict | None = None  # raw TCP bulk figure of bench_hop.py (for part d)
        self.shared_run: dict | None = None  # the 2x2 run of parts d, e (churn.shared_run)
        self.shared_run_error: str | None = None

    def sized(self, full: float, tiny: float) -> float:
        """A phase length or step count: `tiny` under --tiny, else `full`."""
        return tiny if self.tiny else full

    def peer_args(self, run_id: str, stage: int, name: str, run_dir: Path, bootstrap: str, overrides=(),
                  extra=()) -> list[str]:
        return peer_command(self.config, run_id, stage, name, run_dir, [*self.overrides, *PEER_OVERRIDES, *overrides],
                            bootstrap, extra)

    def prepare_corpus(self, overrides=()) -> None:
        """Tokenize/cache the corpus once here, so peers starting together do not all build it."""
        from swarm_peer.config import load_config
        from swarm_peer.data import load_corpus

        load_corpus(load_config(self.config, [*self.overrides, *overrides]))

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
            if not procs.wait_all(names, deadline):
                raise PartTimeout(f"the {S}-stage swarm did not finish {steps} steps in time")
            series = tracker.series(0)
        finally:
            killed = procs.close()
            tracker.close()
        bad = {n: p.returncode for n, p in procs.procs.items() if p.returncode != 0}
        if bad:
            raise RuntimeError(f"swarm peers failed: {bad}\n" + "\n".join(procs.tail(n) for n in bad))
        summaries = read_summaries(run_dir, names)
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
            if not procs.wait_all([name], deadline):
                raise PartTimeout(f"{name} did not finish in time")
        finally:
            procs.close()
        if procs.procs[name].returncode != 0:
            raise RuntimeError(f"{name} failed:\n{procs.tail(name)}")
        summary = json.loads(base_json.read_text())
        # its "step k/N  x% | ... tok/s" lines (every run.log_interval steps), time-stamped as they arrived
        points = progress_steps(procs.lines[name], r"step\s+(\d+)/\d+ ")
        lo = next(p for p in points if p[1] >= 0.2 * steps)
        hi = next(p for p in points if p[1] >= 0.9 * steps)
        tokens = (hi[1] - lo[1]) * self.cfg.data.batch_size * self.cfg.data.seq_len
        cpu = procs.cpu_between([name], lo[0], hi[0])
        return {"tokens_per_s": tokens / (hi[0] - lo[0]), "tokens": tokens, "seconds": hi[0] - lo[0], "cpu_s": cpu,
                "tokens_per_cpu_s": tokens / cpu, "cores": cpu / (hi[0] - lo[0]),
                "end_to_end": summary["tokens_per_s"], "wall_s": summary["wall_time_s"]}

    def run_hop_bench(self, codecs: str, seconds: float, bulk_mib: float, tcp_only: bool = False) -> dict:
        """scripts/bench_hop.py on this config's activation shape; keeps its raw TCP bulk figure (the loopback
        bandwidth part d divides by)."""
        d = self.cfg.data
        shape = f"{d.microbatch_size}x{d.seq_len}x{self.cfg.model.hidden_size}"
        out = self.out / "b" / ("tcp.json" if tcp_only else "hop.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [PY, str(ROOT / "scripts" / "bench_hop.py"), "--shapes", shape, "--codecs", codecs,
               "--seconds", str(seconds), "--max-iters", str(int(self.sized(400, 150))), "--bulk-mib", str(bulk_mib),
               "--json", str(out)] + (["--tcp-only"] if tcp_only else [])
        name = "bench_hop" + ("_tcp" if tcp_only else "")
        procs = Procs(self.out / "b")
        try:
            procs.start(name, cmd, env={"OMP_NUM_THREADS": "1"})
            if not procs.wait_all([name], time.time() + self.sized(300, 150)):
                raise PartTimeout("bench_hop.py did not finish in time")
        finally:
            procs.close()
        if procs.procs[name].returncode != 0:
            raise RuntimeError(f"bench_hop.py failed:\n{procs.tail(name)}")
        result = json.loads(out.read_text())
        self.bandwidth = result.get("tcp_bulk") or self.bandwidth
        return result

    def loopback_bandwidth(self) -> dict:
        if self.bandwidth is None:  # part b did not run: measure raw TCP alone
            self.run_hop_bench("", self.sized(3.0, 1.0), self.sized(8, 2), tcp_only=True)
        return self.bandwidth
