"""A direct TCP lane for the pipeline's calls (transport.call_forward) between peers that can reach each other: a hop
then costs a TCP round trip and its bytes, not hivemind's p2pd path (two unix-socket hops and a libp2p stream per call:
~4.7 ms for a small hop and 0.11x loopback TCP for a 12 MiB one; scripts/hop_breakdown.py).

Handshake, through hivemind P2P (a libp2p stream, whose remote peer id is proven by its key): the caller asks the peer
for a lane (`StageServicer.rpc_lane`, with the swarm-key token in a private swarm); the peer answers its TCP endpoints,
a ticket and a proof (random, TOKEN_BYTES each) and keeps ticket -> (caller's peer id, proof) for TICKET_S. The caller
connects and sends the ticket; the peer answers the proof. Only that caller got the ticket and only that peer knows the
proof, so each side knows whom it talks to, as on the P2P stream. Unlike a P2P stream a lane is not encrypted: set
`swarm.direct_lanes: false` where the path between peers is not trusted. A peer without a reachable lane is called
over P2P (remembered for UNREACHABLE_S).

Frames, both directions, one call at a time per connection, many calls per connection: a 4-byte big-endian length, a
msgpack header {"m": metadata, "t": [[tensor header (runtime_pb2.Tensor without its buffer, serialized), payload
bytes], ...]}, then the payloads back to back (received straight into the buffers the tensors are made from). Caps
(transport.Limits) are checked from the header before anything is allocated. A refusal from the metadata alone (busy)
is answered before any payload is read, and the server then closes the connection: the caller stops uploading.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass

import msgpack
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarm_peer.compression import decode, decoded_nbytes, encode

TOKEN_BYTES = 32
TICKET_S = 600.0  # how long a ticket opens connections (a caller asks for a new one after half of it)
MAX_TICKETS = 4096
MAX_CONNECTIONS = 256  # open lane connections a server keeps (more are closed at once)
HANDSHAKE_S = 5.0
IDLE_S = 120.0  # a server closes a connection idle this long; a caller reuses one idle for less than a quarter of it
UNREACHABLE_S = 60.0  # a peer whose lane could not be reached, or that has none, is called over P2P this long
CONNECT_S = 1.0
MAX_TENSOR_HEADER = 1024  # bytes of one serialized tensor header
_EXECUTOR_BYTES = 4 << 20  # encode/decode compressed tensors bigger than this off the event loop
_LENGTH = struct.Struct(">I")
log = logging.getLogger(__name__)


class LaneProtocolError(ValueError):
    """A malformed or oversized frame (the connection is closed after the error reply)."""


# ------------------------------------------------------------------------------------------------ frames
async def _frame(metadata: dict, tensors: list, codec: str) -> list:
    """The buffers of one frame: length + header, then each tensor's payload (zero-copy views where uncompressed)."""
    def build():
        headers, payloads = [], []
        for tensor in tensors:
            header, payload = encode(tensor, codec)
            headers.append([header.SerializeToString(), len(payload)])
            payloads.append(payload)
        head = msgpack.packb({"m": metadata, "t": headers}, use_bin_type=True)
        return [_LENGTH.pack(len(head)) + head, *payloads]
    if codec != "none" and sum(t.numel() * t.element_size() for t in tensors) >= _EXECUTOR_BYTES:
        return await asyncio.get_running_loop().run_in_executor(None, build)
    return build()


SEND_SLICE = 1 << 20  # bytes per send call: what a cancelled upload had handed to the kernel is known to a slice


async def _send(sock: socket.socket, buffers: list, progress: list | None = None) -> int:
    """Send the buffers; `progress[0]` counts the bytes handed to the kernel so far (read it after a cancel)."""
    loop, progress = asyncio.get_running_loop(), progress if progress is not None else [0]
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        for start in range(0, len(view), SEND_SLICE):
            piece = view[start: start + SEND_SLICE]
            await loop.sock_sendall(sock, piece)
            progress[0] += len(piece)
    return progress[0]


async def _read_exactly(sock: socket.socket, size: int) -> bytearray:
    loop, buffer = asyncio.get_running_loop(), bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            raise ConnectionError(f"connection closed after {got} of {size} bytes")
        got += n
    return buffer


async def _read_head(sock: socket.socket, limits) -> tuple[dict, list[tuple[runtime_pb2.Tensor, int]]]:
    """A frame's metadata and tensor headers, every cap checked before the payloads are read (or allocated)."""
    (size,) = _LENGTH.unpack(await _read_exactly(sock, _LENGTH.size))
    if size > limits.max_metadata_bytes + limits.max_tensors * MAX_TENSOR_HEADER:
        raise LaneProtocolError(f"frame header of {size} bytes exceeds the cap")
    try:
        envelope = msgpack.unpackb(bytes(await _read_exactly(sock, size)), raw=False, strict_map_key=False)
    except (ConnectionError, OSError):
        raise
    except Exception as e:
        raise LaneProtocolError(f"undecodable frame header: {type(e).__name__}") from e
    parts = envelope.get("t") if isinstance(envelope, dict) else None
    if not (isinstance(envelope, dict) and isinstance(envelope.get("m"), dict) and isinstance(parts, list)
            and len(parts) <= limits.max_tensors):
        raise LaneProtocolError(f"bad frame header (at most {limits.max_tensors} tensors)")
    headers, wire, decoded = [], 0, 0
    for part in parts:
        if not (isinstance(part, list) and len(part) == 2 and isinstance(part[0], bytes)
                and len(part[0]) <= MAX_TENSOR_HEADER and type(part[1]) is int and part[1] >= 0):
            raise LaneProtocolError("bad tensor header")
        try:
            header = runtime_pb2.Tensor.FromString(part[0])
            decoded += decoded_nbytes(header)
        except Exception as e:
            raise LaneProtocolError(f"tensor {len(headers)}: {type(e).__name__}: {e}"[:200]) from e
        wire += part[1]
        if wire > limits.max_bytes or decoded > limits.max_bytes:
            raise LaneProtocolError(f"tensors exceed {limits.max_bytes} bytes")
        headers.append((header, part[1]))
    return envelope["m"], headers


async def _read_tensors(sock: socket.socket, headers: list) -> list[torch.Tensor]:
    loop, tensors = asyncio.get_running_loop(), []
    for header, size in headers:
        buffer = await _read_exactly(sock, size)
        try:
            if header.compression != runtime_pb2.CompressionType.NONE and size >= _EXECUTOR_BYTES:
                tensors.append(await loop.run_in_executor(None, decode, header, buffer))
            else:
                tensors.append(decode(header, buffer))  # uncompressed: the tensor is made on `buffer`, no copy
        except Exception as e:
            raise LaneProtocolError(f"tensor {len(tensors)} failed to decode: {type(e).__name__}: {e}"[:200]) from e
    return tensors


def _set_options(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# ------------------------------------------------------------------------------------------------ server
@dataclass
class _Ticket:
    peer_id: PeerID
    proof: bytes
    expires: float


class LaneServer:
    """Serves a StageServicer's handler over direct TCP connections (one task per connection)."""

    def __init__(self, servicer, bind_host: str, hosts: list[str], port: int = 0):
        """`bind_host`: the address to listen on (0.0.0.0: all); `hosts`: the addresses callers are told to try."""
        self.servicer, self.bind_host, self.port, self.hosts = servicer, bind_host, port, hosts
        self._tickets: dict[bytes, _Ticket] = {}
        self._connections: set[asyncio.Task] = set()
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.bind_host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.bind_host, self.port))
        listener.listen(64)
        listener.setblocking(False)
        self._listener, self.port = listener, listener.getsockname()[1]
        self._accepting = asyncio.create_task(self._accept())

    def ticket(self, peer_id: PeerID) -> dict:
        """A new ticket for `peer_id` (whose P2P stream asked for it): what rpc_lane answers."""
        now = time.monotonic()
        if len(self._tickets) >= MAX_TICKETS:
            self._tickets = {k: t for k, t in self._tickets.items() if t.expires > now}
            while len(self._tickets) >= MAX_TICKETS:  # the oldest first
                self._tickets.pop(next(iter(self._tickets)))
        ticket, proof = os.urandom(TOKEN_BYTES), os.urandom(TOKEN_BYTES)
        self._tickets[ticket] = _Ticket(peer_id, proof, now + TICKET_S)
        return {"hosts": self.hosts, "port": self.port, "ticket": ticket, "proof": proof}

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except asyncio.CancelledError:
                raise
            except OSError as e:  # e.g. out of file descriptors: do not spin
                log.debug(f"lane accept failed: {e}")
                await asyncio.sleep(0.1)
                continue
            if len(self._connections) >= MAX_CONNECTIONS:
                sock.close()
                continue
            task = asyncio.create_task(self._serve(sock))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, sock: socket.socket) -> None:
        servicer = self.servicer
        try:
            _set_options(sock)
            token = bytes(await asyncio.wait_for(_read_exactly(sock, TOKEN_BYTES), HANDSHAKE_S))
            entry = self._tickets.get(token)
            if entry is None or entry.expires < time.monotonic():
                return
            await asyncio.get_running_loop().sock_sendall(sock, entry.proof)
            while True:
                try:
                    metadata, headers = await asyncio.wait_for(_read_head(sock, servicer.limits), IDLE_S)
                except asyncio.TimeoutError:
                    return  # idle (or a header that never completes)
                except LaneProtocolError as e:
                    return await self._refuse(sock, e)
                try:
                    if servicer.precheck is not None:
                        servicer.precheck(metadata)  # before any payload byte is read
                    tensors = await asyncio.wait_for(_read_tensors(sock, headers), servicer.request_timeout)
                except asyncio.TimeoutError:
                    return await self._refuse(sock, LaneProtocolError(
                        f"request not complete within {servicer.request_timeout:g} s"))
                except (ConnectionError, OSError):
                    return
                except Exception as e:  # busy, malformed: answered, then the connection is closed
                    return await self._refuse(sock, e)
                servicer.stats.add(bytes_received=sum(size for _, size in headers))
                try:
                    reply = await servicer.handler(metadata, tensors, entry.peer_id)
                    if not (isinstance(reply, tuple) and len(reply) == 2):
                        raise TypeError("handler must return (metadata dict, list of tensors)")
                    frame, failed = await _frame(reply[0], reply[1], servicer.reply_codec), False
                except Exception as e:
                    frame, failed = await _frame(servicer.error_reply(e), [], "none"), True
                servicer.stats.add(served=1, served_errors=int(failed), bytes_sent=await _send(sock, frame))
        except (ConnectionError, OSError, asyncio.TimeoutError, LaneProtocolError):
            pass
        finally:
            sock.close()

    async def _refuse(self, sock: socket.socket, error: Exception) -> None:
        self.servicer.stats.add(served=1, served_errors=1)
        with contextlib.suppress(ConnectionError, OSError):
            await _send(sock, await _frame(self.servicer.error_reply(error), [], "none"))

    async def close(self) -> None:
        tasks = [t for t in (self._accepting, *self._connections) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._listener is not None:
            self._listener.close()


# ------------------------------------------------------------------------------------------------ client
@dataclass
class _Lane:
    hosts: list[str]
    port: int
    ticket: bytes
    proof: bytes
    issued: float


class LaneClient:
    """The caller's side: a ticket per peer, a few idle connections per peer, P2P for peers without a lane."""

    def __init__(self, p2p: P2P, namespace: str, swarm_key=None, max_idle: int = 8):
        self.p2p, self.namespace, self.swarm_key, self.max_idle = p2p, namespace, swarm_key, max_idle
        self._lanes: dict[PeerID, _Lane] = {}
        self._unreachable: dict[PeerID, float] = {}  # peer -> until when it is called over P2P
        self._idle: dict[PeerID, list[tuple[socket.socket, float]]] = {}

    def reachable(self, peer_id: PeerID) -> bool:
        return self._unreachable.get(peer_id, 0.0) <= time.monotonic()

    async def connect(self, peer_id: PeerID, timeout: float) -> socket.socket | None:
        """An authenticated connection to `peer_id`'s lane (an idle one when there is one), or None: call over P2P."""
        now = time.monotonic()
        if not self.reachable(peer_id):
            return None
        idle = self._idle.get(peer_id, [])
        while idle:
            sock, since = idle.pop()
            if now - since < IDLE_S / 4:
                return sock
            sock.close()
        lane = self._lanes.get(peer_id)
        sock = await self._open(lane, timeout) if lane is not None and now - lane.issued < TICKET_S / 2 else None
        if sock is None:  # no ticket yet, an old one, or the peer restarted elsewhere: ask (again)
            lane = await self._ask(peer_id, timeout)
            sock = await self._open(lane, timeout) if lane is not None else None
        if sock is None:
            self._lanes.pop(peer_id, None)
            self._unreachable[peer_id] = time.monotonic() + UNREACHABLE_S
        return sock

    def release(self, peer_id: PeerID, sock: socket.socket) -> None:
        """A connection whose last call completed: kept for the next call."""
        idle = self._idle.setdefault(peer_id, [])
        if len(idle) < self.max_idle:
            idle.append((sock, time.monotonic()))
        else:
            sock.close()

    async def _ask(self, peer_id: PeerID, timeout: float) -> _Lane | None:
        from swarm_peer.transport import StageServicer

        query = {"auth": self.swarm_key.peer_token(self.p2p.peer_id)} if self.swarm_key is not None else {}
        request = runtime_pb2.ExpertRequest(metadata=msgpack.packb(query, use_bin_type=True))
        try:
            response = await asyncio.wait_for(self.p2p.call_protobuf_handler(
                peer_id, StageServicer._get_handle_name(self.namespace, "rpc_lane"), request,
                runtime_pb2.ExpertResponse), min(timeout, 10.0))
            reply = msgpack.unpackb(response.metadata, raw=False)
        except Exception as e:  # unreachable, too old to have lanes, or a malformed answer
            log.debug(f"no lane from {peer_id}: {type(e).__name__}: {e}")
            return None
        hosts = reply.get("hosts") if isinstance(reply, dict) else None
        if not (isinstance(hosts, list) and all(isinstance(h, str) for h in hosts) and type(reply.get("port")) is int
                and 0 < reply["port"] < 65536 and all(isinstance(reply.get(k), bytes) and len(reply[k]) == TOKEN_BYTES
                                                     for k in ("ticket", "proof"))):
            return None  # e.g. {"error": "no direct lane"}
        lane = _Lane(hosts[:4], reply["port"], reply["ticket"], reply["proof"], time.monotonic())
        self._lanes[peer_id] = lane
        return lane

    async def _open(self, lane: _Lane, timeout: float) -> socket.socket | None:
        loop = asyncio.get_running_loop()
        for host in lane.hosts:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            try:
                _set_options(sock)
                await asyncio.wait_for(loop.sock_connect(sock, (host, lane.port)), min(CONNECT_S, timeout))
                await loop.sock_sendall(sock, lane.ticket)
                proof = await asyncio.wait_for(_read_exactly(sock, TOKEN_BYTES), min(HANDSHAKE_S, timeout))
                if hmac.compare_digest(bytes(proof), lane.proof):
                    return sock
            except (OSError, ConnectionError, asyncio.TimeoutError):
                pass
            sock.close()
        return None

    async def exchange(self, sock: socket.socket, metadata: dict, tensors: list, codec: str, limits,
                       stats) -> tuple[dict, list[torch.Tensor], bool]:
        """One call on `sock`: (reply metadata, reply tensors, whether the connection can be reused). Raises
        ConnectionError/OSError/LaneProtocolError on a broken exchange (the caller closes the connection)."""
        frame, progress = await _frame(metadata, tensors, codec), [0]
        upload = asyncio.ensure_future(_send(sock, frame, progress))  # the reply may come early: a refusal from
        try:  # the metadata alone, before the payloads are read
            reply, headers = await _read_head(sock, limits)
            reply_tensors = await _read_tensors(sock, headers)
        finally:
            uploaded = upload.done() and not upload.cancelled() and upload.exception() is None
            if not upload.done():
                upload.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await upload
            stats.add(bytes_sent=progress[0])
        stats.add(bytes_received=sum(size for _, size in headers))
        return reply, reply_tensors, uploaded and "error" not in reply

    def close(self) -> None:
        for idle in self._idle.values():
            for sock, _ in idle:
                sock.close()
        self._idle.clear()
