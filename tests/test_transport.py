"""swarm_peer.transport over real hivemind DHT + P2P: the servers run in separate OS processes (this file, run as a
script with --serve), each in its own session so teardown can kill it and its p2pd by process group."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "test-run"
SERVER_MAX_BYTES = 24 << 20  # the 20 MiB payload fits, 32 MiB does not
CODECS = ("none", "fp16", "bf16", "8bit")
REQUEST_TIMEOUT = 3.0  # servers give up on a request stream that stalls this long


# ------------------------------------------------------------------------------------------------- server process
def _serve() -> None:
    from swarm_peer.event_loop import serve_until_eof
    from swarm_peer.transport import Busy, StageServicer

    async def handler(metadata, tensors, remote_peer):
        op = metadata.get("op", "echo")
        if op == "fail":
            raise ValueError("handler failed\non purpose")
        if op == "busy":
            raise Busy("queue full")
        if op == "says_busy":  # an ordinary error whose text merely starts with "busy": not backpressure
            raise RuntimeError("busy: but a real failure")
        if op == "sleep":
            await asyncio.sleep(metadata["seconds"])
        if op == "bad_reply":
            return "not a tuple"
        if op == "double":
            tensors = [2 * t if t.is_floating_point() else t for t in tensors]
        return {"op": op, "dtypes": [str(t.dtype) for t in tensors], "peer": str(remote_peer)}, tensors

    def precheck(metadata):  # backpressure from the metadata alone, before the tensors are read
        if metadata.get("op") == "busy_early":
            raise Busy("synchronizing")

    serve_until_eof({f"{NAMESPACE}-{codec}": StageServicer(handler, codec, max_request_bytes=SERVER_MAX_BYTES,
                                                           request_timeout=REQUEST_TIMEOUT, precheck=precheck)
                     for codec in CODECS})  # one namespace per reply codec


class Server:
    def __init__(self):
        env = dict(os.environ, PYTHONPATH=str(ROOT), HIVEMIND_LOGLEVEL="ERROR")
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=ROOT, env=env, start_new_session=True)

    def ready(self, timeout: float = 60) -> "Server":
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise TimeoutError("server did not start")
        info = json.loads(self.proc.stdout.readline() or b"null")
        assert info, f"server exited with {self.proc.poll()}"
        self.peer_id, self.maddrs = info["peer_id"], info["maddrs"]
        return self

    def kill(self) -> None:
        """Graceful first (stdin EOF: the DHT shuts its p2pd down), then SIGKILL whatever is left in its group."""
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group = the server, its DHT process and p2pd
        self.proc.wait(10)

    def crash(self) -> None:
        """SIGKILL the whole group, then remove the unix socket files its processes were listening on (a graceful
        shutdown removes them; a killed p2pd/DHT leaves /tmp/hivemind-*.sock behind)."""
        sockets = _listening_unix_sockets(self.proc.pid)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        for path in sockets:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _listening_unix_sockets(pgid: int) -> list:
    """Paths of /tmp/hivemind-*.sock unix sockets held by the processes of a process group (Linux /proc)."""
    inodes = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if os.getpgid(int(pid)) == pgid:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        link = os.readlink(f"/proc/{pid}/fd/{fd}")
                        if link.startswith("socket:["):
                            inodes.add(link[8:-1])
    with contextlib.suppress(OSError), open("/proc/net/unix") as table:
        rows = [line.split() for line in table.readlines()[1:]]
        return sorted({r[7] for r in rows if len(r) >= 8 and r[6] in inodes and r[7].startswith("/tmp/hivemind-")})
    return []


@pytest.fixture(scope="module")
def servers():
    started = [Server(), Server(), Server()]  # [0] serves every test, [1] and [2] are killed by test_dead_peer
    try:
        yield [s.ready() for s in started]
    finally:
        for server in started:
            server.kill()


@pytest.fixture(scope="module", params=["p2p", "lane"])
def client(servers, request):
    """The caller: every call through hivemind P2P, or (lane) over the servers' direct TCP lanes (lanes.py)."""
    import hivemind

    from swarm_peer.event_loop import LoopThread
    from swarm_peer.lanes import LaneClient

    dht = hivemind.DHT(initial_peers=[m for s in servers for m in s.maddrs], start=True)
    loop = LoopThread()
    try:
        p2p = loop.run(dht.replicate_p2p(), 30)
        lanes = {codec: LaneClient(p2p, f"{NAMESPACE}-{codec}") for codec in CODECS} if request.param == "lane" else None
        yield Client(loop, p2p, lanes)
    finally:
        loop.stop()
        dht.shutdown()


class Client(tuple):
    """(loop, p2p), and the lane clients (one per server namespace) or None."""
    def __new__(cls, loop, p2p, lanes):
        self = super().__new__(cls, (loop, p2p))
        self.lanes = lanes
        return self


def _peer(server):
    from hivemind.p2p import PeerID

    return PeerID.from_base58(server.peer_id)


def _call(client, server, metadata, tensors, codec="none", timeout=10.0, reply_codec="none", **kwargs):
    from swarm_peer.transport import call_forward

    loop, p2p = client
    if client.lanes is not None:
        kwargs = {"lanes": client.lanes[reply_codec], **kwargs}
    coro = call_forward(p2p, _peer(server), metadata, tensors, codec, timeout, f"{NAMESPACE}-{reply_codec}", **kwargs)
    stats = kwargs.get("stats")
    lane_calls = stats.snapshot()["lane_calls"] if stats is not None else None
    try:
        return loop.run(coro, timeout + 5)
    finally:  # over the lane indeed
        assert stats is None or stats.snapshot()["lane_calls"] - lane_calls == int(client.lanes is not None)


def _raw_call(client, server, messages, timeout=10.0, stall: float = 0):
    """Send hand-made request messages (then stall, if asked); return the reply metadata ({"error": ...})."""
    from hivemind.proto import runtime_pb2

    from swarm_peer.transport import STATS, Limits, StageServicer, _receive

    loop, p2p = client

    async def go():
        async def requests():
            for message in messages:
                yield message
            await asyncio.sleep(stall)

        name = StageServicer._get_handle_name(f"{NAMESPACE}-none", "rpc_forward")
        responses = await p2p.iterate_protobuf_handler(_peer(server), name, requests(), runtime_pb2.ExpertResponse)
        async with contextlib.aclosing(responses):
            return (await _receive(responses, Limits(), STATS, stop_when_complete=True))[0]

    return loop.run(asyncio.wait_for(go(), timeout), timeout + 5)


def _assert_alive(client, server):
    metadata, (y,) = _call(client, server, {"op": "double"}, [torch.ones(3)])
    assert metadata["op"] == "double" and torch.equal(y, torch.full((3,), 2.0))


# ------------------------------------------------------------------------------------------------- tests
pytestmark = [pytest.mark.slow, pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore:The given NumPy array is not writable"),
              pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")]


def test_small_call(client, servers):
    from swarm_peer.transport import STATS

    before = STATS.snapshot()
    x, ids = torch.randn(4, 8, 16), torch.randint(0, 257, (4, 8))
    metadata, (y, ids_back) = _call(client, servers[0], {"op": "double", "step": 7, "nested": {"a": [1, 2]}}, [x, ids])
    assert metadata["op"] == "double" and metadata["dtypes"] == ["torch.float32", "torch.int64"]
    assert torch.equal(y, 2 * x) and torch.equal(ids_back, ids)
    after = STATS.snapshot()
    assert after["bytes_sent"] - before["bytes_sent"] >= x.numel() * 4 + ids.numel() * 8
    assert after["bytes_received"] - before["bytes_received"] >= x.numel() * 4 + ids.numel() * 8
    assert after["calls"] == before["calls"] + 1


def test_metadata_only_and_empty_tensor(client, servers):
    metadata, tensors = _call(client, servers[0], {"op": "echo"}, [])
    assert metadata["op"] == "echo" and tensors == []
    _, (empty, scalar) = _call(client, servers[0], {}, [torch.zeros(0, 5), torch.tensor(3.5)], codec="8bit")
    assert empty.shape == (0, 5) and scalar.item() == 3.5


def test_large_payload_above_unary_limit(client, servers):
    x = torch.randn(5 << 20)  # 20 MiB of fp32 (the unary limit is 4 MiB)
    start = time.perf_counter()
    _, (y,) = _call(client, servers[0], {"op": "double"}, [x], timeout=30)
    assert torch.equal(y, 2 * x)
    assert time.perf_counter() - start < 15


@pytest.mark.parametrize("codec", CODECS)
def test_codecs(client, servers, codec):
    bound = {"none": 0.0, "fp16": 1e-3, "bf16": 1e-2, "8bit": 0.05}[codec]
    x, ids = torch.randn(4, 128, 192), torch.randint(0, 50000, (4, 128))
    metadata, (y, ids_back) = _call(client, servers[0], {"op": "double"}, [x, ids], codec=codec, reply_codec=codec)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert ((y - 2 * x).norm() / (2 * x).norm()).item() <= 2 * bound + 1e-7  # lossy twice: request and reply
    assert torch.equal(ids_back, ids)  # integers never compressed


def test_handler_error_is_remote_error_and_backpressure_is_typed(client, servers):
    from swarm_peer.transport import Busy, RemoteError

    with pytest.raises(RemoteError, match="handler failed on purpose") as failed:
        _call(client, servers[0], {"op": "fail"}, [torch.ones(2)])
    assert not isinstance(failed.value, Busy)
    with pytest.raises(Busy) as busy:  # a code on the wire, not a prefix of the message
        _call(client, servers[0], {"op": "busy"}, [])
    assert str(busy.value) == "queue full"
    with pytest.raises(RemoteError) as says_busy:
        _call(client, servers[0], {"op": "says_busy"}, [])
    assert not isinstance(says_busy.value, Busy)
    with pytest.raises(RemoteError, match="handler must return"):
        _call(client, servers[0], {"op": "bad_reply"}, [])
    _assert_alive(client, servers[0])


def test_busy_before_upload_saves_the_upload(client, servers):
    """A refusal the servicer can make from the metadata comes before the tensors are uploaded: the caller hangs up
    on it. Before: `busy` came after the whole request had been read (at GPT-2-small size, 25 MiB per microbatch)."""
    from swarm_peer.transport import Busy, TransportStats

    x = torch.randn(5 << 20)  # 20 MiB of fp32 (the test server takes up to 24 MiB)
    late, early = TransportStats(), TransportStats()
    with pytest.raises(Busy):  # refused by the handler, after the upload
        _call(client, servers[0], {"op": "busy"}, [x], timeout=30, stats=late)
    with pytest.raises(Busy, match="synchronizing"):
        _call(client, servers[0], {"op": "busy_early"}, [x], timeout=30, stats=early)
    sent_late, sent_early = late.snapshot()["bytes_sent"], early.snapshot()["bytes_sent"]
    assert sent_late >= x.numel() * 4 and sent_early < sent_late / 4, (sent_early, sent_late)
    print(f"\nbusy before upload: {sent_early / 2**20:.2f} MiB uploaded, after upload: {sent_late / 2**20:.2f} MiB")
    _assert_alive(client, servers[0])


def test_oversized_request_rejected(client, servers):
    from swarm_peer.transport import RemoteError

    start = time.perf_counter()
    with pytest.raises(RemoteError, match="exceed"):
        _call(client, servers[0], {}, [torch.zeros(8 << 20)])  # 32 MiB > 24 MiB cap, rejected at the header
    assert time.perf_counter() - start < 5
    with pytest.raises(RemoteError, match="tensors"):
        _call(client, servers[0], {}, [torch.zeros(1)] * 100)  # more than MAX_TENSORS
    _assert_alive(client, servers[0])


def test_malformed_requests_get_error_replies(client, servers):
    if client.lanes is not None:
        pytest.skip("hivemind P2P streams: the lane's own are test_lane_*")
    from hivemind.proto import runtime_pb2

    from swarm_peer.transport import _encode

    Request = runtime_pb2.ExpertRequest
    envelope = msgpack.packb({"n": 1, "m": {}})
    huge = runtime_pb2.Tensor(buffer=b"x" * 16, size=[1 << 20, 1 << 12], dtype="float32", chunks=1)  # claims 16 GiB
    cases = {
        "undecodable metadata": [Request(metadata=b"\xc1\xc1 not msgpack")],
        "bad metadata envelope": [Request(metadata=msgpack.packb([1, 2, 3]))],
        "metadata exceeds": [Request(metadata=b"\x00" * (65 << 10))],
        "decoded tensors exceed": [Request(metadata=envelope, tensors=[huge])],
        "failed to decode": [Request(metadata=envelope, tensors=[
            runtime_pb2.Tensor(buffer=b"abc", size=[4], dtype="float32", chunks=1)])],
        "unsupported dtype": [Request(metadata=envelope, tensors=[
            runtime_pb2.Tensor(buffer=b"abcd", size=[1], dtype="object", chunks=1)])],
        "part without a header": [Request(metadata=envelope, tensors=[runtime_pb2.Tensor(buffer=b"abcd")])],
        "more than the 1 tensors": [Request(metadata=envelope, tensors=[
            runtime_pb2.Tensor(buffer=b"abcd", size=[1], dtype="float32", chunks=1)] * 2)],
        "empty stream": [],
        "ended after 0 of 1": [Request(metadata=envelope)],
    }
    # truncated: a 3 MiB tensor in 1 MiB parts, last message dropped
    truncated = _encode({}, [torch.randn(3 << 18)], "none", 1 << 20, Request)
    assert len(truncated) >= 3
    cases["truncated"] = [message for message, _ in truncated[:-1]]
    for expected, messages in cases.items():
        reply = _raw_call(client, servers[0], messages)
        assert expected in reply.get("error", ""), (expected, reply)
    _assert_alive(client, servers[0])


def test_stalled_request_gets_error_reply(client, servers):
    if client.lanes is not None:
        pytest.skip("hivemind P2P streams: the lane's own are test_lane_*")
    from hivemind.proto import runtime_pb2

    from swarm_peer.transport import _encode

    messages = _encode({}, [torch.randn(3 << 18)], "none", 1 << 20, runtime_pb2.ExpertRequest)
    start = time.perf_counter()
    reply = _raw_call(client, servers[0], [messages[0][0]], stall=60, timeout=REQUEST_TIMEOUT + 5)
    assert "not complete within" in reply["error"]
    assert REQUEST_TIMEOUT - 0.5 < time.perf_counter() - start < REQUEST_TIMEOUT + 3
    _assert_alive(client, servers[0])


def test_client_hangs_up_mid_tensor(client, servers):
    if client.lanes is not None:
        pytest.skip("hivemind P2P streams: the lane's own are test_lane_*")
    from hivemind.proto import runtime_pb2

    from swarm_peer.transport import StageServicer, _encode

    loop, p2p = client
    (first, _), *_ = _encode({}, [torch.randn(3 << 18)], "none", 1 << 20, runtime_pb2.ExpertRequest)

    async def hang_up():
        async def requests():
            yield first
            await asyncio.sleep(60)  # stuck mid-tensor until we give up

        name = StageServicer._get_handle_name(f"{NAMESPACE}-none", "rpc_forward")
        responses = await p2p.iterate_protobuf_handler(_peer(servers[0]), name, requests(), runtime_pb2.ExpertResponse)
        pending = asyncio.ensure_future(responses.__anext__())
        await asyncio.sleep(0.5)
        pending.cancel()  # like a caller whose timeout fired: the stream is closed mid-tensor
        with contextlib.suppress(BaseException):
            await pending

    loop.run(hang_up(), 10)
    _assert_alive(client, servers[0])


def _raw_lane(client, server, data: bytes, ticket: bytes | None = None, stall: float = 0, timeout: float = 10.0):
    """Open a lane to `server` with a real ticket (or `ticket`), send `data`, stall, then half-close; return the reply
    frame's metadata, or None when the server closed the connection without one."""
    import socket

    from swarm_peer import lanes
    from swarm_peer.transport import Limits

    loop, p2p = client
    lane_client = client.lanes["none"]

    async def go():
        lane = await lane_client._ask(_peer(server), 5)
        sock = socket.create_connection((lane.hosts[0], lane.port), 5)
        sock.setblocking(False)
        try:
            aio = asyncio.get_running_loop()
            await aio.sock_sendall(sock, ticket if ticket is not None else lane.ticket)
            try:
                proof = await lanes._read_exactly(sock, lanes.TOKEN_BYTES)
            except ConnectionError:
                return None
            assert bytes(proof) == lane.proof
            await aio.sock_sendall(sock, data)
            await asyncio.sleep(stall)
            sock.shutdown(socket.SHUT_WR)
            try:
                reply, headers = await lanes._read_head(sock, Limits())
            except ConnectionError:
                return None
            await lanes._read_tensors(sock, headers)
            return reply
        finally:
            sock.close()

    return loop.run(asyncio.wait_for(go(), timeout), timeout + 5)


def _lane_frame(header) -> bytes:
    head = msgpack.packb(header, use_bin_type=True)
    return len(head).to_bytes(4, "big") + head


def test_lane_refuses_malformed_frames_and_strangers(client, servers):
    """A lane connection without this caller's ticket gets nothing; a malformed or oversized frame gets an error
    reply (caps checked from the header, before anything is allocated), then the server closes it; the server goes
    on serving."""
    if client.lanes is None:
        pytest.skip("the direct lane's own protocol")
    from hivemind.proto import runtime_pb2

    def tensor(**fields):
        return runtime_pb2.Tensor(**fields).SerializeToString()

    assert _raw_lane(client, servers[0], b"", ticket=bytes(32)) is None  # a stranger: closed, no proof
    cases = {
        "undecodable frame header": len(b"\xc1\xc1 x").to_bytes(4, "big") + b"\xc1\xc1 x",
        "bad frame header": _lane_frame([1, 2, 3]),
        "exceeds the cap": (10 << 20).to_bytes(4, "big"),
        "at most 64 tensors": _lane_frame({"m": {}, "t": [[tensor(size=[1], dtype="float32"), 4]] * 65}),
        "bad tensor header": _lane_frame({"m": {}, "t": [["not bytes", 4]]}),
        "tensors exceed": _lane_frame({"m": {}, "t": [[tensor(size=[1 << 20, 1 << 12], dtype="float32"), 16]]}),
        "unsupported dtype": _lane_frame({"m": {}, "t": [[tensor(size=[1], dtype="object"), 4]]}),
        "failed to decode": _lane_frame({"m": {}, "t": [[tensor(size=[4], dtype="float32"), 3]]}) + b"abc",
    }
    for expected, data in cases.items():
        reply = _raw_lane(client, servers[0], data)
        assert reply is not None and expected in reply.get("error", ""), (expected, reply)
    # truncated: announces 4 MiB, sends 1 MiB and hangs up: no reply, nothing served
    truncated = _lane_frame({"m": {}, "t": [[tensor(size=[1 << 20], dtype="float32"), 4 << 20]]}) + bytes(1 << 20)
    assert _raw_lane(client, servers[0], truncated) is None
    # stalled mid-payload: an error reply after the server's request timeout
    start = time.perf_counter()
    reply = _raw_lane(client, servers[0], truncated, stall=REQUEST_TIMEOUT + 1, timeout=REQUEST_TIMEOUT + 10)
    assert "not complete within" in reply["error"], reply
    assert REQUEST_TIMEOUT - 0.5 < time.perf_counter() - start < REQUEST_TIMEOUT + 3
    _assert_alive(client, servers[0])


def test_timeout(client, servers):
    from swarm_peer.transport import TransportError, TransportTimeout

    start = time.perf_counter()
    with pytest.raises(TransportTimeout):
        _call(client, servers[0], {"op": "sleep", "seconds": 3}, [torch.ones(2)], timeout=0.5)
    assert time.perf_counter() - start < 2.5
    assert issubclass(TransportTimeout, TransportError)
    _assert_alive(client, servers[0])


def test_dead_peer_fails_fast(client, servers):
    from swarm_peer.transport import TransportError

    victim = servers[1 if client.lanes is None else 2]  # one per client (p2p, lane)
    _assert_alive(client, victim)  # connected once, then SIGKILLed (with its DHT and p2pd)
    victim.crash()
    start = time.perf_counter()
    with pytest.raises(TransportError):
        _call(client, victim, {"op": "double"}, [torch.ones(2)], timeout=10)
    assert time.perf_counter() - start < 5
    _assert_alive(client, servers[0])


def test_loop_thread():
    from swarm_peer.event_loop import LoopThread

    async def add(a, b):
        await asyncio.sleep(0.01)
        return a + b

    with LoopThread() as loop:
        assert loop.run(add(1, 2), 5) == 3
        assert loop.submit(add(3, 4)).result(5) == 7
        pending = loop.submit(asyncio.sleep(60))
        with pytest.raises(TimeoutError):
            loop.run(asyncio.sleep(60), 0.05)
    assert pending.cancelled() and loop.loop.is_closed()
    loop.stop()  # idempotent


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
