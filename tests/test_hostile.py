"""An outsider with its own valid identity attacks a running single-stage swarm (two DiLoCo peers, real processes):
it publishes, every second, its own record claiming a huge agreed round with a made-up hash (a claim no one can
back), copies of the honest peers' records under its key (impersonation), a made-up metrics record; and it sends
malformed rpc_forward / eval / sample requests and garbage state-download requests to a peer. The stage must keep
training (no gap between inner steps beyond a bound, no round lost to the attack), its replicas agree at the end,
the lying peer's claims are never believed, and every malformed request gets an error (or empty) reply."""
import threading
import time

import pytest
from hivemind import DHT

from swarm_peer.records import make_validators, read_metric_records, read_stage_records
from tests.hostile_peer import Hostile

pytestmark = pytest.mark.slow
STEPS = 40
MALFORMED = 1000


def test_outsider_cannot_stall_fake_or_poison_a_stage(swarm_factory):
    run = "hostile"
    swarm = swarm_factory(run, ["swarm.num_stages=1", "swarm.sync_every=2", "swarm.matchmaking_time=1",
                                "run.eval_interval=1000"])
    boot = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=make_validators(run, 1))
    hostile = None
    try:
        swarm.bootstrap = str(boot.get_visible_maddrs()[0])
        slow = ("--max-steps", str(STEPS), "--test-delay", "0.1")
        for name in ("a", "b"):
            swarm.start(name, 0, *slow)
        target = swarm.wait_ready("a").split("/p2p/")[-1]
        swarm.wait_ready("b")
        deadline = time.monotonic() + 120
        while "serving layers" not in swarm.log("a"):  # its servicer is up: every request reaches validation
            assert time.monotonic() < deadline and swarm.procs["a"].poll() is None, swarm.log("a")[-3000:]
            time.sleep(0.2)
        hostile = Hostile(run, 1, swarm.bootstrap)
        forging = hostile.keep_forging(0)
        downloads = []
        traffic = threading.Thread(target=lambda: (hostile.malformed_forwards(target, MALFORMED),
                                                   downloads.extend(hostile.malformed_downloads(target, 0, 120))))
        traffic.start()
        while any(swarm.procs[n].poll() is None for n in ("a", "b")) and traffic.is_alive():
            traffic.join(1.0)
        # what an honest reader sees while the attack goes on: the liar's own record (bound to its key), never the
        # copies it made of the honest ones, nor its metrics record claiming an honest peer id
        seen = {p.peer_id: p.record.round for p in read_stage_records(boot, run, 0)}
        metrics = {p.peer_id for p in read_metric_records(boot, run, 0)}
        for name in ("a", "b"):
            assert swarm.wait_exit(name, 400) == 0, swarm.log(name)[-3000:]
        traffic.join(120)
        hostile.stop.set()
        forging.join(10)
    finally:
        if hostile is not None:
            hostile.shutdown()
        boot.shutdown()
    honest = {swarm.peer_id(n) for n in ("a", "b")}
    assert seen.get(hostile.peer_id) == 10**6, seen  # the attack was live: the liar's own record is readable
    assert all(seen.get(p, 0) < 10**6 for p in honest), seen  # impersonated copies were dropped
    assert hostile.peer_id not in metrics and metrics <= honest, metrics
    assert hostile.sent["forward"] == MALFORMED and hostile.sent["forward_refused"] == MALFORMED, (hostile.sent,
                                                                                                 hostile.outcomes)
    assert downloads and all(n == 0 for n in downloads), downloads  # garbage download requests: empty replies
    a, b = swarm.summary("a"), swarm.summary("b")
    assert a["sync"]["global_hash"] == b["sync"]["global_hash"] and a["final_weights_hash"] == b["final_weights_hash"]
    for s in (a, b):
        rounds = s["sync"]["rounds"]
        print(hostile.peer_id[-8:], [(r["round"], r["group_size"], r["outcome"][:30]) for r in rounds], s["sync"]["recoveries"])
        assert s["sync"]["round"] < 1000, s["sync"]["round"]  # never jumped to the liar's round
        assert all(e["hash"] != "feedfacefeedface" for e in s["sync"]["recoveries"])
        assert all(e["donors"] == 1 for e in s["sync"]["recoveries"])  # from its honest mate only
        together = [r for r in rounds if r["group_size"] == 2]
        assert len(together) >= 0.6 * len(rounds), rounds  # the stage mates kept averaging with each other
        times = [e["t"] for e in s["ledger"]]
        gaps = [t1 - t0 for t0, t1 in zip(times, times[1:])]
        assert max(gaps) < 15, max(gaps)  # no stall: a round is ~1 s, a malformed request is refused at once
