"""Stochastic wiring: which next-stage peer gets the next microbatch. Pure logic, no I/O.

Each candidate j gets an expected completion time
    E_j = latency_j + (queue_j + inflight_j + mine_j + 1) * mb_samples / throughput_j
from its published record (queue, in-flight, EMA throughput) plus what this sender knows privately (its own
latency measurements to j and the microbatches it has outstanding there, which the record can't show yet).
The peer is drawn with probability proportional to 1 / E_j: faster and less loaded peers get more work, but no
peer is starved of probes, so a recovering peer's figures get refreshed (SWARM's wiring, with load in it).

A failed or timed-out peer is banned for base * 2^(failures-1) seconds (capped); a success resets it.
Per-peer timeouts follow observed latency: max(min_timeout, 3 x slowest recent latency), capped by max_timeout.
"""
from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class Candidate:
    peer_id: str
    queue: int = 0
    inflight: int = 0
    max_inflight: int = 1
    throughput: float = 0.0  # samples/s published by the peer; 0 = not measured yet
    paused: bool = False  # in a same-stage round that pauses training: answers "busy" until done


@dataclass
class _PeerStats:
    latencies: deque = field(default_factory=lambda: deque(maxlen=16))
    ema_latency: float | None = None
    outstanding: int = 0
    failures: int = 0
    banned_until: float = 0.0
    sent: int = 0
    failed: int = 0


class Router:
    def __init__(self, mb_samples: int, min_timeout: float = 5.0, max_timeout: float = 60.0, ban_base: float = 1.0,
                 ban_max: float = 60.0, rng: random.Random | None = None, clock=time.monotonic):
        self.mb_samples, self.min_timeout, self.max_timeout = mb_samples, min_timeout, max_timeout
        self.ban_base, self.ban_max = ban_base, ban_max
        self.rng, self.clock = rng or random.Random(), clock
        self.candidates: dict[str, Candidate] = {}
        self.stats: dict[str, _PeerStats] = {}

    # ---- view of the next stage, refreshed from the DHT
    def update(self, candidates: list[Candidate]) -> None:
        self.candidates = {c.peer_id: c for c in candidates}
        for c in candidates:
            self.stats.setdefault(c.peer_id, _PeerStats())

    def live(self) -> list[str]:
        now = self.clock()
        return [p for p in self.candidates if self.stats[p].banned_until <= now]

    def expected_time(self, peer_id: str) -> float:
        c, s = self.candidates[peer_id], self.stats[peer_id]
        known = [x.throughput for x in self.candidates.values() if x.throughput > 0]
        # a new peer is assumed as fast as the median known one (optimistic, so it gets probed)
        throughput = c.throughput if c.throughput > 0 else (sorted(known)[len(known) // 2] if known else 1.0)
        latency = s.ema_latency if s.ema_latency is not None else 0.0
        backlog = c.queue + c.inflight + s.outstanding + 1
        return latency + backlog * self.mb_samples / throughput

    def weights(self) -> dict[str, float]:
        live = self.live()
        ready = [p for p in live if not self.candidates[p].paused] or live  # paused peers only if all are
        return {p: 1.0 / max(self.expected_time(p), 1e-6) for p in ready}

    def choose(self) -> str | None:
        """Draw a live next-stage peer, or None when there is none."""
        weights = self.weights()
        if not weights:
            return None
        peers = sorted(weights)
        return self.rng.choices(peers, weights=[weights[p] for p in peers], k=1)[0]

    # ---- outcomes
    def timeout(self, peer_id: str) -> float:
        lat = self.stats[peer_id].latencies if peer_id in self.stats else ()
        if not lat:
            return self.max_timeout
        return min(self.max_timeout, max(self.min_timeout, 3.0 * max(lat)))

    def started(self, peer_id: str) -> None:
        s = self.stats.setdefault(peer_id, _PeerStats())
        s.outstanding += 1
        s.sent += 1

    def succeeded(self, peer_id: str, latency: float) -> None:
        s = self.stats[peer_id]
        s.outstanding = max(0, s.outstanding - 1)
        s.latencies.append(latency)
        s.ema_latency = latency if s.ema_latency is None else 0.8 * s.ema_latency + 0.2 * latency
        s.failures, s.banned_until = 0, 0.0

    def failed(self, peer_id: str, ban: bool = True) -> float:
        """Record a failure; returns the ban duration (0 for a soft failure such as 'busy')."""
        s = self.stats[peer_id]
        s.outstanding = max(0, s.outstanding - 1)
        s.failed += 1
        if not ban:
            return 0.0
        s.failures += 1
        duration = min(self.ban_max, self.ban_base * 2 ** (s.failures - 1))
        s.banned_until = self.clock() + duration
        return duration

    def sent_counts(self) -> dict[str, int]:
        return {p: s.sent - s.failed for p, s in self.stats.items() if s.sent}
