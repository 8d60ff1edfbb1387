"""The process's one long-lived asyncio loop in a thread (hivemind's P2P is bound to the loop that first used it), and
a standalone server process for benchmarks and transport tests."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from typing import Optional


class LoopThread:
    """One long-lived asyncio loop in a daemon thread (hivemind's P2P is bound to the loop that first used it)."""

    def __init__(self, name: str = "swarm-peer-loop"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: Optional[float] = None):
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LoopThread.run called from its own loop thread (would deadlock); await instead")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel pending tasks, stop the loop, join the thread. Idempotent."""
        if self.loop.is_closed() or not self._thread.is_alive():
            return

        async def cancel_all():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=timeout)

        with contextlib.suppress(Exception):
            self.submit(cancel_all()).result(timeout + 1)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()

    def __enter__(self) -> "LoopThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_until_eof(servicers: dict, info: Optional[dict] = None) -> None:
    """A standalone server process (benchmarks, transport tests): a DHT and its P2P serving `servicers` (namespace
    -> servicer), each also over a direct TCP lane on loopback (lanes.py), one JSON line on stdout (peer id,
    addresses, `info`), then serve until stdin closes or SIGTERM."""
    import json
    import signal
    import sys

    import hivemind

    from swarm_peer.lanes import LaneServer

    dht, loop, stop = hivemind.DHT(start=True), LoopThread(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        p2p = loop.run(dht.replicate_p2p(), 30)
        for namespace, servicer in servicers.items():
            servicer.lanes = LaneServer(servicer, "127.0.0.1", ["127.0.0.1"])
            loop.run(servicer.lanes.start(), 30)
            loop.run(servicer.add_p2p_handlers(p2p, namespace=namespace), 30)
        print(json.dumps({"peer_id": str(dht.peer_id), "maddrs": [str(m) for m in dht.get_visible_maddrs()],
                          **(info or {})}), flush=True)
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()  # EOF = stop
        stop.wait()
    finally:
        loop.stop()
        dht.shutdown()
