"""Data plane between stage peers: one streaming RPC ("forward-then-backward in one call") over hivemind P2P.

Wire format, both directions: a stream of ExpertRequest (call) / ExpertResponse (reply) messages. The first message's
`metadata` is msgpack({"n": number of tensors, "m": metadata dict}); the tensors follow as runtime_pb2.Tensor parts
in hivemind's split_for_streaming layout (the first part of a tensor carries dtype/size/compression and `chunks`, the
rest only bytes), packed into messages of about `chunk_bytes`. An error reply is {"n": 0, "m": {"error": "..."}}, with
`"code": "busy"` for backpressure (`Busy`).
Streams bypass hivemind's 4 MiB unary limit and its unary timeouts (we apply our own). Caps are checked as parts
arrive and before decoding, but hivemind itself reads each stream message whole (8-byte length prefix, no cap) and
prefetches up to 5 of them: a hostile caller can still make us buffer a few huge messages. In a private swarm
(swarm_key.py) the metadata carries "auth", the caller's peer token, checked before any tensor is read.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Optional

import msgpack
import torch
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2

from swarm_peer.compression import decode, decoded_nbytes, encode
from swarm_peer.swarm_key import SwarmKey, auth_error

CHUNK_BYTES = 256 << 10  # bytes per stream message: 256 KiB beat 64 KiB, 512 KiB-2 MiB by 0-10 % (bench_hop.py)
MAX_REQUEST_BYTES = 512 << 20
MAX_TENSORS = 64
MAX_METADATA_BYTES = 64 << 10
_EXECUTOR_BYTES = 4 << 20  # encode/decode bigger tensors off the event loop (a thread hop costs ~1 ms)
logger = logging.getLogger(__name__)

Handler = Callable[[dict, "list[torch.Tensor]", PeerID], Awaitable["tuple[dict, list[torch.Tensor]]"]]


BUSY = "busy"  # the error reply's code for backpressure (Busy)


class TransportError(RuntimeError):
    """The peer could not be reached, broke the protocol or did not answer in time: ban it."""


class TransportTimeout(TransportError):
    """No complete reply within the timeout."""


class RemoteError(RuntimeError):
    """The peer answered with an error reply: it is alive; str(e) is its message."""


class Busy(RemoteError):
    """Backpressure, not a fault: the peer is well but cannot take this request now (queue full, synchronizing with
    its stage, not online yet); the sender draws another peer without banning this one. A handler raises it; on the
    wire it is the error reply's `"code": "busy"`, and `call_forward` raises it again on the caller's side."""


class ProtocolError(ValueError):
    """A malformed, truncated or oversized stream."""


@dataclass
class TransportStats:
    """Call counters and payload bytes (metadata + tensor buffers, as encoded; both roles). Thread-safe."""

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0
    lane_calls: int = 0  # ... of which over a direct TCP lane (lanes.py)
    call_failures: int = 0
    served: int = 0
    served_errors: int = 0
    unauthorized: int = 0  # requests refused for a missing/bad swarm key token
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict:
        with self._lock:
            return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


STATS = TransportStats()  # default, process-wide


@dataclass(frozen=True)
class Limits:
    max_bytes: int = MAX_REQUEST_BYTES  # wire bytes and decoded tensor bytes, each
    max_tensors: int = MAX_TENSORS
    max_metadata_bytes: int = MAX_METADATA_BYTES


def _one_line(error: BaseException) -> str:
    """The message alone; the type name only when there is no message."""
    return " ".join((str(error) or type(error).__name__).split())[:300]


def _encode(metadata: dict, tensors: list, codec: str, chunk_bytes: int, message_type) -> list:
    """[(message, payload bytes)], messages of ~chunk_bytes: small tensors share one, big ones are split.
    (Payload = metadata + tensor buffers; protobuf's ByteSize() costs as much as serializing, so we count ourselves.)"""
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, not {type(metadata).__name__}")
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError("tensors must be a list of torch.Tensor")
    first = msgpack.packb({"n": len(tensors), "m": metadata}, use_bin_type=True)
    messages, parts, size = [], [], len(first)
    for tensor in tensors:
        header, payload = encode(tensor, codec)
        payload = memoryview(payload)
        header.chunks = max(1, math.ceil(len(payload) / chunk_bytes))
        for index in range(header.chunks):
            piece = payload[index * chunk_bytes: (index + 1) * chunk_bytes].tobytes()
            if index == 0:
                header.buffer = piece
                parts.append(header)
            else:
                parts.append(runtime_pb2.Tensor(buffer=piece))
            size += len(piece)
            if size >= chunk_bytes:
                messages.append((message_type(tensors=parts), size))
                parts, size = [], 0
    if parts or not messages:
        messages.append((message_type(tensors=parts), size))
    messages[0][0].metadata = first
    return messages


async def _encode_async(metadata, tensors, codec, chunk_bytes, message_type) -> list:
    args = (metadata, tensors, codec, chunk_bytes, message_type)
    if not isinstance(tensors, (list, tuple)) or sum(
            t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)) < _EXECUTOR_BYTES:
        return _encode(*args)
    return await asyncio.get_running_loop().run_in_executor(None, _encode, *args)


def _assemble(pieces: list) -> bytes | bytearray:
    if len(pieces) == 1:
        return pieces[0]
    buffer, offset = bytearray(sum(map(len, pieces))), 0
    for piece in pieces:
        buffer[offset: offset + len(piece)] = piece
        offset += len(piece)
    return buffer


async def _receive(stream: AsyncIterator, limits: Limits, stats: TransportStats, stop_when_complete: bool = False,
                   admit: Optional[Callable[[dict], None]] = None):
    """Parse a stream into (metadata, tensors), enforcing limits before allocating. `admit(metadata)` runs before any
    tensor is read and may raise to refuse the request. Raises ProtocolError."""
    loop = asyncio.get_running_loop()
    metadata, expected, tensors = None, 0, []
    header, pieces, wire_bytes, decoded_bytes, counted = None, [], 0, 0, 0

    async def finish(tensor_header, tensor_pieces):
        job = lambda: decode(tensor_header, _assemble(tensor_pieces))  # noqa: E731
        try:
            big = sum(map(len, tensor_pieces)) >= _EXECUTOR_BYTES
            tensors.append(await loop.run_in_executor(None, job) if big else job())
        except Exception as e:
            raise ProtocolError(f"tensor {len(tensors)} failed to decode: {_one_line(e)}") from e

    async for message in stream:
        if metadata is None:
            raw = message.metadata
            wire_bytes += len(raw)
            if len(raw) > limits.max_metadata_bytes:
                raise ProtocolError(f"metadata exceeds {limits.max_metadata_bytes} bytes")
            try:
                envelope = msgpack.unpackb(raw, raw=False, strict_map_key=False)  # size is capped above
            except Exception as e:
                raise ProtocolError(f"undecodable metadata: {_one_line(e)}") from e
            if not (isinstance(envelope, dict) and isinstance(envelope.get("m"), dict)
                    and type(envelope.get("n")) is int and 0 <= envelope["n"] <= limits.max_tensors):
                raise ProtocolError(f"bad metadata envelope (at most {limits.max_tensors} tensors)")
            metadata, expected = envelope["m"], envelope["n"]
            if admit is not None:
                admit(metadata)
        elif message.metadata:
            raise ProtocolError("metadata outside the first message")
        for part in message.tensors:
            if part.dtype:  # first part of a new tensor
                if header is not None:
                    raise ProtocolError(f"tensor {len(tensors)} truncated: {len(pieces)}/{header.chunks} parts")
                if len(tensors) >= expected:
                    raise ProtocolError(f"more than the {expected} tensors announced")
                try:
                    decoded_bytes += decoded_nbytes(part)
                except Exception as e:
                    raise ProtocolError(f"tensor {len(tensors)}: {_one_line(e)}") from e
                if decoded_bytes > limits.max_bytes:
                    raise ProtocolError(f"decoded tensors exceed {limits.max_bytes} bytes")
                if part.chunks < 0:
                    raise ProtocolError("negative chunk count")
                header = runtime_pb2.Tensor(size=part.size, dtype=part.dtype, compression=part.compression,
                                            chunks=max(1, part.chunks))
            elif header is None:
                raise ProtocolError("tensor part without a header")
            piece = part.buffer
            pieces.append(piece)
            wire_bytes += len(piece)
            if wire_bytes > limits.max_bytes:
                raise ProtocolError(f"stream exceeds {limits.max_bytes} bytes")
            if len(pieces) == header.chunks:
                await finish(header, pieces)
                header, pieces = None, []
        stats.add(bytes_received=wire_bytes - counted)
        counted = wire_bytes
        if stop_when_complete and header is None and len(tensors) == expected:
            break
    if metadata is None:
        raise ProtocolError("empty stream")
    if header is not None:
        raise ProtocolError(f"tensor {len(tensors)} truncated: {len(pieces)}/{header.chunks} parts")
    if len(tensors) != expected:
        raise ProtocolError(f"stream ended after {len(tensors)} of {expected} tensors")
    return metadata, tensors


async def _linger(requests: AsyncIterator, timeout: float) -> None:
    """After replying, wait for the caller to hang up first (hivemind then cancels us), discarding unread requests.
    If we closed first, p2pd (stream.go: Close, then Reset when the read side errors) can reset the stream before the
    caller's daemon has read our reply: the caller sees an empty or cut reply (seen once in ~3000 calls under load)."""
    async def wait():
        async for _ in requests:
            pass
        await asyncio.sleep(timeout)

    with contextlib.suppress(Exception):
        await asyncio.wait_for(wait(), timeout)


class StageServicer(ServicerBase):
    """Serves rpc_forward: parse the request, `await handler(metadata, tensors, remote_peer)`, stream the reply
    (encoded with `reply_codec`). Any failure becomes an error reply; the servicer itself never raises."""

    def __init__(self, handler: Handler, reply_codec: str = "none", *, max_request_bytes: int = MAX_REQUEST_BYTES,
                 max_tensors: int = MAX_TENSORS, max_metadata_bytes: int = MAX_METADATA_BYTES,
                 request_timeout: float = 120.0, chunk_bytes: int = CHUNK_BYTES, stats: TransportStats = STATS,
                 swarm_key: Optional[SwarmKey] = None, precheck: Optional[Callable[[dict], None]] = None):
        """`precheck(metadata)`: may raise (Busy: backpressure) from the request's metadata alone, before any tensor
        bytes are read: the caller hangs up on the early reply, so a refused request is not uploaded whole."""
        encode(torch.zeros(1), reply_codec)  # validates the codec name now
        self.handler, self.reply_codec, self.chunk_bytes, self.stats = handler, reply_codec, chunk_bytes, stats
        self.swarm_key, self.precheck = swarm_key, precheck
        self.limits = Limits(max_request_bytes, max_tensors, max_metadata_bytes)
        self.request_timeout = request_timeout
        self.lanes = None  # a lanes.LaneServer serving the same handler over direct TCP (rpc_lane hands out tickets)

    def error_reply(self, error: BaseException) -> dict:
        logger.debug(f"error reply: {_one_line(error)}")
        return {"error": _one_line(error), **({"code": BUSY} if isinstance(error, Busy) else {})}

    async def rpc_lane(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A ticket for this peer's direct TCP lane (lanes.py), to the P2P-authenticated caller."""
        try:
            query = msgpack.unpackb(request.metadata, raw=False) if len(request.metadata) <= MAX_METADATA_BYTES else None
        except Exception:
            query = None
        error = auth_error(self.swarm_key, query.get("auth") if isinstance(query, dict) else None, context.remote_id)
        if error:
            self.stats.add(unauthorized=1)
            reply = {"error": error}
        else:
            reply = self.lanes.ticket(context.remote_id) if self.lanes is not None else {"error": "no direct lane"}
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb(reply, use_bin_type=True))

    @classmethod
    def _get_handle_name(cls, namespace: Optional[str], method_name: str) -> str:
        name = f"StageServicer.{method_name}"  # fixed (hivemind uses cls.__name__): subclasses stay reachable
        return name if namespace is None else f"{namespace}::{name}"

    async def rpc_forward(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                          context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        failed = False
        try:
            try:
                def admit(metadata: dict) -> None:  # before any tensor bytes are read
                    error = auth_error(self.swarm_key, metadata.pop("auth", None), context.remote_id)
                    if error:
                        self.stats.add(unauthorized=1)
                        raise ProtocolError(error)
                    if self.precheck is not None:
                        self.precheck(metadata)

                metadata, tensors = await asyncio.wait_for(
                    _receive(requests, self.limits, self.stats, admit=admit), self.request_timeout)
            except asyncio.TimeoutError:
                raise ProtocolError(f"request not complete within {self.request_timeout:g} s") from None
            reply = await self.handler(metadata, tensors, context.remote_id)
            if not (isinstance(reply, tuple) and len(reply) == 2):
                raise TypeError("handler must return (metadata dict, list of tensors)")
            messages = await _encode_async(reply[0], reply[1], self.reply_codec, self.chunk_bytes,
                                           runtime_pb2.ExpertResponse)
        except Exception as e:  # CancelledError (caller gone) passes through
            failed = True
            messages = _encode(self.error_reply(e), [], "none", self.chunk_bytes, runtime_pb2.ExpertResponse)
        self.stats.add(served=1, served_errors=int(failed))
        for message, nbytes in messages:
            self.stats.add(bytes_sent=nbytes)
            yield message
        await _linger(requests, timeout=min(self.request_timeout, 30.0))


async def call_forward(p2p: P2P, peer_id: PeerID, metadata: dict, tensors: list[torch.Tensor], codec: str,
                       timeout: float, namespace: str, *, stats: TransportStats = STATS,
                       max_reply_bytes: int = MAX_REQUEST_BYTES, chunk_bytes: int = CHUNK_BYTES,
                       swarm_key: Optional[SwarmKey] = None, lanes=None) -> tuple[dict, list[torch.Tensor]]:
    """Send (metadata, tensors) to `peer_id`'s StageServicer and return its reply (CPU tensors; move them yourself).
    `lanes` (a lanes.LaneClient): over the peer's direct TCP lane where it has a reachable one, else over P2P.

    Raises RemoteError (error reply), TransportTimeout (nothing complete within `timeout` s, whole exchange),
    TransportError (unreachable peer, broken stream, malformed reply); TypeError/ValueError for bad local inputs.
    """
    limits = Limits(max_reply_bytes, MAX_TENSORS, MAX_METADATA_BYTES)
    if lanes is not None and lanes.reachable(peer_id):
        t0 = asyncio.get_running_loop().time()
        sock = await lanes.connect(peer_id, timeout)
        if sock is not None:
            return await _call_lane(lanes, sock, peer_id, metadata, tensors, codec, timeout, limits, stats)
        timeout = max(0.1, timeout - (asyncio.get_running_loop().time() - t0))  # P2P gets what the lane left
    if swarm_key is not None:
        metadata = {**metadata, "auth": swarm_key.peer_token(p2p.peer_id)}
    messages = await _encode_async(metadata, tensors, codec, chunk_bytes, runtime_pb2.ExpertRequest)
    handle_name = StageServicer._get_handle_name(namespace, "rpc_forward")

    async def requests():
        for message, nbytes in messages:
            stats.add(bytes_sent=nbytes)
            yield message

    async def exchange():
        responses = await p2p.iterate_protobuf_handler(peer_id, handle_name, requests(), runtime_pb2.ExpertResponse)
        async with contextlib.aclosing(responses):  # hang up at once: cancels our writer if the peer replied early
            return await _receive(responses, limits, stats, stop_when_complete=True)

    stats.add(calls=1)
    reply_metadata, reply_tensors = await _timed_exchange(exchange(), peer_id, timeout, stats, "")
    return _checked(reply_metadata, reply_tensors, stats)


async def _timed_exchange(exchange, peer_id, timeout: float, stats: TransportStats, via: str):
    """Await one call's exchange within `timeout`; its failures as TransportTimeout / TransportError."""
    try:
        return await asyncio.wait_for(exchange, timeout)
    except asyncio.TimeoutError as e:
        stats.add(call_failures=1)
        raise TransportTimeout(f"no complete reply from {peer_id} within {timeout:g} s{via}") from e
    except Exception as e:
        stats.add(call_failures=1)
        raise TransportError(f"call to {peer_id} failed{via}: {type(e).__name__}: {_one_line(e)}") from e


def _checked(reply_metadata: dict, reply_tensors: list, stats: TransportStats) -> tuple[dict, list[torch.Tensor]]:
    if "error" in reply_metadata:
        stats.add(call_failures=1)
        raise (Busy if reply_metadata.get("code") == BUSY else RemoteError)(str(reply_metadata["error"])[:300])
    return reply_metadata, reply_tensors


async def _call_lane(lanes, sock, peer_id, metadata, tensors, codec, timeout, limits, stats):
    """call_forward over a direct lane connection: the same errors, the same accounting."""
    stats.add(calls=1, lane_calls=1)
    reusable = False
    try:
        reply_metadata, reply_tensors, reusable = await _timed_exchange(
            lanes.exchange(sock, metadata, tensors, codec, limits, stats), peer_id, timeout, stats, " (direct lane)")
    finally:
        if reusable:
            lanes.release(peer_id, sock)
        else:
            sock.close()
    return _checked(reply_metadata, reply_tensors, stats)
