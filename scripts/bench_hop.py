"""Benchmark one pipeline hop: call_forward sends an activation to a server in another process, which replies with a
same-shaped tensor (like the gradient), per codec; baseline: raw loopback TCP moving the same fp32 bytes both ways
(echo server in its own process).

    .venv/bin/python scripts/bench_hop.py [--seconds 3] [--json out.json] [--chunk-sweep 65536,1048576]
                                          [--bulk-mib 8] [--tcp-only]

tensors/s = completed hops per second (one call in flight; call_forward cases interleaved hop by hop, so they share
the background load); MiB/s = fp32-equivalent payload both ways (2 x tensor bytes per hop); wire MiB/s = encoded
payload (metadata + tensor buffers) both ways. Try OMP_NUM_THREADS=1 on small machines: torch's intra-op threads
stall the small-tensor codec paths when processes share few cores.

--bulk-mib N adds "tcp_bulk": the raw loopback TCP echo with an N MiB payload, i.e. the loopback bandwidth one stream
gets for big transfers (bytes moved per second, both directions counted, one direction at a time); --tcp-only skips
hivemind altogether (raw TCP rows and the bulk figure only). scripts/bench.py uses both (`measure`).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CODECS = ("none", "fp16", "bf16", "8bit")


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("closed")
        view = view[n:]


def _tcp_echo_server(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray()
        try:
            while True:
                header = bytearray(8)
                _recv_exactly(conn, memoryview(header))
                size = int.from_bytes(header, "little")
                if len(buffer) < size:
                    buffer = bytearray(size)
                _recv_exactly(conn, memoryview(buffer)[:size])
                conn.sendall(memoryview(buffer)[:size])
        except (ConnectionError, OSError):
            conn.close()


def start_echo_server() -> tuple[multiprocessing.Process, int]:
    """The raw TCP echo server in its own (forked) process; returns (process, port). Terminate it when done."""
    listener = socket.create_server(("127.0.0.1", 0))
    proc = multiprocessing.get_context("fork").Process(target=_tcp_echo_server, args=(listener,), daemon=True)
    proc.start()
    port = listener.getsockname()[1]
    listener.close()  # the child holds its own copy
    return proc, port


class RawTCP:
    """One connection to the echo server: `hop(payload)` sends it (8-byte length prefix) and reads it back."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reply = bytearray()

    def hop(self, payload: memoryview) -> None:
        if len(self._reply) < len(payload):
            self._reply = bytearray(len(payload))
        self.sock.sendall(len(payload).to_bytes(8, "little"))
        self.sock.sendall(payload)
        _recv_exactly(self.sock, memoryview(self._reply)[:len(payload)])

    def close(self) -> None:
        self.sock.close()


def tcp_bulk(port: int, nbytes: int, seconds: float, max_iters: int = 200) -> dict:
    """Loopback bandwidth for big transfers: echo `nbytes` back and forth; bytes moved (2 x nbytes per hop) / s."""
    conn = RawTCP(port)
    try:
        payload = memoryview(bytearray(os.urandom(1 << 16)) * max(1, nbytes >> 16)).cast("B")
        times = _interleaved({"bulk": lambda: conn.hop(payload)}, seconds, max_iters)["bulk"]
    finally:
        conn.close()
    rate = len(times) / sum(times)
    return {"bytes": len(payload), "hops": len(times), "bytes_per_s": rate * 2 * len(payload),
            "mib_per_s": rate * 2 * len(payload) / 2**20, "p50_ms": 1e3 * statistics.median(times)}


def serve(chunk_sizes: list[int]) -> None:
    from swarm_peer.event_loop import serve_until_eof
    from swarm_peer.transport import StageServicer

    async def handler(metadata, tensors, remote_peer):
        return {}, tensors  # same shape back, like a gradient

    # its own process: a thread would wait for the GIL (5 ms switch interval) while the P2P side is busy
    _echo, port = start_echo_server()
    serve_until_eof({f"bench-{codec}-{chunk}": StageServicer(handler, codec, chunk_bytes=chunk)
                     for codec in CODECS for chunk in chunk_sizes}, {"tcp_port": port})


def _interleaved(cases: dict, seconds: float, max_iters: int) -> dict:
    """Time one hop of each case in turn (round-robin), so every case sees the same background load."""
    for fn in cases.values():
        fn(), fn()  # warm-up: connection, allocator
    times = {name: [] for name in cases}
    deadline = time.perf_counter() + seconds * len(cases)
    while time.perf_counter() < deadline and min(map(len, times.values())) < max_iters:
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _row(name, shape, codec, times, tensor_bytes, wire_bytes=None):
    rate = len(times) / sum(times)
    row = {"case": name, "shape": "x".join(map(str, shape)), "codec": codec, "hops": len(times),
           "tensors_per_s": rate, "mib_per_s": rate * 2 * tensor_bytes / 2**20,
           "p50_ms": 1e3 * statistics.median(times)}
    if wire_bytes is not None:
        row["wire_mib_per_s"] = rate * wire_bytes / 2**20
    return row


def _call_forward_rows(args, shapes, chunk, sweep, tcp_port_local=None) -> list[dict]:
    """Start the hop server process, then time raw TCP and call_forward hops per shape (see the module doc)."""
    import hivemind
    import torch
    from hivemind.p2p import PeerID

    from swarm_peer.event_loop import LoopThread
    from swarm_peer.lanes import LaneClient
    from swarm_peer.transport import STATS, call_forward

    server = subprocess.Popen([sys.executable, __file__, "--serve", ",".join(map(str, sorted({chunk, *sweep})))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, start_new_session=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT), HIVEMIND_LOGLEVEL="ERROR"))
    rows, dht, loop = [], None, None
    try:
        info = json.loads(server.stdout.readline() or b"null")
        assert info, "server failed to start"
        dht = hivemind.DHT(initial_peers=info["maddrs"], start=True)
        loop = LoopThread()
        p2p = loop.run(dht.replicate_p2p(), 30)
        peer = PeerID.from_base58(info["peer_id"])
        tcp = RawTCP(info["tcp_port"])

        lane_clients = {}  # namespace -> LaneClient: the same call over the server's direct TCP lane (lanes.py)

        def hop(x, codec, chunk_bytes, lane=False):
            namespace = f"bench-{codec}-{chunk_bytes}"
            lanes = lane_clients.setdefault(namespace, LaneClient(p2p, namespace)) if lane else None
            loop.run(call_forward(p2p, peer, {"step": 0}, [x], codec, 60.0, namespace, chunk_bytes=chunk_bytes,
                                  lanes=lanes), 65)

        for shape in shapes:
            x = torch.randn(shape)
            payload = memoryview(x.numpy()).cast("B")
            cases = {}
            for codec in [c for c in args.codecs.split(",") if c]:
                cases[("call_forward", codec, chunk)] = lambda codec=codec: hop(x, codec, chunk)
                cases[("call_forward lane", codec, chunk)] = lambda codec=codec: hop(x, codec, chunk, lane=True)
            for c in sweep:
                if c != chunk:
                    cases[(f"call_forward chunk={c >> 10}KiB", "none", c)] = lambda c=c: hop(x, "none", c)
            wire = {}
            for key, fn in cases.items():  # payload bytes of one hop, both ways
                before = STATS.snapshot()
                fn()
                wire[key] = sum(STATS.snapshot()[k] - before[k] for k in ("bytes_sent", "bytes_received"))
                assert STATS.snapshot()["lane_calls"] - before["lane_calls"] == int("lane" in key[0]), key
            # raw TCP alone (interleaved with P2P hops it would wait for the GIL behind our loop thread's cleanup)
            times = {("raw TCP", "fp32", None): _interleaved({"tcp": lambda: tcp.hop(payload)}, args.seconds,
                                                             args.max_iters)["tcp"]}
            times.update(_interleaved(cases, args.seconds, args.max_iters))
            tcp_times = times[("raw TCP", "fp32", None)]
            for key, t in times.items():
                rows.append(_row(key[0], shape, key[1], t, x.numel() * 4, wire[key] if key[2] else None))
                rows[-1]["ratio_to_tcp"] = rows[-1]["tensors_per_s"] * sum(tcp_times) / len(tcp_times)
                print(f"  {key[0]} {rows[-1]['shape']} {key[1]}: {rows[-1]['tensors_per_s']:.1f}/s", file=sys.stderr)
        tcp.close()
    finally:
        if loop is not None:
            loop.stop()
        if dht is not None:
            dht.shutdown()
        if server.poll() is None:  # graceful first: stdin EOF makes the server shut its DHT (and p2pd) down
            server.stdin.close()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(server.pid, signal.SIGKILL)  # leftovers of its group (DHT process, p2pd)
        except ProcessLookupError:
            pass
        server.wait(10)
    return rows


def _tcp_rows(args, shapes) -> list[dict]:
    """--tcp-only: the raw TCP rows alone (no hivemind)."""
    echo, port = start_echo_server()
    rows = []
    try:
        tcp = RawTCP(port)
        for shape in shapes:
            n = 4
            for d in shape:
                n *= d
            payload = memoryview(bytearray(os.urandom(n))).cast("B")
            times = _interleaved({"tcp": lambda: tcp.hop(payload)}, args.seconds, args.max_iters)["tcp"]
            rows.append(_row("raw TCP", shape, "fp32", times, n))
            rows[-1]["ratio_to_tcp"] = 1.0
        tcp.close()
    finally:
        echo.terminate()
        echo.join(5)
    return rows


def measure(args) -> dict:
    """What main() prints and writes as JSON: {"chunk_bytes", "cpus", "rows", ["tcp_bulk"]}."""
    from swarm_peer.transport import CHUNK_BYTES

    chunk = args.chunk_bytes or CHUNK_BYTES
    sweep = [int(c) for c in args.chunk_sweep.split(",") if c]
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",") if s]
    rows = _tcp_rows(args, shapes) if args.tcp_only else _call_forward_rows(args, shapes, chunk, sweep)
    result = {"chunk_bytes": chunk, "cpus": os.cpu_count(), "rows": rows}
    if args.bulk_mib:
        echo, port = start_echo_server()
        try:
            result["tcp_bulk"] = tcp_bulk(port, int(args.bulk_mib * 2**20), args.seconds, args.max_iters)
        finally:
            echo.terminate()
            echo.join(5)
        b = result["tcp_bulk"]
        print(f"  raw TCP bulk {b['bytes'] / 2**20:.1f} MiB: {b['mib_per_s']:.0f} MiB/s", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4x128x192,8x512x768")
    parser.add_argument("--codecs", default=",".join(CODECS))
    parser.add_argument("--seconds", type=float, default=3.0, help="per case (interleaved)")
    parser.add_argument("--max-iters", type=int, default=500)
    parser.add_argument("--chunk-bytes", type=int, default=None, help="default: transport.CHUNK_BYTES")
    parser.add_argument("--chunk-sweep", default="", help="extra comma-separated chunk sizes to try (codec none)")
    parser.add_argument("--bulk-mib", type=float, default=0.0, help="also measure raw TCP with a payload this big")
    parser.add_argument("--tcp-only", action="store_true", help="raw TCP only (no hivemind, no call_forward)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        return serve([int(c) for c in args.serve.split(",")])

    result = measure(args)
    rows = result["rows"]
    print(f"\nchunk_bytes={result['chunk_bytes']}, one call in flight, {os.cpu_count()} CPUs\n")
    print("| case | shape | codec | tensors/s | MiB/s (fp32 eq., both ways) | wire MiB/s | p50 ms | vs raw TCP |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        wire = f"{r['wire_mib_per_s']:.0f}" if "wire_mib_per_s" in r else "-"
        print(f"| {r['case']} | {r['shape']} | {r['codec']} | {r['tensors_per_s']:.1f} | {r['mib_per_s']:.0f} | "
              f"{wire} | {r['p50_ms']:.2f} | {r['ratio_to_tcp']:.2f} |")
    if "tcp_bulk" in result:
        b = result["tcp_bulk"]
        print(f"\nraw TCP, {b['bytes'] / 2**20:.1f} MiB payload: {b['mib_per_s']:.0f} MiB/s moved "
              f"({b['hops']} echoes, p50 {b['p50_ms']:.1f} ms)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
