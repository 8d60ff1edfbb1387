"""Every peer keeps going or ends clearly: a single-stage swarm (data-parallel DiLoCo) trains and ends (a stage mate
with other training settings is never averaged with), and a stage-0
peer whose next stage vanishes for good leaves with one clear line and exit 1 instead of waiting for ever."""
import re
import time

import pytest
from hivemind import DHT

from swarm_peer.records import make_validators

pytestmark = pytest.mark.slow
FAILING_ROUND = 10  # late enough that b, started with a, takes part in it even on a loaded machine


def test_single_stage_swarm_is_data_parallel_diloco(swarm_factory):
    swarm = swarm_factory("onestage", ["swarm.num_stages=1", "swarm.sync_every=2", "run.eval_interval=40"])
    boot = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=make_validators("onestage", 1))
    try:
        swarm.bootstrap = str(boot.get_visible_maddrs()[0])  # one bootstrap for all (the monitor's role)
        go = swarm.tmp / "go"  # a and b begin training together (CI: b, slower to start, once joined at step 11)
        swarm.start("a", 0, "--max-steps", "80", faults=f"hold_until={go}")
        # b's side of round 10's all-reduce fails after a has completed it: b must not retry that round with others
        # (a second "agreed" result), nor vote; it recovers a's state (tests/fault_peer.py). So does b's side of
        # the last round: a stays until b has recovered, and both end on one model
        swarm.start("b", 0, "--max-steps", "80", faults=f"fail_after_allreduce={FAILING_ROUND}+end,hold_until={go}")
        # a stage mate in another sync mode (same model): named in a warning, never averaged with
        swarm.start("c", 0, "--max-steps", "80", "--set", "swarm.sync_mode=sync")
        swarm.begin_together(("a", "b"), go)
        for name in ("a", "b", "c"):
            assert swarm.wait_exit(name, 240) == 0, swarm.log(name)[-3000:]
    finally:
        boot.shutdown()
    a, b = swarm.summary("a"), swarm.summary("b")
    for s in (a, b):
        assert 80 <= s["clock"] < 81 and s["loss_curve"] and s["eval_curve"], s  # each ran the run's 80 steps of schedule
    # ... and together about the run's 2 x 80 steps of data: the faster peer takes more of them (rounds align the clocks)
    assert 144 <= a["inner_steps"] + b["inner_steps"] <= 176, (a["inner_steps"], b["inner_steps"])
    assert any(r["group_size"] == 2 for r in a["sync"]["rounds"]), a["sync"]["rounds"]  # averaged with its mate
    assert a["sync"]["global_hash"] == b["sync"]["global_hash"]  # one global model at the end
    assert all(r["group_size"] <= 2 for s in (a, b) for r in s["sync"]["rounds"])  # never with c
    assert all(r["group_size"] == 1 for r in swarm.summary("c")["sync"]["rounds"])
    for name in ("a", "b"):
        assert "in rounds: its training settings differ from ours" in swarm.log(name), swarm.log(name)[-2000:]
    # every round that a peer completed as agreed left one hash: b's failed side neither retried nor voted
    failed = [r for r in b["sync"]["rounds"] if r["round"] == FAILING_ROUND]
    assert failed and not failed[0]["ok"] and "not retried" in failed[0]["outcome"], failed
    last = b["sync"]["rounds"][-1]  # its end of every round at the run's end failed too; it recovered after the last
    assert not last["ok"] and "not retried" in last["outcome"] and last["clock"] >= 79, b["sync"]["rounds"][-3:]
    assert b["sync"]["recoveries"][-1]["round"] == last["round"] + 1, b["sync"]["recoveries"]
    hashes = {}
    for s in (a, b):
        for r in s["sync"]["rounds"]:
            if r["ok"]:
                hashes.setdefault(r["round"], set()).add(r["weights_hash"])
    assert all(len(h) == 1 for h in hashes.values()), {k: v for k, v in hashes.items() if len(v) > 1}


def test_stage0_leaves_when_its_next_stage_is_gone_for_good(swarm_factory):
    swarm = swarm_factory("nodownstream", ["swarm.num_stages=2", "swarm.sync_mode=none", "swarm.upstream_timeout=8",
                                           "swarm.request_timeout=3"])
    swarm.start("s1", 1)
    swarm.wait_ready("s1")
    swarm.start("s0", 0, "--max-steps", "100000")
    deadline = time.monotonic() + 120
    while not re.search(r"\| inner step [1-9]\d* \|", swarm.log("s0")):  # it trains: stage 1 was there
        assert time.monotonic() < deadline and swarm.procs["s0"].poll() is None, swarm.log("s0")[-3000:]
        time.sleep(0.3)
    swarm.kill("s1")  # the whole stage is gone, without a word
    t0 = time.monotonic()
    code = swarm.wait_exit("s0", 90)
    waited = time.monotonic() - t0
    assert code == 1, swarm.log("s0")[-3000:]
    assert "no peer of stage 1 was visible for swarm.upstream_timeout" in swarm.log("s0")
    assert swarm.summary("s0")["downstream_lost"] is True
    print(f"\nstage 0 left {waited:.1f} s after its next stage vanished (swarm.upstream_timeout=8)")
