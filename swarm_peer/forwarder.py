"""The next hop: which next-stage peers exist (their DHT records), and sending one microbatch to one of them.

A peer is chosen by routing.Router (SWARM's stochastic wiring, weighted by live throughput and load); a failure
costs a retry of this hop elsewhere, never of the whole microbatch. Busy replies are backpressure (back off, draw
again), bad values ban the peer that sent them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import torch

from swarm_peer.config import Config
from swarm_peer.model import config_summary, stage_fingerprint
from swarm_peer.records import StageRecord, read_stage_records
from swarm_peer.routing import Candidate, Router
from swarm_peer.transport import Busy, RemoteError, TransportError, call_forward
from swarm_peer.validation import checked_values

log = logging.getLogger("swarm_peer")
MAX_HOP_ATTEMPTS = 50  # per microbatch per hop; bounded so nothing retries forever


class Forwarder:
    def __init__(self, cfg: Config, stage: int, dht, p2p, run_id: str, vocab_size: int, stats: dict,
                 warned: set[str], stopping: Callable[[], bool], on_delivered: Callable[[str], None],
                 swarm_key=None, lanes=None):
        self.cfg, self.stage, self.dht, self.p2p, self.run_id = cfg, stage, dht, p2p, run_id
        self.vocab_size, self.swarm_key = vocab_size, swarm_key
        self.lanes = lanes  # lanes.LaneClient: hops over direct TCP where the next peer has a reachable lane
        self.stats, self.warned = stats, warned  # the peer's counters ("retries", "busy_replies"); peers warned about
        self._stopping, self._on_delivered = stopping, on_delivered
        self.next_fingerprint = stage_fingerprint(cfg, stage + 1)
        self.router = Router(cfg.data.microbatch_size, max_timeout=cfg.swarm.request_timeout)
        self.seen_at = time.monotonic()  # last time a usable next-stage peer was visible
        self._last_wait_log = 0.0

    async def refresh(self) -> None:
        """Re-read the next stage's records into the router."""
        peers = await asyncio.get_running_loop().run_in_executor(
            None, read_stage_records, self.dht, self.run_id, self.stage + 1)
        live = [_candidate(p.record) for p in peers if self._usable(p.record)]
        self.router.update(live)
        if live:
            self.seen_at = time.monotonic()

    def _usable(self, rec: StageRecord) -> bool:
        if rec.state != "online" or rec.client_mode:
            return False
        if rec.fingerprint != self.next_fingerprint:
            if rec.peer_id not in self.warned:
                self.warned.add(rec.peer_id)
                log.warning(f"ignoring stage {rec.stage} peer {rec.peer_id[-8:]}: config fingerprint mismatch "
                            f"(theirs: {rec.config_summary}; ours: {config_summary(self.cfg, rec.stage)})")
            return False
        return True

    async def send(self, meta: dict, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[dict, list]:
        """Send one microbatch to a next-stage peer chosen by the router; retry elsewhere until one answers."""
        from hivemind.p2p import PeerID

        tensors = [hidden.detach().to("cpu"), labels.to("cpu", torch.int32)]
        failures, busy_wait = 0, 0.02
        deadline = time.monotonic() + 10 * self.cfg.swarm.request_timeout
        while failures < MAX_HOP_ATTEMPTS and time.monotonic() < deadline:
            if self._stopping():
                raise RuntimeError("peer is shutting down")
            peer = self.router.choose()
            if peer is None and time.monotonic() - self.seen_at > self.cfg.swarm.upstream_timeout:
                raise RuntimeError(f"no stage {self.stage + 1} peer visible for swarm.upstream_timeout")
            if peer is None:
                now = time.monotonic()
                if now - self._last_wait_log > 10:
                    log.warning(f"stage {self.stage + 1} has no live peers; waiting")
                    self._last_wait_log = now
                await asyncio.sleep(0.5)
                continue
            self.router.started(peer)
            t0 = time.monotonic()
            try:
                reply, out = await call_forward(self.p2p, PeerID.from_base58(peer), meta, tensors,
                                                self.cfg.swarm.compression.forward, self.router.timeout(peer),
                                                namespace=self.run_id, swarm_key=self.swarm_key, lanes=self.lanes)
                if not reply_ok(meta, out, hidden, self.vocab_size):
                    raise RemoteError(f"malformed reply {[tuple(t.shape) for t in out]}")
                out = [checked_values(t, "reply values") if t.is_floating_point() else t for t in out]
            except ValueError as e:  # bad values from that peer: it is the one banned
                self.router.failed(peer, ban=True)
                failures += 1
                self.stats["retries"] += 1
                log.warning(f"stage {self.stage + 1} peer {peer[-8:]} sent a bad reply ({e}); banned, rerouting")
                continue
            except Busy:  # backpressure, not a fault: back off a little and draw again
                self.router.failed(peer, ban=False)
                self.stats["busy_replies"] += 1
                await asyncio.sleep(busy_wait)
                busy_wait = min(0.5, busy_wait * 1.5)
                continue
            except RemoteError as e:
                self.router.failed(peer, ban=True)
                failures += 1
                self.stats["retries"] += 1
                log.warning(f"stage {self.stage + 1} peer {peer[-8:]} rejected microbatch: {e}")
                continue
            except TransportError as e:
                ban = self.router.failed(peer)
                failures += 1
                self.stats["retries"] += 1
                log.warning(f"stage {self.stage + 1} peer {peer[-8:]} failed ({e}); banned {ban:.0f}s, rerouting")
                continue
            self.router.succeeded(peer, time.monotonic() - t0)
            if not meta.get("eval") and "sample" not in meta:
                self._on_delivered(peer)
            return reply, out
        raise RuntimeError(f"no stage {self.stage + 1} peer took the microbatch ({failures} failures)")


def _candidate(rec: StageRecord) -> Candidate:
    return Candidate(rec.peer_id, rec.queue, rec.inflight, rec.max_inflight, rec.throughput, rec.paused)


def reply_ok(meta: dict, out: list, hidden: torch.Tensor, vocab: int) -> bool:
    """The reply a request of this kind must get: a gradient like `hidden`, nothing (eval) or logits (sample)."""
    if "sample" in meta:
        return len(out) == 1 and tuple(out[0].shape) == (hidden.shape[0], vocab) and out[0].is_floating_point()
    if meta.get("eval"):
        return not out
    return len(out) == 1 and out[0].shape == hidden.shape and out[0].is_floating_point()
