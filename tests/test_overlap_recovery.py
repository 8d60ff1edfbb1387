"""An overlapped outer round that failed on one peer's side must be followed by a recovery, before that peer's next
round, even when rounds run back to back.

CI (test_diloco_swarm, overlapped rounds on a loaded machine): a stage-1 peer's end of round 0's all-reduce failed,
so its global copy differed from its mate's; each later round was already overdue when the previous one landed, so
the next round began at once, the peer was "syncing" again, and a disagreeing peer that is syncing is no donor
seeker: it averaged every later round from other weights than its mate's (none voted, 9 of 9 failed) and recovered
only at the run's end. Here rounds are back to back by construction (H = 1: every round is overdue at the next
step), and b's side of the first all-reduce it reaches from round FROM_ROUND on fails after a has completed it
(tests/fault_peer.py fail_once_from).

The same swarm takes a joiner, c, once the rounds run back to back: a lone fast peer (or two) runs rounds faster than
a joiner reads records, and a state downloaded at round R was refused as unvouched while every record read after the
download already showed a later round (CI, test_run_ends' single-stage run with overlapped rounds: the joiner refused
three downloads, started from the seeded init and never averaged). Records carry their last agreed rounds' hashes.

At the run's end every peer's side of the last rounds fails after the all-reduce (fail_after_allreduce=end): nobody
holds an agreed state, so nobody may serve one (CI, test_run_ends with overlapped rounds: a matchmaking race and a
planned fault in a row left two peers on two models). They end on one model all the same: the hash most of them hold
at the newest round, ties to the smallest peer id (sync_rules.end_fallback)."""
import re
import time

import pytest
from hivemind import DHT

from swarm_peer.records import make_validators
from tests.conftest import PYTHON, ROOT

pytestmark = pytest.mark.slow
FROM_ROUND = 2
STEPS = 40
JOIN_AT_ROUND = 8  # c starts once a is this far: after b's failure and recovery


def test_a_peer_whose_overlapped_round_failed_recovers_before_its_next_round(swarm_factory):
    swarm = swarm_factory("overlapfail", ["swarm.num_stages=1", "swarm.sync_every=1", "swarm.overlap_rounds=true",
                                          "run.eval_interval=1000"])
    boot = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=make_validators("overlapfail", 1))
    try:
        swarm.bootstrap = str(boot.get_visible_maddrs()[0])
        fault_peer = (PYTHON, str(ROOT / "tests" / "fault_peer.py"))  # slow: each one's run outlasts the other's start
        swarm.start("a", 0, "--max-steps", str(STEPS), prefix=fault_peer,
                    env={"SWARM_TEST_FAULTS": "slow=0.1,fail_after_allreduce=end"})
        swarm.start("b", 0, "--max-steps", str(STEPS), prefix=fault_peer,
                    env={"SWARM_TEST_FAULTS": f"fail_once_from={FROM_ROUND},slow=0.1,fail_after_allreduce=end"})
        deadline = time.monotonic() + 180
        while not re.search(rf"round {JOIN_AT_ROUND} -> ", swarm.log("a")):
            assert time.monotonic() < deadline and swarm.procs["a"].poll() is None, swarm.log("a")[-3000:]
            time.sleep(0.3)
        swarm.start("c", 0, "--max-steps", str(STEPS), prefix=fault_peer,
                    env={"SWARM_TEST_FAULTS": "fail_after_allreduce=end"})
        for name in ("a", "b", "c"):
            assert swarm.wait_exit(name, 300) == 0, swarm.log(name)[-3000:]
    finally:
        boot.shutdown()
    a, b, c = swarm.summary("a"), swarm.summary("b"), swarm.summary("c")
    rounds = b["sync"]["rounds"]
    brief = [(r["round"], r["ok"], r["group_size"], r["outcome"][:24]) for r in rounds]
    failed = sorted(r["round"] for r in rounds if not r["ok"])
    assert failed and failed[0] >= FROM_ROUND, brief  # the fault happened
    assert any(r["overlapped_steps"] for r in rounds if r["ok"]), brief  # rounds did overlap training
    # the failed round, and at most the next one (begun before the failure was known), then agreed rounds again
    # (a later failure, e.g. at the run's end, is another matter)
    assert not [r for r in failed if failed[0] + 1 < r <= failed[0] + 4], brief
    recovered = [e["round"] for e in b["sync"]["recoveries"]]
    mate = {r["round"]: r["weights_hash"] for r in a["sync"]["rounds"] if r["ok"]}
    lone = next(r["weights_hash"] for r in rounds if r["round"] == failed[0])
    if mate.get(failed[0]) != lone:  # (b's own update can be the average: when a had just recovered, weight ~0)
        assert any(failed[0] < r <= failed[0] + 2 for r in recovered), (recovered, failed)
    ends = [s["sync"]["rounds"][-1] for s in (a, b, c)]  # each side of the last round failed: none agreed
    assert all(not r["ok"] and r["clock"] >= STEPS - 1 for r in ends), ends
    assert a["sync"]["global_hash"] == b["sync"]["global_hash"] == c["sync"]["global_hash"]
    assert sum("no stage peer holds an agreed state" in swarm.log(n) for n in "abc") >= 2, swarm.log("a")[-3000:]
    # c joined with the stage's state, at once, and averaged with the others
    assert "downloaded stage state refused" not in swarm.log("c"), swarm.log("c")[-3000:]
    joined = [e for e in c["sync"]["recoveries"] if e["reason"] == "joining the stage"]
    assert joined and joined[0]["round"] >= JOIN_AT_ROUND, c["sync"]["recoveries"]
    assert any(r["group_size"] == 3 and r["ok"] for r in c["sync"]["rounds"]), c["sync"]["rounds"]
