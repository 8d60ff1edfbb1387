"""An emulated WAN for scripts/bench_wan.py: a "switch" network namespace holding a bridge, and one namespace per peer
joined to it by a veth pair with a tbf rate limit on both ends; preflight() says whether this machine can do it,
link_check() measures what a TCP stream gets through two such links."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from benchlib.common import PY, PartTimeout
from benchlib.procs import Procs

SUBNET = "10.214.0"
TBF = ["burst", "32kbit", "latency", "50ms"]
LINK_CHECK_SERVER = r"""
import socket, sys, time
s = socket.create_server((sys.argv[1], 0)); print(s.getsockname()[1], flush=True)
c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 20)
    if not b: break
    t0 = t0 or time.perf_counter(); n += len(b)
print(n, time.perf_counter() - t0, flush=True)
"""
LINK_CHECK_CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2]))); c.sendall(b"x" * int(sys.argv[3])); c.close()
"""


def rate_bits(rate: str) -> float:
    m = re.fullmatch(r"([\d.]+)\s*([kmg]?)(bit|bps)", rate.lower())
    if not m:
        raise ValueError(f"--rate {rate!r}: use e.g. 50mbit")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    return value * (8 if m.group(3) == "bps" else 1)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _tc(ns: str, *args: str) -> None:
    done = subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"tc -n {ns} {' '.join(args)}: {done.stderr.strip()}")


class Wan:
    """A switch namespace with a bridge; per peer a namespace + veth pair, tbf on both ends."""

    def __init__(self, n: int, rate: str):
        tag = f"{os.getpid() % 100000}"
        self.switch = f"spw{tag}sw"
        self.names = [f"spw{tag}h{i}" for i in range(n)]
        self.ips = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self.rate = rate
        self.created: list[str] = []

    def create(self) -> None:
        _ip("netns", "add", self.switch)
        self.created.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        _ip("-n", self.switch, "link", "set", "lo", "up")
        for i, (ns, addr) in enumerate(zip(self.names, self.ips)):
            _ip("netns", "add", ns)
            self.created.append(ns)
            # the pair is created inside the peer namespace (nothing ever appears in the root namespace)
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"port{i}", "netns", self.switch)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "set", f"port{i}", "master", "br0")
            _ip("-n", self.switch, "link", "set", f"port{i}", "up")
            _tc(ns, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", self.rate, *TBF)  # upload
            _tc(self.switch, "qdisc", "add", "dev", f"port{i}", "root", "tbf", "rate", self.rate, *TBF)  # download

    def delete(self) -> None:
        for ns in reversed(self.created):  # deleting a namespace deletes its interfaces (and the veth peers)
            _ip("netns", "del", ns, check=False)
        self.created = []

    def prefix(self, i: int) -> tuple:
        return ("ip", "netns", "exec", self.names[i])


def preflight() -> str | None:
    """None if namespaces + tbf work here, else why not (one line)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "the `ip` and `tc` commands (iproute2) are not installed"
    ns = f"spw{os.getpid() % 100000}probe"
    try:
        _ip("netns", "add", ns)
        try:
            _ip("-n", ns, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1")
            _tc(ns, "qdisc", "add", "dev", "probe0", "root", "tbf", "rate", "50mbit", *TBF)
        finally:
            _ip("netns", "del", ns, check=False)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return f"cannot emulate a WAN here: {str(e).splitlines()[0]}"
    return None


def link_check(wan: Wan, nbytes: int, deadline: float) -> dict:
    """TCP from peer namespace 1 to peer namespace 0 through both tbf links."""
    procs = Procs(Path("/tmp") / f"spw-linkcheck-{os.getpid()}")
    try:
        procs.start("server", [PY, "-c", LINK_CHECK_SERVER, wan.ips[0]], prefix=wan.prefix(0))
        procs.wait_line("server", r"^\d+$", deadline, "the link-check server")
        port = procs.lines["server"][0][1].strip()
        procs.start("client", [PY, "-c", LINK_CHECK_CLIENT, wan.ips[0], port, str(nbytes)], prefix=wan.prefix(1))
        if not procs.wait_all(["client", "server"], deadline):
            raise PartTimeout("link check did not finish")
        received, seconds = procs.lines["server"][1][1].split()
    finally:
        procs.close()
        shutil.rmtree(procs.log_dir, ignore_errors=True)
    received, seconds = int(received), float(seconds)
    bits = received * 8 / seconds
    return {"bytes": received, "seconds": seconds, "bits_per_s": bits, "ratio_to_rate": bits / rate_bits(wan.rate)}
