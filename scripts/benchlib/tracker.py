"""The timeline of a swarm run as its stage records show it: Tracker polls the DHT, and the helpers below read
step and sample totals, event times and stalls from the series it keeps."""
from __future__ import annotations

import threading
import time

from benchlib.common import PartTimeout
from benchlib.procs import Procs


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
