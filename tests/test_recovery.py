"""A peer that must recover and finds no donor keeps going and ends; nothing of a round blocks the compute thread.

Single-stage swarm (data-parallel DiLoCo), three peers, none of which ever serves its state (test-only fault: every
donor unreachable). After round 1, peer a's global weights are nudged (a replica gone wrong), so a replica disagrees
with the stage's majority and wants the stage state (one that joins late and misses round 0 does too). It must retry
with backoff, then go on with its own weights without voting, say so in one line, try again after 1, 2, 4 ... rounds (not at every one),
and end with the run. Every peer also reports any use of the averager's tensors (and so its lock) on the
compute thread (tests/fault_peer.py guard_averager): there must be none."""
import re

import pytest
from hivemind import DHT

from swarm_peer.records import make_validators
from tests.conftest import PYTHON, ROOT

pytestmark = pytest.mark.slow
FAULT_PEER = (PYTHON, str(ROOT / "tests" / "fault_peer.py"))
STEPS = 40


def _faults(*names: str) -> dict:
    return {"env": {"SWARM_TEST_FAULTS": ",".join(names)}, "prefix": FAULT_PEER}


def test_recovery_without_donor_goes_on_and_rounds_never_block_the_compute_thread(swarm_factory):
    swarm = swarm_factory("nodonor", ["swarm.num_stages=1", "swarm.sync_every=2", "run.eval_interval=1000"])
    boot = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=make_validators("nodonor", 1))
    try:
        swarm.bootstrap = str(boot.get_visible_maddrs()[0])
        steps, slow = ("--max-steps", str(STEPS)), "slow=0.25"  # ~1 s a step: joiners find the run going on
        swarm.start("a", 0, *steps, **_faults("perturb_round=1", "refuse_state", "guard_averager", slow))
        for name in ("b", "c"):
            swarm.start(name, 0, *steps, **_faults("refuse_state", "guard_averager", slow))
        for name in ("a", "b", "c"):
            assert swarm.wait_exit(name, 400) == 0, swarm.log(name)[-3000:]
    finally:
        boot.shutdown()
    summaries = {n: swarm.summary(n) for n in ("a", "b", "c")}
    gave_up = {n: len(re.findall(r"no stage peer could serve the stage state \(.*\) after 5 tries", swarm.log(n)))
               for n in summaries}
    assert sum(gave_up.values()) >= 1, {n: swarm.log(n)[-1500:] for n in summaries}
    for name, s in summaries.items():
        assert s["clock"] >= STEPS, (name, s["clock"])  # every peer went on training to the end of the run
        assert not s["sync"]["recoveries"]  # ... on its own weights: nobody served a state
        rounds = [r["round"] for r in s["sync"]["rounds"]]
        # tries again 1, 2, 4 ... 16 rounds after each give-up: about log2(rounds) give-ups, not one per round
        assert gave_up[name] <= 2 + len(set(rounds)).bit_length(), (name, gave_up[name], rounds)
        assert "AVERAGER LOCK ON THE COMPUTE THREAD" not in swarm.log(name), name
    assert any(r["group_size"] >= 2 for s in summaries.values() for r in s["sync"]["rounds"])
    print(f"\nno donor: gave up {gave_up} time(s); run steps reached "
          f"{ {n: s['clock'] for n, s in summaries.items()} } in { {n: s['inner_steps'] for n, s in summaries.items()} } "
          f"inner steps")
