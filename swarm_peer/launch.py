"""Start processes of a local swarm and stop them whole: the one launcher behind run_local_experiment.sh (local.py),
the tests, the benchmarks and the experiments.

Each process gets its own session (process group: its DHT process and p2pd are in it), its output a log file, a list
of time-stamped lines and, optionally, the launcher's console with a `[name]` prefix. Stopping asks each main
process first (SIGTERM: a peer writes its checkpoint and summary and shuts hivemind down in order) and only then
kills what is left of the group: a signal to the whole group at once killed the DHT child under the peer, which then
hung publishing its last record.
"""
from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


class LaunchError(RuntimeError):
    """A process died or was not ready in time (the message carries the tail of its log)."""


def group_pids(pgid: int) -> list[int]:
    """Every live process of process group `pgid` (zombies excluded: they are gone but for their exit status)."""
    out = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def peer_args(stage: int, run_id: str, *, maddrs_file: Path, config: str | None = None, overrides=(),
              initial_peers: str | None = None, host: str = "127.0.0.1", summary_json: Path | None = None,
              extra=()) -> list[str]:
    """The command line of one stage peer (`python -m swarm_peer --stage N ...`)."""
    args = [PYTHON, "-m", "swarm_peer", "--stage", str(stage), "--run-id", run_id, "--host-maddrs",
            f"/ip4/{host}/tcp/0", "--maddrs-file", str(maddrs_file)]
    args += ["--config", config] if config else []
    args += ["--summary-json", str(summary_json)] if summary_json else []
    for o in overrides:
        args += ["--set", o]
    args += ["--initial-peers", initial_peers] if initial_peers else []
    return [*args, *extra]


def monitor_args(run_id: str, *, config: str | None = None, overrides=(), initial_peers: str | None = None,
                 maddrs_file: Path | None = None, history_json: Path | None = None, extra=()) -> list[str]:
    """The command line of a monitor peer that exits once every peer has finished (`--until-done`)."""
    args = [PYTHON, "-m", "swarm_peer", "monitor", "--run-id", run_id, "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
            "--until-done"]
    args += ["--config", config] if config else []
    args += ["--initial-peers", initial_peers] if initial_peers else []
    args += ["--maddrs-file", str(maddrs_file)] if maddrs_file else []
    args += ["--history-json", str(history_json)] if history_json else []
    for o in overrides:
        args += ["--set", o]
    return [*args, *extra]


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path
    started_at: float
    lines: list[tuple[float, str]] = field(default_factory=list)  # (time.time(), line) as they came


class Launcher:
    """The processes one run started. `echo`: copy every output line to this console as `[name] line`."""

    live: list["Launcher"] = []  # for the emergency cleanup at interpreter exit

    def __init__(self, log_dir: Path, echo: bool = False, env: dict | None = None, cwd: Path = ROOT):
        self.log_dir, self.echo, self.env, self.cwd = Path(log_dir), echo, dict(env or {}), cwd
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, Process] = {}
        self._threads: list[threading.Thread] = []
        self._echo_lock = threading.Lock()
        Launcher.live.append(self)

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        return {name: p.popen for name, p in self.processes.items()}

    @property
    def lines(self) -> dict[str, list[tuple[float, str]]]:
        return {name: p.lines for name, p in self.processes.items()}

    # ---- starting
    def start(self, name: str, args: list[str], prefix: tuple = (), env: dict | None = None,
              label: str | None = None) -> subprocess.Popen:
        """Start `prefix + args` in its own session; `label`: its console prefix (default: the name)."""
        log_path = self.log_dir / f"{name}.log"
        popen = subprocess.Popen([*prefix, *args], cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True, text=True, errors="replace",
                                 env={**os.environ, "HIVEMIND_LOGLEVEL": "WARNING", "PYTHONUNBUFFERED": "1", **self.env,
                                      **(env or {})})
        proc = self.processes[name] = Process(name, popen, log_path, time.time())
        tag = f"[{label or name}]"
        thread = threading.Thread(target=self._pump, args=(proc, tag), daemon=True)
        thread.start()
        self._threads.append(thread)
        return popen

    def _pump(self, proc: Process, tag: str) -> None:
        with open(proc.log_path, "w") as log:
            for line in proc.popen.stdout:
                line = line.rstrip("\n")
                proc.lines.append((time.time(), line))
                log.write(line + "\n")
                log.flush()
                if self.echo:
                    with self._echo_lock:
                        print(line if line.startswith(tag) else f"{tag} {line}", flush=True)

    # ---- waiting
    def wait_file(self, name: str, path: Path, timeout: float) -> str:
        """The first word of `path` once the process has written it (a peer's --maddrs-file: it is ready)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().strip():
                return path.read_text().split()[0]
            if self.processes[name].popen.poll() is not None:
                time.sleep(0.3)  # let the pump catch up with the last lines
                raise LaunchError(f"{name} died at startup (exit {self.processes[name].popen.returncode}):\n"
                                  f"{self.tail(name)}")
            time.sleep(0.1)
        raise LaunchError(f"{name} not ready after {timeout:g}s:\n{self.tail(name)}")

    def find(self, name: str, pattern: str, after: float = 0.0) -> tuple[float, re.Match] | None:
        rx = re.compile(pattern)
        for t, line in list(self.processes[name].lines):
            if t >= after and (m := rx.search(line)):
                return t, m
        return None

    def wait_line(self, name: str, pattern: str, deadline: float, what: str = "") -> float:
        """time.time() of the first output line matching `pattern`; `deadline` is a time.time()."""
        while True:
            if found := self.find(name, pattern):
                return found[0]
            popen = self.processes[name].popen
            if popen.poll() is not None:
                time.sleep(0.3)
                if found := self.find(name, pattern):
                    return found[0]
                raise LaunchError(f"{name} exited ({popen.returncode}) before {what or pattern!r}:\n{self.tail(name)}")
            if time.time() > deadline:
                raise TimeoutError(f"{name}: no {what or pattern!r} in time:\n{self.tail(name)}")
            time.sleep(0.2)

    def wait_exit(self, name: str, timeout: float) -> int:
        try:
            return self.processes[name].popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise LaunchError(f"{name} still running after {timeout:g}s:\n{self.tail(name)}") from None

    def wait_all(self, names, deadline: float) -> bool:
        """Did every one of `names` exit by `deadline` (a time.time())?"""
        for name in names:
            try:
                self.processes[name].popen.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def tail(self, name: str, n: int = 40) -> str:
        return "\n".join(line for _, line in list(self.processes[name].lines)[-n:])

    def log(self, name: str) -> str:
        """The whole output so far (the pump writes the log file as lines come)."""
        return "\n".join(line for _, line in list(self.processes[name].lines))

    def running(self) -> list[str]:
        return [n for n, p in self.processes.items() if p.popen.poll() is None]

    # ---- stopping
    def kill(self, name: str) -> None:
        """kill -9 the process and its whole group, as on a crashed host (its DHT process and p2pd die with it)."""
        try:
            os.killpg(self.processes[name].popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.processes[name].popen.wait(10)

    def ask_to_stop(self, names=None, sig: int = signal.SIGTERM) -> None:
        """Signal the main process of each (not its group: it shuts its own children down in order)."""
        for name in self.running() if names is None else names:
            try:
                self.processes[name].popen.send_signal(sig)
            except ProcessLookupError:
                pass

    def stop(self, names=None, grace: float = 30.0) -> list[int]:
        """Ask each process to stop, wait up to `grace` seconds for it, then kill what is left of its group.
        Returns the PIDs that had to be killed."""
        names = list(self.processes) if names is None else list(names)
        self.ask_to_stop([n for n in names if self.processes[n].popen.poll() is None])
        deadline = time.monotonic() + grace
        for name in names:
            try:
                self.processes[name].popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        children_deadline = min(deadline, time.monotonic() + 5.0)  # a DHT child and p2pd exit just after their peer
        while time.monotonic() < children_deadline and any(group_pids(self.processes[n].popen.pid) for n in names):
            time.sleep(0.2)
        killed = []
        for name in names:
            pid = self.processes[name].popen.pid
            killed += group_pids(pid)
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.processes[name].popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        return killed

    def close(self, grace: float = 30.0) -> list[int]:
        """Stop everything and join the output pumps. Returns the PIDs that had to be killed."""
        killed = self.stop(grace=grace)
        for thread in self._threads:
            thread.join(2)
        if self in Launcher.live:
            Launcher.live.remove(self)
        return killed


@atexit.register
def _emergency_cleanup() -> None:
    """An interpreter that exits with processes still running (an exception, a test runner's interrupt) takes them
    down with it: nothing a launcher started may outlive it."""
    for launcher in list(Launcher.live):
        for proc in launcher.processes.values():
            try:
                os.killpg(proc.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
