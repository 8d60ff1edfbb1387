"""kill -9 of a peer's main process (the OOM killer) must not leave its DHT process, p2pd or averager running."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import PYTHON, ROOT
from tests.swarm_harness import group_pids

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reaper works on Linux only")


def cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_group_empty(pgid: int, timeout: float) -> tuple[list[int], float]:
    """Wait until nothing of process group `pgid` is left; returns (what is left, seconds waited)."""
    t0 = time.monotonic()
    while (left := group_pids(pgid)) and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
    return left, time.monotonic() - t0


def kill_group(pgid: int) -> None:
    for pid in group_pids(pgid):  # leftovers of a failed test, by PID
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# A dummy "main process": starts the reaper (twice: the second call is a no-op), a child `sh` with a `sleep`
# grandchild, forks a child from the main thread and one from another thread (which report their parent-death
# signal), then waits to be killed, or exits normally when told to.
DUMMY = r"""
import ctypes, os, subprocess, sys, threading, time
from swarm_peer.reaper import start_reaper
start_reaper(); start_reaper()
subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300"])
def fork_and_report(tag):
    if os.fork() == 0:
        sig = ctypes.c_int(-1)
        ctypes.CDLL(None).prctl(2, ctypes.byref(sig))  # PR_GET_PDEATHSIG
        os.write(1, f"{tag} pdeathsig {sig.value}\n".encode())  # one write: the two children run at once
        time.sleep(300)
        os._exit(0)
fork_and_report("main-thread")
t = threading.Thread(target=fork_and_report, args=("other-thread",)); t.start(); t.join()
time.sleep(2.5)  # the reaper sees every descendant within a second
print("ready", flush=True)
if sys.argv[1] == "exit":
    sys.exit(0)
time.sleep(300)
"""


def start_dummy(mode: str) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([PYTHON, "-c", DUMMY, mode], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    lines = []
    while (line := proc.stdout.readline()) and line.strip() != "ready":
        lines.append(line.strip())
    return proc, lines


@pytest.mark.parametrize("mode", ["kill", "exit"])
def test_reaper_kills_descendants_when_main_process_goes(mode):
    proc, lines = start_dummy(mode)
    try:
        assert sorted(lines) == [f"main-thread pdeathsig {int(signal.SIGKILL)}", "other-thread pdeathsig 0"]
        pids = group_pids(proc.pid)
        reapers = [p for p in pids if "-m swarm_peer.reaper" in cmdline(p)]
        sleeps = [p for p in pids if cmdline(p).startswith("sleep")]
        assert len(reapers) == 1 and len(sleeps) == 2, [cmdline(p) for p in pids]
        if mode == "kill":
            os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == (-signal.SIGKILL if mode == "kill" else 0)
        left, waited = wait_group_empty(proc.pid, 10)
        assert not left, f"left after {waited:.1f}s: {[cmdline(p) for p in left]}"
        assert waited < 6
    finally:
        kill_group(proc.pid)


def test_process_table_descendants_and_pid_reuse_guard():
    from swarm_peer import reaper

    table = reaper.process_table()
    me = os.getpid()
    assert table[me][1] == reaper.start_time(me) is not None
    # a PID whose start time changed (reused by another process) is never signalled
    assert not reaper.signal_if_same(me, table[me][1] + 1, 0)
    assert reaper.signal_if_same(me, table[me][1], 0)
    assert reaper.descendants(1, {2: (1, 5), 3: (2, 6), 4: (9, 7)}) == {2: 5, 3: 6}


@pytest.mark.slow
def test_kill_9_of_peer_leaves_no_children(swarm_factory):
    """The kernel's OOM killer sends SIGKILL to the main process only: its hivemind children must follow it."""
    swarm = swarm_factory("reap", ["swarm.num_stages=2"])  # sync_mode diloco (default): the peer has an averager
    peer = swarm.start("s1", 1)
    swarm.wait_ready("s1")
    deadline = time.monotonic() + 90
    while "serving layers" not in swarm.log("s1"):  # the averager is up by then
        assert peer.poll() is None and time.monotonic() < deadline, swarm.log("s1")[-3000:]
        time.sleep(0.2)
    pids = group_pids(peer.pid)
    forks = [p for p in pids if p != peer.pid and cmdline(p) == cmdline(peer.pid)]  # the DHT and averager processes
    p2pd = [p for p in pids if "p2pd" in cmdline(p)]
    assert len(forks) >= 2 and len(p2pd) == 1, [cmdline(p) for p in pids]
    os.kill(peer.pid, signal.SIGKILL)  # the main process only, not its group
    peer.wait(10)
    left, waited = wait_group_empty(peer.pid, 30)
    print(f"peer's group empty {waited:.1f}s after kill -9 of its main process")
    assert not left, f"left after {waited:.0f}s: {[cmdline(p)[:120] for p in left]}"
    # nor its shared-memory tensors (the outer state, the averaging buffers): with torch's file_system sharing,
    # which hivemind picks by default, each is a /dev/shm file that outlives a killed process (RAM lost until reboot)
    leaked = [f for f in os.listdir("/dev/shm") if any(f.startswith(f"torch_{pid}_") for pid in pids)]
    assert not leaked, f"{len(leaked)} shared-memory files of the killed peer left in /dev/shm: {leaked[:5]}"
