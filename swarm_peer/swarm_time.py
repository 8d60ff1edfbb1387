"""Swarm time: this machine's clock corrected by its offset to the swarm, for everything that compares DHT times.

hivemind compares wall clocks across machines everywhere: a stored value's expiration (a value already expired by the
storing node's clock is dropped), averagers' matchmaking declarations, the bootstrap ping check (3 s), our records'
staleness and the metrics windows. A machine whose clock is 30 s behind would publish records that are expired on
arrival and never be seen by its stage mates. So every process of a peer reads one corrected clock:

    swarm time = time.time() + offset,   offset = median over a few DHT neighbours of (their time - ours at mid-RTT)

measured from hivemind's own ping replies (which carry the replier's DHT time) right after the DHT starts, and set in
this process and in the DHT's process (the averagers fork later and inherit it). The first peer of a swarm has no one
to ask: its clock is the swarm's. Peers converge on the clock of the peers they bootstrap from.
"""
from __future__ import annotations

import logging
import statistics
import sys

log = logging.getLogger("swarm_peer")
OFFSET = 0.0  # seconds to add to this machine's clock
MAX_PINGS = 5
_base = None  # hivemind's original get_dht_time (time.time)


def now() -> float:
    return _base() + OFFSET


def install() -> None:
    """Before the DHT forks: every loaded module's `get_dht_time` (hivemind's and ours) becomes `now`. Modules imported
    later get it from hivemind.utils, which is patched too."""
    global _base
    import hivemind  # noqa: F401  (loads the modules that bind get_dht_time)
    import hivemind.utils.timed_storage as ts

    if _base is None:
        _base = ts.get_dht_time
    for name, module in list(sys.modules.items()):
        if module is not None and getattr(module, "get_dht_time", None) is _base:
            module.get_dht_time = now


async def _measure_in_dht(dht, node) -> tuple[float, int]:
    """In the DHT's process: ping up to MAX_PINGS neighbours, set the offset there, return (offset, replies)."""
    from hivemind.proto import dht_pb2

    protocol = node.protocol
    samples = []
    for peer in list(protocol.routing_table.peer_id_to_uid)[:MAX_PINGS]:
        try:
            t0 = _base()
            reply = await protocol.get_stub(peer).rpc_ping(dht_pb2.PingRequest(peer=protocol.node_info, validate=False),
                                                           timeout=5.0)
            t1 = _base()
        except Exception:
            continue
        if reply.dht_time:
            samples.append(reply.dht_time - (t0 + t1) / 2)
    offset = statistics.median(samples) if samples else 0.0
    globals()["OFFSET"] = offset
    return offset, len(samples)


def synchronize(dht) -> float | None:
    """Measure this machine's offset to the swarm through `dht` and apply it here and in the DHT's process; None when
    no neighbour answered."""
    global OFFSET
    offset, replies = dht.run_coroutine(_measure_in_dht)
    if not replies:
        return None
    OFFSET = offset
    if abs(offset) > 1.0:
        log.warning(f"this machine's clock is {-offset:+.1f} s off the swarm's (from {replies} neighbours); "
                    f"using the swarm's time")
    return offset
