"""A watchdog that takes a process's children down with it, even when the process dies by kill -9.

hivemind forks the DHT and every `DecentralizedAverager` into processes of their own; the DHT process starts the Go
`p2pd`. When the main process is SIGKILLed (the kernel's OOM killer does that) nothing tells them: re-parented to
init, they keep their ports and memory for ever. `start_reaper()`, called before the DHT is created, starts
`python -m swarm_peer.reaper PID` in the same process group; it tracks PID's descendants and, once PID is gone
(killed or exited), SIGTERMs those still running and SIGKILLs them after a short grace. Second line of defence:
children forked by the main thread get PR_SET_PDEATHSIG=SIGKILL. Linux only (/proc, prctl); a no-op elsewhere.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("swarm_peer")
PR_SET_PDEATHSIG = 1
_reaper: subprocess.Popen | None = None


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time in clock ticks after boot) of a live process; None if gone or a zombie. (pid, start time)
    names one process: a PID can be reused, its start time then differs."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)  # not open(): a full scan reads hundreds of these
        try:
            fields = os.read(fd, 4096).rsplit(b")", 1)[1].split()  # the command name may hold spaces and ")"
        finally:
            os.close(fd)
        return None if fields[0] == b"Z" else (int(fields[1]), int(fields[19]))
    except (OSError, IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    return (_stat(pid) or (0, None))[1]


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, start time) of every live process."""
    return {int(name): stat for name in os.listdir("/proc") if name.isdigit() and (stat := _stat(int(name)))}


def descendants(root: int, table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """pid -> start time of every descendant of `root` in `table`."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            if pid not in found:
                found[pid] = table[pid][1]
                todo.append(pid)
    return found


def signal_if_same(pid: int, start: int, sig: int) -> bool:
    """Send `sig` to `pid` unless it has exited or its PID now names another process; True if sent."""
    if start_time(pid) != start:
        return False
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def reap(procs: dict[int, int], grace: float = 2.0) -> None:
    """SIGTERM `procs` (pid -> start time), wait up to `grace` s, SIGKILL what is left (p2pd gets to clean up)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        procs = {p: s for p, s in procs.items() if signal_if_same(p, s, sig)}
        deadline = time.monotonic() + grace
        while procs and time.monotonic() < deadline:
            time.sleep(0.05)
            procs = {p: s for p, s in procs.items() if start_time(p) == s}


def watch(main_pid: int, period: float = 0.5) -> None:
    # a terminal's Ctrl-C goes to the whole foreground group: the main process handles it, we wait for it to exit
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    me, known, every, next_look = os.getpid(), {}, period, 0.0
    while os.getppid() == main_pid:  # re-parented once the main process is gone
        if time.monotonic() >= next_look:
            table = process_table()
            # keep descendants orphaned meanwhile (a p2pd whose DHT process crashed): they are still ours
            fresh = {p: s for p, s in known.items() if table.get(p, (0, None))[1] == s}
            fresh.update(descendants(main_pid, table))
            fresh.pop(me, None)
            # a scan costs ~25 us a process: look less often while nothing changes (PDEATHSIG covers the forks of
            # the main thread meanwhile; children of known descendants are found at the end)
            every = period if fresh != known else min(8 * period, 2 * every)
            known, next_look = fresh, time.monotonic() + every
        time.sleep(period)
    table = process_table()
    known = {p: s for p, s in known.items() if table.get(p, (0, None))[1] == s}  # not a reused PID's children
    for pid in list(known):  # born since the last look to a known descendant (the p2pd of a new DHT process)
        known.update(descendants(pid, table))
    known.pop(me, None)
    reap(known)


def _mark_forks() -> None:
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    main_pid, main_thread = os.getpid(), threading.main_thread().ident

    def in_child() -> None:
        # the kernel sends the signal when the *thread* that forked the child ends: only the main thread's forks
        if os.getppid() == main_pid and threading.get_ident() == main_thread:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != main_pid:  # the main process died before prctl took effect
                os._exit(1)

    os.register_at_fork(after_in_child=in_child)


def start_reaper() -> None:
    """Start this process's reaper (a second call does nothing); must run before the DHT process is forked."""
    global _reaper
    if _reaper is not None or not sys.platform.startswith("linux"):
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # importable wherever the caller runs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:  # same process group (no new session): whoever kills the group kills the reaper too
        _reaper = subprocess.Popen([sys.executable, "-m", "swarm_peer.reaper", str(os.getpid())], env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    except OSError as e:
        log.warning(f"cannot start the child reaper ({e}): on kill -9 this process's children would outlive it")
        return
    _mark_forks()


if __name__ == "__main__":
    watch(int(sys.argv[1]))
