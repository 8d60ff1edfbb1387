"""Start real peers as separate OS processes on loopback, and always clean them up (p2pd included)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import PYTHON, ROOT

FAULT_PEER = str(ROOT / "tests" / "fault_peer.py")  # test-only faults (its docstring)

# a small, fast model: every multi-process test uses it unless it says otherwise
FAST = ["model.hidden_size=64", "model.num_heads=4", "model.num_layers=4", "model.max_position_embeddings=64",
        "data.seq_len=32", "data.batch_size=8", "data.microbatch_size=2", "data.max_tokens=200000",
        "run.threads=1", "optim.inner.warmup_steps=2", "swarm.announce_period=0.5", "swarm.record_ttl=6",
        "swarm.matchmaking_time=2", "swarm.averaging_timeout=30", "swarm.averaging_chunk_timeout=5"]


def group_pids(pgid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


class Swarm:
    """Peers of one run. Each peer gets its own session (process group): its DHT process and p2pd are in it."""

    def __init__(self, tmp: Path, run_id: str, overrides: list[str], cache_dir: str):
        self.tmp, self.run_id = tmp, run_id
        self.overrides = [*FAST, f"data.cache_dir={cache_dir}", *overrides]
        self.procs: dict[str, subprocess.Popen] = {}
        self.bootstrap: str | None = None

    def start(self, name: str, stage: int, *extra: str, env: dict | None = None, host: str = "127.0.0.1",
              prefix: tuple = (), faults: str = "") -> subprocess.Popen:
        """`prefix`: run the peer under e.g. ("ip", "netns", "exec", NS); `host`: the address it listens on; `faults`:
        test-only faults (tests/fault_peer.py's SWARM_TEST_FAULTS, e.g. "slow=0.25")."""
        env = dict(env or {})
        if faults:
            env["SWARM_TEST_FAULTS"] = ",".join(f for f in (env.get("SWARM_TEST_FAULTS", ""), faults) if f)
        if env.get("SWARM_TEST_FAULTS") and FAULT_PEER not in prefix:
            prefix = (*prefix, PYTHON, FAULT_PEER)
        args = [*prefix, PYTHON, "-m", "swarm_peer", "--stage", str(stage), "--run-id", self.run_id,
                "--host-maddrs", f"/ip4/{host}/tcp/0", "--maddrs-file", str(self.tmp / f"{name}.maddrs"),
                "--summary-json", str(self.tmp / f"{name}.json")]
        for o in self.overrides:
            args += ["--set", o]
        if self.bootstrap:
            args += ["--initial-peers", self.bootstrap]
        args += list(extra)
        log = open(self.tmp / f"{name}.log", "w")
        env = {**os.environ, "HIVEMIND_LOGLEVEL": "WARNING", **env}
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
        self.procs[name] = proc
        return proc

    def start_monitor(self, name: str, *extra: str) -> subprocess.Popen:
        """The monitor peer (`python -m swarm_peer monitor --until-done`), its rows also in `{name}.jsonl`."""
        args = [PYTHON, "-m", "swarm_peer", "monitor", "--run-id", self.run_id, "--initial-peers", self.bootstrap,
                "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--until-done", "--history-json",
                str(self.tmp / f"{name}.jsonl"), *extra]
        for o in self.overrides:
            args += ["--set", o]
        log = open(self.tmp / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, env=os.environ.copy())
        return self.procs[name]

    def history(self, name: str) -> list[dict]:
        import json

        path = self.tmp / f"{name}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def wait_ready(self, name: str, timeout: float = 90) -> str:
        path = self.tmp / f"{name}.maddrs"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().strip():
                maddr = path.read_text().split()[0]
                self.bootstrap = self.bootstrap or maddr
                return maddr
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} died at startup:\n{self.log(name)[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{name} not ready after {timeout}s:\n{self.log(name)[-3000:]}")

    def wait_exit(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout}s:\n{self.log(name)[-3000:]}")

    def kill(self, name: str) -> None:
        """kill -9 the peer and its whole group (its DHT process and p2pd die with it, as on a crashed host)."""
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(10)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def peer_id(self, name: str) -> str:
        return (self.tmp / f"{name}.maddrs").read_text().split()[0].split("/p2p/")[-1]

    def summary(self, name: str) -> dict:
        import json

        return json.loads((self.tmp / f"{name}.json").read_text())

    def cleanup(self) -> list[int]:
        """Stop everything; returns PIDs that survived (should be none)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()  # the peer's own SIGTERM handler shuts its DHT and p2pd down
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while time.monotonic() < deadline and any(group_pids(p.pid) for p in self.procs.values()):
            time.sleep(0.2)  # children may take a moment to finish exiting after their parent
        leftovers = []
        for proc in self.procs.values():
            for pid in group_pids(proc.pid):
                leftovers.append(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return leftovers
