"""Procs: the processes a benchmark starts, each in its own process group (its DHT process and p2pd are in it), with
time-stamped output lines, optional CPU sampling from /proc, and stopping by process group (SIGTERM, then SIGKILL),
also on Ctrl-C: install_signal_handlers() turns signals into SystemExit so `finally` blocks run."""
from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from benchlib.common import ENV, ROOT, PartTimeout


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
        log_file = open(self.log_dir / f"{name}.log", "w")
        proc = subprocess.Popen([*prefix, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, **ENV, **(env or {})}, text=True, errors="replace")
        self.procs[name], self.lines[name], self.started_at[name] = proc, [], time.time()

        def pump():
            with log_file:
                for line in proc.stdout:
                    self.lines[name].append((time.time(), line.rstrip("\n")))
                    log_file.write(line)
                    log_file.flush()

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
