"""The transport's own figure for bulk state: hivemind P2P streaming averaging-sized messages (512 KiB parts in
AveragingData, as the all-reduce and state downloads send them) from one process to another over loopback, each side
with its p2pd. A round or a join can be no faster than this; part g divides by it (issue 14: "within 3x the time the
transport needs to move its bytes between the same processes")."""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import statistics
import time

from swarm_peer.allreduce import PART_BYTES

NAME = "bench_p2p_stream"
PART = PART_BYTES  # what the all-reduce and state downloads send per message


async def _count(requests, context):
    from hivemind.proto import averaging_pb2
    n = 0
    async for r in requests:
        n += len(r.tensor_part.buffer)
    yield averaging_pb2.AveragingData(weight=float(n))


def _serve(queue) -> None:
    from hivemind.p2p import P2P
    from hivemind.proto import averaging_pb2

    async def main():
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        await p2p.add_protobuf_handler(NAME, _count, averaging_pb2.AveragingData, stream_input=True,
                                       stream_output=True)
        queue.put([str(a) for a in await p2p.get_visible_maddrs()])
        await asyncio.sleep(600)  # the parent terminates this process when done
    asyncio.run(main())


async def _send(addrs: list[str], nbytes: int, reps: int) -> list[float]:
    from hivemind.p2p import P2P, PeerID
    from hivemind.proto import averaging_pb2, runtime_pb2

    p2p = await P2P.create(initial_peers=addrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    peer, payload, rates = PeerID.from_base58(addrs[0].split("/p2p/")[-1]), b"\0" * PART, []
    try:
        for _ in range(reps):
            async def parts():
                for _ in range(nbytes // PART):
                    yield averaging_pb2.AveragingData(tensor_part=runtime_pb2.Tensor(buffer=payload))
            t0, got = time.monotonic(), 0.0
            async for reply in await p2p._iterate_protobuf_stream_handler(peer, NAME, parts(),
                                                                          averaging_pb2.AveragingData):
                got = reply.weight
            if int(got) != nbytes // PART * PART:
                raise RuntimeError(f"p2p stream delivered {got:.0f} of {nbytes} bytes")
            rates.append(got / (time.monotonic() - t0))
    finally:
        await p2p.shutdown()
    return rates


def p2p_stream_bandwidth(nbytes: int = 160 << 20, reps: int = 3) -> dict:
    """{"bytes_per_s": median over `reps` transfers of `nbytes`, "runs": [...]}: one direction, one stream."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    server = ctx.Process(target=_serve, args=(queue,), daemon=True)
    server.start()
    try:
        addrs = queue.get(timeout=60)
        rates = asyncio.run(_send(addrs, nbytes, reps))
    finally:
        server.terminate()
        server.join(10)
        queue.close()
    return {"bytes_per_s": statistics.median(rates), "runs": rates, "bytes": nbytes, "part_bytes": PART}


if __name__ == "__main__":
    r = p2p_stream_bandwidth()
    print(f"hivemind P2P stream, {r['bytes'] >> 20} MiB in {PART >> 10} KiB parts: "
          f"{r['bytes_per_s'] / 2**20:.0f} MiB/s (runs: {', '.join(f'{x / 2**20:.0f}' for x in r['runs'])})")
