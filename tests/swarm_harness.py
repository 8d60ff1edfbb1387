"""Start real peers as separate OS processes on loopback, and always clean them up (p2pd included)."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from swarm_peer.launch import Launcher, LaunchError, group_pids, monitor_args, peer_args  # noqa: F401 (group_pids:
# for the tests)
from tests.conftest import PYTHON, ROOT

FAULT_PEER = str(ROOT / "tests" / "fault_peer.py")  # test-only faults (its docstring)

# a small, fast model: every multi-process test uses it unless it says otherwise
FAST = ["model.hidden_size=64", "model.num_heads=4", "model.num_layers=4", "model.max_position_embeddings=64",
        "data.seq_len=32", "data.batch_size=8", "data.microbatch_size=2", "data.max_tokens=200000",
        "run.threads=1", "optim.inner.warmup_steps=2", "swarm.announce_period=0.5", "swarm.record_ttl=6",
        "swarm.matchmaking_time=2", "swarm.averaging_timeout=30", "swarm.averaging_chunk_timeout=5"]


class Swarm:
    """Peers of one run, started by swarm_peer.launch (each in its own process group: its DHT process and p2pd are
    in it)."""

    def __init__(self, tmp: Path, run_id: str, overrides: list[str], cache_dir: str):
        self.tmp, self.run_id = tmp, run_id
        self.overrides = [*FAST, f"data.cache_dir={cache_dir}", *overrides]
        self.launcher = Launcher(tmp)
        self.bootstrap: str | None = None

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        return self.launcher.procs

    def start(self, name: str, stage: int, *extra: str, env: dict | None = None, host: str = "127.0.0.1",
              prefix: tuple = (), faults: str = "") -> subprocess.Popen:
        """`prefix`: run the peer under e.g. ("ip", "netns", "exec", NS); `host`: the address it listens on; `faults`:
        test-only faults (tests/fault_peer.py's SWARM_TEST_FAULTS, e.g. "slow=0.25")."""
        env = dict(env or {})
        if faults:
            env["SWARM_TEST_FAULTS"] = ",".join(f for f in (env.get("SWARM_TEST_FAULTS", ""), faults) if f)
        args = peer_args(stage, self.run_id, maddrs_file=self.tmp / f"{name}.maddrs", overrides=self.overrides,
                         initial_peers=self.bootstrap, host=host, summary_json=self.tmp / f"{name}.json", extra=extra)
        if env.get("SWARM_TEST_FAULTS") and FAULT_PEER not in prefix:  # the faults module starts the peer
            prefix = (*prefix, PYTHON, FAULT_PEER)
        return self.launcher.start(name, args, prefix=prefix, env=env)

    def begin_together(self, names, go, timeout: float = 120) -> None:
        """Touch `go` once every named peer (started with faults=f"hold_until={go}") serves: stage-0 peers started
        at once then begin training together, however long each took to start on a loaded machine."""
        deadline = time.monotonic() + timeout
        while not all("serving layers" in self.log(n) for n in names):
            assert time.monotonic() < deadline, {n: self.log(n)[-2000:] for n in names}
            time.sleep(0.2)
        go.touch()

    def start_monitor(self, name: str, *extra: str) -> subprocess.Popen:
        """The monitor peer (`python -m swarm_peer monitor --until-done`), its rows also in `{name}.jsonl`."""
        return self.launcher.start(name, monitor_args(self.run_id, overrides=self.overrides,
                                                      initial_peers=self.bootstrap,
                                                      history_json=self.tmp / f"{name}.jsonl", extra=extra))

    def history(self, name: str) -> list[dict]:
        import json

        path = self.tmp / f"{name}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def wait_ready(self, name: str, timeout: float = 90) -> str:
        try:
            maddr = self.launcher.wait_file(name, self.tmp / f"{name}.maddrs", timeout)
        except LaunchError as e:
            raise AssertionError(str(e)) from None
        self.bootstrap = self.bootstrap or maddr
        return maddr

    def wait_exit(self, name: str, timeout: float) -> int:
        try:
            return self.launcher.wait_exit(name, timeout)
        except LaunchError as e:
            raise AssertionError(str(e)) from None

    def kill(self, name: str) -> None:
        """kill -9 the peer and its whole group (its DHT process and p2pd die with it, as on a crashed host)."""
        self.launcher.kill(name)

    def log(self, name: str) -> str:
        return self.launcher.log(name)

    def peer_id(self, name: str) -> str:
        return (self.tmp / f"{name}.maddrs").read_text().split()[0].split("/p2p/")[-1]

    def summary(self, name: str) -> dict:
        import json

        return json.loads((self.tmp / f"{name}.json").read_text())

    def cleanup(self) -> list[int]:
        """Stop everything (SIGTERM: a peer shuts its DHT and p2pd down); returns PIDs that had to be killed."""
        return self.launcher.close(grace=20.0)
