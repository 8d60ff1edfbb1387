"""Procs: the processes a benchmark starts, through swarm_peer.launch (own process groups, time-stamped output
lines, stopping in order), plus CPU sampling from /proc; install_signal_handlers() turns signals into SystemExit so
`finally` blocks stop what they started (also on Ctrl-C)."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from benchlib.common import ENV, ROOT, PartTimeout
from swarm_peer.launch import Launcher


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


class Procs(Launcher):
    """A benchmark's processes. With `sample_cpu`, a thread records every process group's CPU seconds every 0.25 s
    (`cpu_between`)."""

    def __init__(self, log_dir: Path, sample_cpu: bool = False):
        super().__init__(log_dir, env=ENV, cwd=ROOT)
        self.cpu: dict[str, list[tuple[float, float]]] = {}
        self._closed = threading.Event()
        if sample_cpu:
            t = threading.Thread(target=self._sample_cpu, daemon=True)
            t.start()
            self._threads.append(t)

    def _sample_cpu(self) -> None:
        while not self._closed.wait(0.25):
            running = {n: p.pid for n, p in self.procs.items() if p.poll() is None}
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

    def wait_line(self, name: str, pattern: str, deadline: float, what: str = "") -> float:
        try:
            return super().wait_line(name, pattern, deadline, what)
        except TimeoutError as e:
            raise PartTimeout(str(e)) from None

    def close(self, grace: float = 30.0) -> list[int]:
        self._closed.set()
        return super().close(grace)


def install_signal_handlers() -> None:
    """SIGTERM/SIGINT/SIGHUP raise SystemExit in the main thread: `finally` blocks stop what they started (and
    swarm_peer.launch's exit hook kills whatever a launcher still has running)."""
    def handler(signum, _frame):
        signal.signal(signum, signal.SIG_IGN)  # a second signal must not interrupt the cleanup
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)
