"""What one all-reduce costs the averager process in memory, at a real size (issue 14's "no other full-size copy").

Two StageAveragers on loopback (real hivemind DHTs and averager processes) average a stage-sized set of fp32
buffers (default: GPT-2 small's stage 0, a 50257 x 768 embedding plus 6 blocks' worth, ~82M values) a few times;
each averager process's USS (its private pages: the shared buffers themselves are not counted, so this is the
memory a round *adds*) is sampled every 20 ms. Prints, per averager, its peak growth above its idle footprint in
units of the buffers' size (0 would be "no copy at all"; hivemind's stock path holds the averaged parts and then
concatenates them, ~2 copies), and writes the figures as JSON. Use a stage-sized --values: a round also allocates a
fixed few tens of MB, which dominates the ratio for small buffers (2M values read ~3x).

    .venv/bin/python scripts/averaging_memory.py [--values 82000000] [--rounds 3] [--codec fp32] [--json out.json]

--download instead measures a state download: the second averager fetches the first's state (a DiLoCo stage's
global copy + momentum, 2 x the buffers) and its peak growth above idle, less the state it received, is reported in
units of the largest tensor (the received chunks, a joined copy and a copy into shared memory were 3 of it), and
the donor's averager's peak growth in the same units (a serialized copy of each tensor it streamed was 1).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hivemind import DHT  # noqa: E402

from swarm_peer.averaging import StageAverager  # noqa: E402
from swarm_peer.compression import compression_strategy  # noqa: E402


def _shapes(values: int) -> list[tuple[int, ...]]:
    embedding = min(values // 2, 50257 * 768)
    rest = values - embedding
    return [(embedding // 768, 768)] + [(rest // 6,)] * 6


def _uss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_full_info().uss
    except psutil.Error:
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--values", type=int, default=82_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--codec", default="fp32")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--download", action="store_true")
    args = ap.parse_args()
    shapes = _shapes(args.values)
    nbytes = sum(torch.Size(s).numel() for s in shapes) * 4
    first = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [first, DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                       initial_peers=[str(m) for m in first.get_visible_maddrs()])]
    averagers = []
    state = [torch.full(s, 1.0).share_memory_() for s in shapes * 2] if args.download else []
    for i, dht in enumerate(dhts):  # forked before the buffers are filled, as a peer does
        buffers = [torch.full(s, float(i)) for s in shapes]
        averagers.append(StageAverager(
            buffers, dht, get_state=lambda: ({"round": 0}, state), prefix="avgmem", start=True, min_group_size=2,
            target_group_size=2, min_matchmaking_time=2.0, request_timeout=1.0,
            compression=compression_strategy(args.codec), allreduce_timeout=300, next_chunk_timeout=60,
            declare_state_period=5))
        del buffers
    pids = [a.pid for a in averagers]
    time.sleep(2.0)
    idle = [_uss(p) for p in pids]
    peaks, stop = list(idle), threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for k, p in enumerate(pids):
                peaks[k] = max(peaks[k], _uss(p))
            time.sleep(0.02)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds = []
    if args.download:
        return _download(args, averagers, dhts, pids, idle, peaks, stop, sampler, state)
    try:
        for r in range(args.rounds):
            t0 = time.monotonic()
            controls = [a.step(weight=1.0, timeout=120, allow_retries=False, wait=False) for a in averagers]
            for c in controls:
                c.result(300)
            seconds.append(time.monotonic() - t0)
        with averagers[0].get_tensors() as ts:
            ok = all(torch.allclose(t, torch.full_like(t, 0.5)) for t in ts)
    finally:
        _stop(stop, sampler, averagers, dhts)
    growth = [(p - i) / nbytes for p, i in zip(peaks, idle)]
    result = {"values": nbytes // 4, "buffer_bytes": nbytes, "codec": args.codec, "rounds_s": seconds,
              "averager_idle_uss_bytes": idle, "averager_peak_uss_bytes": peaks,
              "peak_growth_in_buffer_sizes": growth, "average_correct": ok}
    print(f"buffers {nbytes / 1e9:.2f} GB ({args.codec}); rounds {', '.join(f'{s:.1f}' for s in seconds)} s; "
          f"averager peak above idle: {', '.join(f'{g:.2f}' for g in growth)} x the buffers; average correct: {ok}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if ok else 1


def _stop(stop, sampler, averagers, dhts) -> None:
    stop.set()
    sampler.join()
    for a in averagers:
        a.shutdown()
    for d in dhts:
        d.shutdown()


def _download(args, averagers, dhts, pids, idle, peaks, stop, sampler, state) -> int:
    state_bytes = sum(t.numel() * 4 for t in state)
    largest = max(t.numel() * 4 for t in state)
    try:
        t0 = time.monotonic()
        got = averagers[1].download_state([str(dhts[0].peer_id)], len(state), timeout=300)
        seconds = time.monotonic() - t0
        ok = got is not None and all(torch.equal(a, b) for a, b in zip(got[1], state))
        del got
    finally:
        _stop(stop, sampler, averagers, dhts)
    extra = (peaks[1] - idle[1] - state_bytes) / largest
    donor = (peaks[0] - idle[0]) / largest
    result = {"state_bytes": state_bytes, "largest_tensor_bytes": largest, "seconds": seconds,
              "donor_idle_uss_bytes": idle[0], "donor_peak_uss_bytes": peaks[0],
              "donor_peak_growth_in_largest_tensors": donor,
              "downloader_idle_uss_bytes": idle[1], "downloader_peak_uss_bytes": peaks[1],
              "peak_beyond_the_state_in_largest_tensors": extra, "state_correct": ok}
    print(f"state {state_bytes / 1e9:.2f} GB downloaded in {seconds:.1f} s; the downloader's averager peaked "
          f"{extra:.2f} x the largest tensor ({largest / 1e6:.0f} MB) beyond the state itself, the donor's "
          f"{donor:.2f} x; correct: {ok}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
