"""Where one activation hop's time goes (issue 17 item 7): hivemind P2P between two processes on loopback, each with
its p2pd, against raw loopback TCP, for an empty message and for payloads of activation sizes.

    .venv/bin/python scripts/hop_breakdown.py [--seconds 3] [--json out.json]

Rows (p50 round-trip ms, one call in flight, payload there and the same back):
  tcp            raw TCP echo on one open connection (the floor)
  unary          hivemind's unary call: multiplexed over one persistent connection to p2pd (<= 4 MiB messages)
  new stream     a streaming handler called with one message: a new libp2p stream per call (transport.call_forward)
  open stream    one bidirectional protobuf stream kept open, messages in lockstep (what a persistent stream per
                 neighbour would cost)
The gap new - open is the stream set-up per call; open - tcp is p2pd (two unix-socket hops per direction, yamux,
the secure channel) plus protobuf framing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
UNARY_LIMIT = 4 * 2**20 - 4096  # hivemind's unary calls share one persistent p2pd connection, messages <= 4 MiB
SIZES = {"empty": 0, "4x128x192 fp32": 4 * 128 * 192 * 4, "8x512x768 fp32": 8 * 512 * 768 * 4}


def _p2p_server(queue) -> None:
    from hivemind.p2p import P2P
    from hivemind.proto import runtime_pb2

    async def unary(request, context):
        return runtime_pb2.ExpertResponse(metadata=request.metadata)

    async def stream(requests, context):
        async for request in requests:
            yield runtime_pb2.ExpertResponse(metadata=request.metadata)

    async def main():
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        await p2p.add_protobuf_handler("hop_unary", unary, runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler("hop_stream", stream, runtime_pb2.ExpertRequest, stream_input=True,
                                       stream_output=True)
        queue.put((str(p2p.peer_id), [str(m) for m in await p2p.get_visible_maddrs()]))
        await asyncio.Event().wait()

    asyncio.run(main())


def _tcp_server(port_queue) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_queue.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(max(SIZES.values()))
    while True:
        head = bytearray(4)
        if not _recv_into(conn, memoryview(head)):
            return
        (n,) = struct.unpack("!I", head)
        body = memoryview(buf)[:n]
        if not _recv_into(conn, body):
            return
        conn.sendall(head)
        conn.sendall(body)


def _recv_into(sock, view: memoryview) -> bool:
    while view:
        got = sock.recv_into(view)
        if got == 0:
            return False
        view = view[got:]
    return True


def _timed(fn, seconds: float, max_calls: int = 5000) -> list[float]:
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end and len(out) < max_calls:
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


async def _timed_async(fn, seconds: float, max_calls: int = 5000) -> list[float]:
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end and len(out) < max_calls:
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per row and size")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    servers = [ctx.Process(target=_p2p_server, args=(q,), daemon=True), ctx.Process(target=_tcp_server, args=(q,),
                                                                                       daemon=True)]
    servers[0].start()
    peer_id, maddrs = q.get(timeout=60)
    servers[1].start()
    port = q.get(timeout=30)
    rows = []
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for name, n in SIZES.items():
            payload, back = bytes(n), bytearray(4 + n)

            def echo():
                sock.sendall(struct.pack("!I", n))
                sock.sendall(payload)
                _recv_into(sock, memoryview(back))
            rows.append({"case": "tcp", "payload": name, "bytes": n, "calls": 0, "times": _timed(echo, args.seconds)})
        sock.close()
        rows += asyncio.run(_p2p_rows(peer_id, maddrs, args.seconds))
    finally:
        for s in servers:
            s.kill()
    for r in rows:
        times = r.pop("times")
        r.update(calls=len(times), p50_ms=1e3 * statistics.median(times),
                 mib_per_s=2 * r["bytes"] / 2**20 / statistics.median(times))
    floor = {r["payload"]: r["p50_ms"] for r in rows if r["case"] == "tcp"}
    print(f"{'case':<12} {'payload':<16} {'p50 ms':>8} {'MiB/s':>8} {'x tcp':>7} calls")
    for r in rows:
        r["vs_tcp"] = r["p50_ms"] / floor[r["payload"]]
        print(f"{r['case']:<12} {r['payload']:<16} {r['p50_ms']:8.3f} {r['mib_per_s']:8.1f} {r['vs_tcp']:7.1f} "
              f"{r['calls']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


async def _p2p_rows(peer_id: str, maddrs: list[str], seconds: float) -> list[dict]:
    from hivemind.p2p import P2P, PeerID
    from hivemind.proto import runtime_pb2
    p2p = await P2P.create(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    pid = PeerID.from_base58(peer_id)
    rows = []
    try:
        for name, n in SIZES.items():
            request = runtime_pb2.ExpertRequest(metadata=bytes(n))

            async def unary():
                await p2p.call_protobuf_handler(pid, "hop_unary", request, runtime_pb2.ExpertResponse)
            if n <= UNARY_LIMIT:
                await unary()  # the connection is up before timing
                rows.append({"case": "unary", "payload": name, "bytes": n, "times": await _timed_async(unary, seconds)})

            async def new_stream():
                async def one():
                    yield request
                stream = await p2p.iterate_protobuf_handler(pid, "hop_stream", one(), runtime_pb2.ExpertResponse)
                async for _ in stream:
                    break
            await new_stream()
            rows.append({"case": "new stream", "payload": name, "bytes": n,
                         "times": await _timed_async(new_stream, seconds)})

            outbox: asyncio.Queue = asyncio.Queue()

            async def requests():
                while True:
                    item = await outbox.get()
                    if item is None:
                        return
                    yield item
            replies = await p2p.iterate_protobuf_handler(pid, "hop_stream", requests(), runtime_pb2.ExpertResponse)

            async def open_stream():
                await outbox.put(request)
                await replies.__anext__()
            await open_stream()
            rows.append({"case": "open stream", "payload": name, "bytes": n,
                         "times": await _timed_async(open_stream, seconds)})
            await outbox.put(None)
            try:
                await replies.__anext__()
            except StopAsyncIteration:
                pass
    finally:
        await p2p.shutdown()
    return rows


if __name__ == "__main__":
    sys.exit(main())
