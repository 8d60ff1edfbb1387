"""A DHT read that fails (a get timing out on a loaded machine returns nothing) is no evidence that the stage's other
peers are gone. CI once saw a stage-1 peer run round 0 "ok (alone)" while its three mates averaged that round as a
group: two "agreed" hashes for one round, a split stage. Single-stage swarm of three; c's reads of the stage records
all fail while it runs round BLIND_ROUND (tests/fault_peer.py blind_round): its round must not vote, and the stage
must end on one model with one hash per agreed round."""
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
        for name in ("a", "b"):
            swarm.start(name, 0, "--max-steps", str(STEPS))
        swarm.start("c", 0, "--max-steps", str(STEPS), env={"SWARM_TEST_FAULTS": f"blind_round={BLIND_ROUND}"},
                    prefix=(PYTHON, str(ROOT / "tests" / "fault_peer.py")))
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
