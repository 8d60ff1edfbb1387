"""Same-stage averaging on hivemind's decentralized all-reduce, with bit-identical results on every groupmate.

We keep hivemind's matchmaking, butterfly partitioning, sample weights, timeouts and bans; the all-reduce itself runs
as `allreduce.ValueAllReduceRunner` (values every groupmate decodes from the same bytes, written in place, checked
inputs), so a completed round leaves identical averages everywhere and a later hash disagreement means a real fault.

`StageAverager` adds: a runtime target group size (the stage's live peer count, so a full group starts at once),
traffic counters, and `download_state`, which fetches the stage state from several donors at once (tensors split
round-robin, a failed donor's share re-fetched from the others). In a private swarm (swarm_key.py) every `gather`
and download request carries the sender's peer token: a leader refuses joiners without one, every groupmate checks
all tokens of its group before reducing, and hivemind's own (untokened) state download is switched off.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import multiprocessing as mp
import time
from contextlib import contextmanager
from typing import AsyncIterator, Awaitable, Callable, Iterator, Optional

import msgpack
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.partition import AllreduceException
from hivemind.compression import NoCompression
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import MPFuture
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.streaming import split_for_streaming

from swarm_peer.allreduce import FAILED_VALUES, PART_BYTES, ValueAllReduceRunner
from swarm_peer.state_transfer import RAW_DTYPES, TensorReceiver, raw_chunks, serialize_state, stream_consistent
from swarm_peer.swarm_key import SwarmKey, auth_error

log = logging.getLogger("swarm_peer")
MAX_STATE_TENSORS = 4096  # tensors a state download may ask for (a stage has ~3 per parameter tensor)
PHASE_POLL_S = 0.02  # how finely a round's matchmaking / all-reduce split is timed (a shared-memory flag read)
DECLINES_TO_DROP = 2  # empty answers (state being written, or not shared) before a download gives a donor up
MALFORMED_BAN_S = 600.0  # a groupmate that sent a malformed part or weight: no honest peer does, so no group with it


class StageAverager(DecentralizedAverager):
    """DecentralizedAverager over one stage's flat buffers. `get_state()` (host process) supplies what joiners and
    recovering peers download: (metadata dict, list of CPU tensors)."""

    def __init__(self, averaged_tensors, dht, *, get_state: Callable[[], tuple[dict, list[torch.Tensor]]],
                 swarm_key: Optional[SwarmKey] = None, weight_cap: Callable[[int], float] = lambda size: math.inf,
                 **kwargs):
        self._get_state = get_state
        self._weight_cap = weight_cap  # group size -> the largest sample weight an honest groupmate can have
        self.swarm_key = swarm_key
        self.traffic = mp.Array(ctypes.c_int64, 3)  # bytes sent, bytes received, values left unaveraged
        # the served state's version (a seqlock shared with the averager process): odd while the host writes it
        # (outer step, state load), +2 per write. Donors serve the live tensors from shared memory, no copy
        self.state_version = mp.Value(ctypes.c_int64, 0, lock=False)
        self.last_unserved: list[str] = []  # donors of the last download_state with no averager to answer
        self.last_declined: list[str] = []  # ... whose averager answered without the state
        self._banned: dict[str, float] = {}  # averager process: peer id -> until when no group includes it
        kwargs.setdefault("part_size_bytes", PART_BYTES)
        super().__init__(averaged_tensors, dht, **kwargs)

    # ---------------------------------------------------------------------------------------- all-reduce
    async def _run_allreduce_inplace_(self, tensors, group_info, group_id: Optional[bytes] = None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        cap = self._weight_cap(len(group_info.peer_ids))
        if kwargs.get("weight") is not None:  # ours too (a fast peer among slow mates): no honest peer is refused
            kwargs["weight"] = min(float(kwargs["weight"]), cap)
        runner = ValueAllReduceRunner(traffic=self.traffic, on_malformed=self._ban, p2p=self._p2p, servicer_type=type(self),
                                      max_weight=cap,
                                      prefix=self.prefix, tensors=tensors, group_id=group_id,
                                      ordered_peer_ids=group_info.peer_ids, **kwargs)
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            raise AllreduceException("stage averagers never run as auxiliaries")
        for peer, gathered in zip(group_info.peer_ids, group_info.gathered):
            error = auth_error(self.swarm_key, self._user_data(gathered).get("auth"), peer) or (
                "sent malformed parts in an earlier round" if self._is_banned(peer) else None)
            if error:
                raise AllreduceException(f"groupmate {str(peer)[-8:]}: {error}")
        async for _ in runner:  # the averaged values land in `tensors` themselves (allreduce.InPlaceParts)
            pass
        failed = runner.tensor_part_container.failed_size
        if failed:
            with self.traffic.get_lock():
                self.traffic[FAILED_VALUES] += failed
            raise AllreduceException(f"partial round: {failed} of {runner.tensor_part_container.total_size} "
                                     f"values were not averaged (a reducer failed)")

    @contextmanager
    def state_writing(self) -> Iterator[None]:
        """Around every change of the served state (host process, one writer: the compute thread)."""
        self.state_version.value += 1
        try:
            yield
        finally:
            self.state_version.value += 1

    def _ban(self, peer: PeerID) -> None:
        if not self._is_banned(peer):
            log.warning(f"averaging: groupmate {str(peer)[-8:]} sent a malformed part or weight; no group with it "
                        f"for {MALFORMED_BAN_S:.0f}s")
        self._banned[str(peer)] = time.monotonic() + MALFORMED_BAN_S

    def _is_banned(self, peer: PeerID) -> bool:
        return self._banned.get(str(peer), 0.0) > time.monotonic()

    async def _step(self, *, step, future_for_init):
        matchmaking = self._matchmaking  # created in this (averager) process: wrap its follower side once
        if not getattr(matchmaking, "refuses_banned", False):
            request_join = matchmaking._request_join_group

            async def join_unless_banned(leader: PeerID):  # a banned peer is never our leader
                return None if self._is_banned(leader) else await request_join(leader)
            matchmaking._request_join_group, matchmaking.refuses_banned = join_unless_banned, True
            # the post-assembly key shuffle samples group_size of range(target): a leader whose view of the stage
            # was larger than ours assembles a bigger group, and a fixed target then fails our step ("Sample larger
            # than population"). None sizes it by the group; the bits themselves we set per attempt (round_bits)
            matchmaking.group_key_manager.target_group_size = None
        return await super()._step(step=step, future_for_init=future_for_init)

    def _my_gathered(self, group_info) -> dict:
        """What this peer passed as `gather` to step() (the caller's round number, hash, ...)."""
        return self._user_data(group_info.gathered[group_info.peer_ids.index(self.peer_id)])

    def _user_data(self, gathered: bytes) -> dict:
        """The `gather` dict inside one peer's gathered bytes ({} when malformed: it comes off the wire)."""
        try:
            _, _, user_bytes = self.serializer.loads(gathered)
            data = self.serializer.loads(user_bytes)
        except Exception:
            return {}
        return data if isinstance(data, dict) else {}

    def step(self, gather=None, **kwargs):
        if self.swarm_key is not None:
            gather = {**(gather or {}), "auth": self.swarm_key.peer_token(self.peer_id)}
        return super().step(gather=gather, **kwargs)

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest,
                             context: P2PContext) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if self._is_banned(context.remote_id) or auth_error(self.swarm_key, self._user_data(request.gather).get("auth"),
                                                            context.remote_id):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_join_group(request, context):
            yield message

    async def rpc_download_state(self, request: averaging_pb2.DownloadRequest,
                                 context: P2PContext) -> AsyncIterator[averaging_pb2.DownloadData]:
        if self.swarm_key is None:  # hivemind's state download has no room for a token: private swarms use ours
            async for message in super().rpc_download_state(request, context):
                yield message

    def set_target_group_size(self, size: int, timeout: float = 30.0) -> None:
        """A group of `size` starts as soon as it is complete instead of waiting out the matchmaking time."""
        future = MPFuture()
        self._outer_pipe.send(("_set_target_group_size", [], dict(size=size, future=future)))
        future.result(timeout)

    async def _set_target_group_size(self, size: int, future: MPFuture):
        self._matchmaking.target_group_size = size
        self._matchmaking.potential_leaders.target_group_size = size
        future.set_result(None)

    # ------------------------------------------------------------------------------------- state sharing
    def get_current_state(self):
        metadata, tensors = self._get_state()
        return metadata, tensors, None

    async def rpc_download_slice(self, request: runtime_pb2.ExpertRequest,
                                 context: P2PContext) -> AsyncIterator[averaging_pb2.DownloadData]:
        """Stream the state tensors listed in the request (`metadata` = msgpack {"indices": [...], "auth": token}); the
        first message carries the state metadata. An empty reply means "not sharing" (or a refused request)."""
        if not self.allow_state_sharing:
            return
        try:
            query = msgpack.unpackb(request.metadata[:65536], raw=False)
            wanted = query["indices"]  # checked before the (costly) state snapshot is taken
            assert isinstance(wanted, list) and 0 < len(wanted) <= MAX_STATE_TENSORS
            assert all(type(i) is int and 0 <= i < MAX_STATE_TENSORS for i in wanted)
        except Exception:
            return
        if auth_error(self.swarm_key, query.get("auth"), context.remote_id):
            return
        version = self.state_version.value
        if version % 2:
            return  # being written: the downloader asks another donor or again
        metadata, tensors, _ = await self._get_current_state_from_host_process()
        first = True
        if isinstance(self.state_compression, NoCompression) and all(t.dtype in RAW_DTYPES.values() for t in tensors):
            chunks = raw_chunks  # straight from the live tensors
        else:  # a codec: a serialized copy of one tensor at a time
            chunks = lambda t: split_for_streaming(serialize_state(self.state_compression, t))  # noqa: E731
        for part in stream_consistent(tensors, wanted, lambda: self.state_version.value, version, chunks):
            yield averaging_pb2.DownloadData(tensor_part=part, metadata=metadata if first else b"")
            first = False

    def download_state(self, donors: list[str], num_tensors: int, timeout: float) -> Optional[tuple[dict, list]]:
        """Fetch all `num_tensors` state tensors, split across `donors` (base58 peer ids) and fetched concurrently; a
        failed donor's share goes to the others. Returns (metadata, tensors) or None. Every tensor is of one version
        (round and hash): when donors serve different ones (a stage that runs rounds back to back moves on
        mid-download), the version that served the most tensors is kept and fetched whole from its donors."""
        future = MPFuture()
        self._outer_pipe.send(("_download_state", [], dict(donors=donors, num_tensors=num_tensors, timeout=timeout,
                                                             future=future)))
        result, self.last_unserved, self.last_declined = future.result(timeout + 10)
        return result

    async def _download_state(self, donors: list[str], num_tensors: int, timeout: float, future: MPFuture):
        unserved: set[str] = set()  # donors with no averager to answer (not merely slow, nor declining to share)
        declined: set[str] = set()  # donors whose averager answered with no state
        try:
            result = await asyncio.wait_for(self._download_from(donors, num_tensors, timeout, unserved, declined),
                                            timeout)
        except Exception as e:
            log.warning(f"state download failed: {e!r}")
            result = None
        if not future.done():
            future.set_result((result, sorted(unserved), sorted(declined)))

    async def _download_from(self, donors: list[str], num_tensors: int, timeout: float, unserved: set[str],
                             declined: set[str]):
        peers = [PeerID.from_base58(d) for d in donors if d != str(self.peer_id)]
        tensors: dict[int, torch.Tensor] = {}
        version, kept_metadata = None, None  # the (round, hash) every tensor is of
        todo, declines = list(range(num_tensors)), {}
        for _ in range((4 + DECLINES_TO_DROP) * len(peers) + 4):  # each pass ends or fetches, or a decline: bounded
            if not (todo and peers):
                break
            shares = {peer: todo[i::len(peers)] for i, peer in enumerate(peers)}
            results = await asyncio.gather(*(self._fetch(peer, share, timeout) for peer, share in shares.items()
                                             if share), return_exceptions=True)
            served: dict[tuple, list] = {}  # version -> [(peer, share, tensors, metadata)] of this pass
            for (peer, share), result in zip([(p, s) for p, s in shares.items() if s], results):
                if result is None and declines.get(peer, 0) + 1 < DECLINES_TO_DROP:
                    declines[peer] = declines.get(peer, 0) + 1  # its state was being written (a lone peer's
                    await asyncio.sleep(0.05)  # overlapped rounds run back to back): ask once more
                    continue
                if isinstance(result, BaseException) or result is None:
                    log.warning(f"state download from {str(peer)[-8:]} failed ({result!r}); trying the others")
                    peers.remove(peer)
                    if isinstance(result, Exception) and not isinstance(result, asyncio.TimeoutError):
                        unserved.add(str(peer))  # no averager answers there (a record with nothing behind it)
                    elif result is None:
                        declined.add(str(peer))
                    continue
                metadata, got = result
                served.setdefault((metadata.get("round"), metadata.get("hash")), []).append((peer, share, got, metadata))
            if served:
                counts = {v: sum(len(s) for _, s, _, _ in parts) for v, parts in served.items()}
                if version is not None:  # what is kept of the current version counts for it
                    counts[version] = counts.get(version, 0) + len(tensors)
                best = max(counts, key=lambda v: (counts[v], str(v)))
                if best != version:  # another version wins: what was kept of the old one goes
                    tensors.clear()
                    version = best
                for v, parts in served.items():
                    for peer, share, got, metadata in parts:
                        if v == version:
                            kept_metadata = metadata
                            tensors.update(zip(share, got))
                        else:  # it moved on (or stayed behind): no more shares from it in this download
                            peers.remove(peer)
                if len(served) > 1:
                    log.info(f"state donors served {len(served)} versions; keeping round {version[0]}")
            todo = [i for i in range(num_tensors) if i not in tensors]
        if todo:
            raise RuntimeError("every donor failed" if not peers else "donors kept moving to new versions")
        return kept_metadata, [tensors[i] for i in range(num_tensors)]

    async def _fetch(self, peer: PeerID, indices: list[int], timeout: float):
        query = {"indices": indices}
        if self.swarm_key is not None:
            query["auth"] = self.swarm_key.peer_token(self.peer_id)
        request = runtime_pb2.ExpertRequest(metadata=msgpack.packb(query))
        stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
        stream = await stub.rpc_download_slice(request)
        metadata, tensors, receiving = None, [], None
        async for message in aiter_with_timeout(stream, timeout=timeout):
            if metadata is None:
                metadata = message.metadata
            if message.tensor_part.dtype:  # the first chunk of the next tensor
                if receiving is not None:
                    tensors.append(receiving.result())
                if len(tensors) >= len(indices):
                    return None  # more tensors than asked for
                receiving = TensorReceiver(message.tensor_part)
            elif receiving is None:
                return None  # a chunk before any tensor's first one
            else:
                receiving.add(message.tensor_part.buffer)
        if receiving is not None:
            tensors.append(receiving.result())
        if not metadata or len(tensors) != len(indices):
            return None
        metadata = self.serializer.loads(metadata)
        return (metadata, tensors) if isinstance(metadata, dict) else None


async def await_step(control, give_up: Callable[[], Awaitable[Optional[str]]], poll: float = 0.5,
                     deadline: float = math.inf, phases: Optional[dict] = None):
    """Await an averager StepControl (an MPFuture created in this event loop's thread); every `poll` s,
    `await give_up()` returning a reason cancels it. Returns (gathered, error). `phases` gets "allreduce_at": when
    the all-reduce was first seen running (time.monotonic(), to within PHASE_POLL_S)."""
    async def result():
        return await control
    waiter = asyncio.ensure_future(result())
    try:
        next_look = time.monotonic() + poll
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=PHASE_POLL_S)
            if phases is not None and "allreduce_at" not in phases and control.began_allreduce:
                phases["allreduce_at"] = time.monotonic()
            if done:
                try:
                    return waiter.result(), None
                except BaseException as e:  # the step failed (or was cancelled elsewhere)
                    return None, " ".join(str(e).split())[:200] or type(e).__name__
            if time.monotonic() < next_look:
                continue
            next_look = time.monotonic() + poll
            reason = await give_up() if time.monotonic() < deadline else "timed out"
            if reason:
                control.cancel()
                return None, reason
    finally:
        waiter.cancel()
