"""Sync mode's fast path: a standing group that all-reduces over direct lanes, with no matchmaking per step.

A sync-mode round (every inner step) through hivemind costs a matchmaking pass and an all-reduce through p2pd
(scripts/bench.py part h: 0.35 s for 2.8M values where gloo takes 0.011 s). Once a hivemind round has averaged with a
group whose members all run this fast path (each says so in its `gather`), every member keeps that group (sorted peer
ids; the same on all, since they got the same gathered dict) for the next rounds: each round is then one butterfly
all-reduce over direct TCP lanes (lanes.py). The flat buffer is cut into CHUNK_VALUES chunks, chunk c is reduced by
member c mod n: every member sends it its slice of chunk c with its sample weight and `gather`; the reducer sums
them as they arrive (weighted, fp32, one accumulator per chunk) and, once all n are in, answers every member with
the same average bytes and everyone's `gather` (so group_hash and group_clock work as after a hivemind round).

Membership. Members use the group while they complete rounds over it. Each member's `gather` says how many stage
mates it sees; a group forms, and stays, only while every member sees exactly its groupmates (`sees_only`). Once one
sees more (a joiner, a mate whose side of the forming round failed), every member (all hold the same gathered dict)
matchmakes through hivemind from the next round on, which takes the joiner in, as before standing groups existed. The choice is made from what all members
share, never from each one's view of the records: members on different paths would wait for each other. Failure. A reducer that lacks a contribution after `wait_s` (a member left or was killed) declares that
chunk failed: it never averages it, and answers "incomplete" to all. Then no member can complete the round, so the
round is retried through hivemind (which forms the next group). A member whose own
call broke (transport error) cannot know whether others completed the round: it does not retry (not voting), as
after a hivemind all-reduce that failed midway. Contributions are checked before they touch an accumulator
(member of the group, round and chunk in range, each member once, weight within the round's cap, one finite fp32
tensor of the chunk's length).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from hivemind.p2p import PeerID

from swarm_peer.transport import RemoteError, StageServicer, TransportStats, call_forward
from swarm_peer.validation import all_finite

CHUNK_VALUES = 1 << 20  # values per chunk (4 MiB of fp32): at least one chunk per member
MAX_IN_FLIGHT = 4  # chunks a member sends to one reducer at once
INCOMPLETE = "incomplete"  # a reducer's definitive "this chunk was never averaged" (the error reply's text starts so)
log = logging.getLogger("swarm_peer")


def chunk_bounds(total: int, members: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk of a flat buffer of `total` values: equal sizes, as many per member."""
    count = members * max(1, math.ceil(total / (members * CHUNK_VALUES)))  # every member reduces as many
    edges = [total * i // count for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def segments(sizes: list[int], start: int, end: int) -> list[tuple[int, int, int]]:
    """(tensor index, start, end) pieces of the flat range [start, end) over tensors of `sizes` values."""
    out, offset = [], 0
    for i, size in enumerate(sizes):
        a, b = max(start, offset), min(end, offset + size)
        if a < b:
            out.append((i, a - offset, b - offset))
        offset += size
    return out


def sees_only(gathered: dict) -> bool:
    """May these groupmates (a round's gathered dict, the same on all of them) stand as a group: every one of them
    runs standing groups and sees exactly its groupmates as its stage's mates (none outside: a joiner, a mate whose
    side of this round failed)? While one sees more, rounds matchmake, which takes the others in."""
    return len(gathered) >= 2 and all(isinstance(g, dict) and g.get("fast") is True and g.get("mates") == len(gathered) - 1
                                      for g in gathered.values())


def group_id(members: tuple[str, ...], formed_round: int) -> str:
    return hashlib.sha256(f"{formed_round}:{','.join(members)}".encode()).hexdigest()[:16]


@dataclass
class _Chunk:
    """A chunk this peer reduces in one round."""
    acc: torch.Tensor | None = None
    weight: float = 0.0
    got: dict[str, dict] = field(default_factory=dict)  # member -> its gather
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: torch.Tensor | None = None
    failed: bool = False
    deadline: float = 0.0
    complete_at: float = 0.0  # when the last member's contribution came in


class StandingGroup:
    """One peer's side: its current group, the chunks it reduces, and its rounds over the group."""

    def __init__(self, me: str, sizes: list[int], lanes, wait_s: float, weight_cap):
        """`lanes`: a lanes.LaneClient for the stage's averaging namespace; `weight_cap(group size)`: the most a
        member may weigh (sync_rules.max_round_weight); `wait_s`: how long a chunk waits, from its first
        contribution, for the others."""
        self.me, self.sizes, self.total, self.lanes = me, sizes, sum(sizes), lanes
        self.wait_s, self.weight_cap = wait_s, weight_cap
        self.members: tuple[str, ...] = ()
        self.gid, self.formed_round = "", -1
        self._chunks: dict[tuple[int, int], _Chunk] = {}  # (round, chunk) -> state, for rounds near the current
        self.current = self.completed = -1  # the round this peer last began / completed over the group
        self.stats = TransportStats()  # its calls and bytes (not the pipeline's)
        self.last_wait_s = 0.0  # the last round's wait until every member had sent its part of our chunks

    # ---- membership
    def form(self, members, formed_round: int) -> None:
        members = tuple(sorted(members))
        if self.me in members and len(members) >= 2 and members != self.members:
            log.info(f"standing group of {len(members)} from round {formed_round}: sync rounds over direct lanes")
        self.members, self.formed_round = (members, formed_round) if len(members) >= 2 else ((), -1)
        self.gid = group_id(self.members, formed_round) if self.members else ""
        self.completed = self.current = formed_round - 1  # the hivemind round that formed it
        self._chunks.clear()

    def disband(self) -> None:
        self.form((), -1)

    def usable(self, r: int) -> bool:
        """Use the group for round r: it formed at round r, or averaged round r - 1. Decided from what every member
        shares (the rounds they completed together), never from each one's view of the records, which differ: a
        member that took another path would leave the rest waiting."""
        return bool(self.members) and r == self.completed + 1

    # ---- the reducer's side (a lane handler)
    def _chunk(self, r: int, c: int) -> _Chunk | None:
        if not self.members or not self.current - 1 <= r <= self.current + 2:
            return None
        key = (r, c)
        if key not in self._chunks:
            for old in [k for k in self._chunks if k[0] < r - 2]:  # rounds long over
                self._chunks.pop(old)
            self._chunks[key] = _Chunk(deadline=time.monotonic() + self.wait_s)  # from the first contribution
        return self._chunks[key]

    async def _add(self, chunk: _Chunk, member: str, weight: float, gather: dict, values: torch.Tensor) -> None:
        """One member's contribution (checked by the caller); the average once every member's is in."""
        async with chunk.lock:
            if chunk.failed or chunk.result is not None or member in chunk.got:
                return
            if chunk.acc is None:  # inline: a chunk is <= 4 MiB (a thread hop would cost more)
                chunk.acc = values.to(torch.float32) * weight
            else:
                chunk.acc.add_(values, alpha=weight)
            chunk.weight += weight
            chunk.got[member] = gather
            if len(chunk.got) == len(self.members):
                chunk.result, chunk.acc = chunk.acc.div_(chunk.weight if chunk.weight > 0 else 1.0), None
                chunk.complete_at = time.monotonic()
                chunk.done.set()

    async def _outcome(self, chunk: _Chunk) -> torch.Tensor:
        """Wait for the chunk's average; raises RuntimeError(INCOMPLETE ...) once it is declared failed."""
        try:
            await asyncio.wait_for(chunk.done.wait(), max(0.0, chunk.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            pass
        async with chunk.lock:  # one decision: averaged, or failed for everyone
            if chunk.result is None:
                chunk.failed, chunk.acc = True, None
                chunk.done.set()
        if chunk.result is None:
            raise RuntimeError(f"{INCOMPLETE}: not every member's contribution came in time")
        return chunk.result

    async def handle(self, metadata: dict, tensors: list[torch.Tensor], remote: PeerID) -> tuple[dict, list]:
        """A member's chunk: checked, added, answered with the average (every member's gather included)."""
        sender = str(remote)
        r, c, weight, gather = (metadata.get(k) for k in ("round", "chunk", "weight", "gather"))
        bounds = chunk_bounds(self.total, len(self.members)) if self.members else []
        if metadata.get("group") != self.gid or sender not in self.members or sender == self.me:
            raise RuntimeError(f"{INCOMPLETE}: not a member of this peer's standing group")
        if type(r) is not int or type(c) is not int or not 0 <= c < len(bounds) or self.members[c % len(self.members)] != self.me:
            raise ValueError("bad round or chunk")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and 0 <= weight <= self.weight_cap(len(self.members))):
            raise ValueError("weight out of range")
        start, end = bounds[c]
        if not (isinstance(gather, dict) and len(tensors) == 1 and tensors[0].dtype == torch.float32
                and tuple(tensors[0].shape) == (end - start,) and all_finite(tensors[0])):
            raise ValueError("malformed contribution")
        chunk = self._chunk(r, c)
        if chunk is None:
            raise RuntimeError(f"{INCOMPLETE}: round {r} is not near this peer's")
        await self._add(chunk, sender, float(weight), gather, tensors[0])
        result = await self._outcome(chunk)
        return {"gathered": chunk.got}, [result]

    # ---- a member's round
    async def run(self, r: int, buffers: list[torch.Tensor], weight: float, gather: dict) -> tuple[dict | None, str, str]:
        """Average `buffers` (flat, in place) over the group for round r. Returns (gathered, kind, error): kind "ok"
        (buffers hold the average), "clean" (a chunk was never averaged: nobody completed, retry elsewhere) or
        "ambiguous" (our side broke: others may have completed it)."""
        self.current = r
        n, bounds = len(self.members), chunk_bounds(self.total, len(self.members))
        flats = [b.view(-1) for b in buffers]
        def take(c: int) -> torch.Tensor:
            parts = [flats[i][a:b] for i, a, b in segments(self.sizes, *bounds[c])]
            return parts[0] if len(parts) == 1 else torch.cat(parts)  # a view: read (sent, added) before `put`
        def put(c: int, values: torch.Tensor) -> None:
            offset = 0
            for i, a, b in segments(self.sizes, *bounds[c]):
                flats[i][a:b].copy_(values[offset: offset + b - a])
                offset += b - a
        slots = {m: asyncio.Semaphore(MAX_IN_FLIGHT) for m in self.members}
        gathered: dict = {}
        t0, self.last_wait_s = time.monotonic(), 0.0
        async def one(c: int) -> None:
            reducer = self.members[c % n]
            values = take(c)  # chunks are <= 4 MiB: a thread hop costs more than the copy (5-10 ms on a busy host)
            if reducer == self.me:
                chunk = self._chunk(r, c)
                await self._add(chunk, self.me, weight, gather, values)
                result = await self._outcome(chunk)
                gathered.update(chunk.got)
                self.last_wait_s = max(self.last_wait_s, chunk.complete_at - t0)
            else:
                meta = {"group": self.gid, "round": r, "chunk": c, "weight": weight, "gather": gather}
                async with slots[reducer]:
                    reply, out = await call_forward(
                        self.lanes.p2p, PeerID.from_base58(reducer), meta, [values], "none", 3 * self.wait_s,
                        self.lanes.namespace, lanes=self.lanes, swarm_key=self.lanes.swarm_key, stats=self.stats)
                result = out[0] if len(out) == 1 else torch.empty(0)
                if not (result.dtype == torch.float32 and tuple(result.shape) == tuple(values.shape)
                        and all_finite(result)):
                    raise ValueError(f"malformed average from {reducer[-8:]}")
                if isinstance(reply.get("gathered"), dict):
                    gathered.update(reply["gathered"])
            put(c, result)

        results = await asyncio.gather(*(one(c) for c in range(len(bounds))), return_exceptions=True)
        for key in [k for k in self._chunks if k[0] <= r]:  # every part of ours is in or failed: no more will come
            del self._chunks[key]  # (their averages, half the buffer in a pair, are not kept for later rounds)
        errors = [e for e in results if isinstance(e, BaseException)]
        if not errors:
            self.completed = r
            if not sees_only(gathered):
                self.disband()  # a member sees a stage mate outside the group: the next round matchmakes (every
                # member decides so from the same gathered dict)
            return gathered, "ok", ""
        clean = [e for e in errors if isinstance(e, (RemoteError, RuntimeError)) and str(e).startswith(INCOMPLETE)]
        first = errors[0]
        return None, "clean" if clean else "ambiguous", f"{type(first).__name__}: {first}"[:200]


async def start(cfg, sync, p2p, namespace: str, bind_host: str, hosts: list[str], swarm_key=None):
    """A sync-mode peer's standing group (`sync.group`), served over a direct lane and over P2P in `namespace`;
    returns its LaneServer (close it at the end)."""
    from swarm_peer.lanes import LaneClient, LaneServer
    from swarm_peer.sync_rules import max_round_weight

    sw = cfg.swarm
    group = StandingGroup(sync.me, [b.numel() for b in sync.buffers], LaneClient(p2p, namespace, swarm_key),
                          wait_s=2 * sw.matchmaking_time,
                          weight_cap=lambda n: max_round_weight("sync", cfg.data.batch_size, sw.sync_every,
                                                                sw.sync_samples, n))
    servicer = StageServicer(group.handle, request_timeout=sw.request_timeout, swarm_key=swarm_key, stats=group.stats)
    servicer.lanes = LaneServer(servicer, bind_host, hosts)
    await servicer.lanes.start()
    await servicer.add_p2p_handlers(p2p, namespace=namespace)
    sync.group = group
    return servicer.lanes
