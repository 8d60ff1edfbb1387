"""What a peer may conclude from the stage records it reads, and what it may not.

A DHT read that fails (a get timing out on a loaded machine returns nothing) is no evidence that the stage's other
peers are gone. CI once saw a stage-1 peer run round 0 "ok (alone)" while its three mates averaged that round as a
group: two "agreed" hashes for one round, a split stage. Single-stage swarm of three; c's reads of the stage records
all fail while it runs round BLIND_ROUND (tests/fault_peer.py blind_round): its round must not vote, and the stage
must end on one model with one hash per agreed round. Nor is "no mate votes right now" evidence that a joiner's seeded
init is the stage's state (second test)."""
import time

import pytest
from hivemind import DHT

from swarm_peer.records import make_validators
from tests.conftest import PYTHON, ROOT

pytestmark = pytest.mark.slow
BLIND_ROUND = 3
STEPS = 30


def test_a_failed_read_of_the_stage_records_never_makes_a_lone_voter(swarm_factory):
    swarm = swarm_factory("blind", ["swarm.num_stages=1", "swarm.sync_every=2", "run.eval_interval=1000"])
    boot = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=make_validators("blind", 1))
    try:
        swarm.bootstrap = str(boot.get_visible_maddrs()[0])
        go = swarm.tmp / "go"  # all three begin together: c, slower to start, once joined at round 6 (CI)
        for name in ("a", "b"):
            swarm.start(name, 0, "--max-steps", str(STEPS), faults=f"hold_until={go}")
        swarm.start("c", 0, "--max-steps", str(STEPS), faults=f"blind_round={BLIND_ROUND},hold_until={go}")
        swarm.begin_together(("a", "b", "c"), go)
        for name in ("a", "b", "c"):
            assert swarm.wait_exit(name, 300) == 0, swarm.log(name)[-3000:]
    finally:
        boot.shutdown()
    summaries = {n: swarm.summary(n) for n in ("a", "b", "c")}
    blind = [r for r in summaries["c"]["sync"]["rounds"] if r["round"] == BLIND_ROUND]
    assert blind and blind[0]["group_size"] == 1, summaries["c"]["sync"]["rounds"]  # it could not see its mates ...
    assert not blind[0]["ok"] and "could not be read" in blind[0]["outcome"], blind  # ... nor voted alone
    hashes: dict[int, set] = {}
    for s in summaries.values():
        for r in s["sync"]["rounds"]:
            if r["ok"]:
                hashes.setdefault(r["round"], set()).add(r["weights_hash"])
    assert all(len(h) == 1 for h in hashes.values()), {k: v for k, v in hashes.items() if len(v) > 1}
    assert len({s["sync"]["global_hash"] for s in summaries.values()}) == 1  # one model at the end


def test_a_joiner_waits_for_a_voter_instead_of_restarting_the_stage(swarm_factory):
    """CI (churn soak): the joiner's only live stage mate had just failed a round, so no record voted; the joiner took
    "no donor" for "I hold the stage's state" and kept the seeded init at round 0, and once that mate was killed the
    stage had started over from scratch. Here a's rounds 2-4 cannot read the records (none of them votes) and j
    joins meanwhile: it must wait for a's next agreed round and download that state, never train from the init."""
    swarm = swarm_factory("novoter", ["swarm.num_stages=1", "swarm.sync_every=3", "run.eval_interval=1000"])
    boot = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=make_validators("novoter", 1))
    try:
        swarm.bootstrap = str(boot.get_visible_maddrs()[0])
        swarm.start("a", 0, "--max-steps", str(STEPS), env={"SWARM_TEST_FAULTS": "blind_round=2+3+4,slow=0.25"},
                    prefix=(PYTHON, str(ROOT / "tests" / "fault_peer.py")))
        deadline = time.monotonic() + 240
        while "round 2 -> 3:" not in swarm.log("a"):
            assert time.monotonic() < deadline and swarm.procs["a"].poll() is None, swarm.log("a")[-3000:]
            time.sleep(0.2)
        swarm.start("j", 0, "--max-steps", str(STEPS))
        for name in ("a", "j"):
            assert swarm.wait_exit(name, 300) == 0, swarm.log(name)[-3000:]
    finally:
        boot.shutdown()
    a, j = swarm.summary("a"), swarm.summary("j")
    assert not any(r["ok"] for r in a["sync"]["rounds"] if r["round"] in (2, 3, 4)), a["sync"]["rounds"]
    joined = [e for e in j["sync"]["recoveries"] if e["reason"] == "joining the stage"]
    assert joined and joined[0]["round"] >= 5, (j["sync"]["recoveries"], swarm.log("j")[-2000:])
    assert min(r["round"] for r in j["sync"]["rounds"]) >= 5, j["sync"]["rounds"][:3]  # never from the init
    assert a["sync"]["global_hash"] == j["sync"]["global_hash"]
