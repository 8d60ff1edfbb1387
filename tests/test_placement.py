"""`--stage auto` (swarm_peer/placement.py): the choice from stage loads (pure), and real peers that start at once
filling the empty stages, then a late one joining the least served stage."""
import re
import time

import pytest

from swarm_peer.config import ConfigError
from swarm_peer.placement import StageLoad, checkpointed_stage, choose_stage, stage_loads
from swarm_peer.records import PlacementClaim, StageRecord

FP = {0: "a" * 16, 1: "b" * 16, 2: "c" * 16}


def _record(peer: str, stage: int, throughput: float, state: str = "online", fingerprint: str | None = None):
    return StageRecord(peer_id=peer, stage=stage, fingerprint=fingerprint or FP[stage], mates_fingerprint="0" * 16,
                       config_summary="", state=state, client_mode=False, queue=0, inflight=0, max_inflight=4,
                       throughput=throughput, inner_step=0, samples=0, clock=0.0, round=0, round_steps=0,
                       round_samples=0, syncing=False, global_hash="0" * 16, round_ok=True, address="")


def test_an_empty_stage_comes_first_then_the_least_served_one():
    records = {0: [_record("p0", 0, 10.0)], 2: [_record("p2", 2, 1.0)]}
    loads = stage_loads(3, records, FP, [], me="me")
    assert [(ld.peers, ld.served) for ld in loads] == [(1, 10.0), (0, 0.0), (1, 1.0)]
    assert choose_stage(loads, {0, 1, 2}) == 1  # empty
    assert choose_stage(loads, {0, 2}) == 2  # stage 1 does not fit: the least served of the others
    records[1] = [_record("p1", 1, 4.0), _record("q1", 1, 3.0)]
    assert choose_stage(stage_loads(3, records, FP, [], me="me"), {0, 1, 2}) == 2  # 1 < 7 < 10 samples/s
    with pytest.raises(ConfigError, match="no stage fits"):
        choose_stage(loads, set())


def test_loads_count_only_live_peers_of_this_model_and_earlier_claims():
    records = {0: [_record("p0", 0, 10.0), _record("old", 0, 50.0, state="finished"),
                   _record("other-model", 0, 50.0, fingerprint="f" * 16), _record("me", 0, 99.0)],
               1: [_record("p1", 1, 0.0)],  # not measured yet: counted at the median of the measured
               2: [_record("p2", 2, 30.0)]}
    claims = [PlacementClaim(peer_id="c", stage=1, at=1.0), PlacementClaim(peer_id="p2", stage=1, at=1.0),
              PlacementClaim(peer_id="me", stage=2, at=0.5)]
    loads = stage_loads(3, records, FP, claims, me="me")
    # stage 1: p1 at the median (20: of 10 and 30), c's claim likewise; p2's claim is void (it has a record)
    assert loads == [StageLoad(0, 1, 10.0), StageLoad(1, 2, 40.0), StageLoad(2, 1, 30.0)]
    assert choose_stage(loads, {0, 1, 2}) == 0


def test_a_resumed_peer_keeps_the_stage_of_its_checkpoint(tmp_path):
    from swarm_peer.checkpoint import checkpoint_path

    assert checkpointed_stage(None, 3) is None and checkpointed_stage(str(tmp_path), 3) is None
    checkpoint_path(tmp_path, 2).write_bytes(b"x")
    assert checkpointed_stage(str(tmp_path), 3) == 2


@pytest.mark.slow
def test_auto_peers_fill_empty_stages_then_join_the_least_served(swarm_factory):
    swarm = swarm_factory("auto", ["swarm.num_stages=3", "model.num_layers=6", "swarm.sync_mode=diloco",
                                   "swarm.sync_every=4", "run.eval_interval=0"])
    from hivemind import DHT

    from swarm_peer.records import make_validators

    boot = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=make_validators("auto", 3))
    try:
        swarm.bootstrap = str(boot.get_visible_maddrs()[0])  # outlives any peer (the monitor's role)
        _run(swarm)
    finally:
        boot.shutdown()


def _run(swarm):
    steps = ("--max-steps", "100000")  # the run lasts until the test stops it (every peer then exits 0, summary saved)
    swarm.start("a", 0, *steps)
    swarm.wait_ready("a")
    for name in ("b", "c"):  # started at once: each sees the other's claim, so they take different stages
        swarm.start(name, "auto", *steps)
    chosen = {}
    deadline = time.monotonic() + 180
    while len(chosen) < 2:
        assert time.monotonic() < deadline, {n: swarm.log(n)[-2000:] for n in ("b", "c")}
        for name in ("b", "c"):
            m = re.search(r"\[stage auto\] taking stage (\d+) \((.*)\)", swarm.log(name))
            if m:
                chosen[name] = int(m.group(1))
        time.sleep(0.5)
    assert sorted(chosen.values()) == [1, 2], {n: swarm.log(n)[-2000:] for n in ("b", "c")}
    _wait_for(swarm, "a", r"\| inner step ([5-9]|\d\d+)\b", 180)  # the pipeline trains: every stage has measured
    swarm.start("d", "auto", *steps)  # a late auto peer: no stage is empty now
    _wait_for(swarm, "d", r"\[stage \d\] .*inner step ([3-9]|\d\d+)\b", 240)  # it joined and trains there
    swarm.launcher.stop(["a", "b", "c", "d"])
    summaries = {n: swarm.summary(n) for n in ("a", "b", "c", "d")}
    assert [summaries[n]["stage"] for n in ("a", "b", "c")] == [0, chosen["b"], chosen["c"]]
    d = summaries["d"]
    loads = d["placement"]["loads"]
    assert d["placement"]["auto"] and all(ld["peers"] >= 1 for ld in loads), loads  # no stage was empty
    least = min(loads, key=lambda ld: (ld["served"], ld["peers"], ld["stage"]))
    assert d["stage"] == least["stage"], loads
    assert f"[stage {d['stage']}] peer" in swarm.log("d")  # its lines carry the stage it took
    assert "joining the stage" in swarm.log("d"), swarm.log("d")[-3000:]  # it took its live stage's state
    for name in ("b", "c", "d"):
        assert summaries[name]["inner_steps"] > 0, summaries[name]  # each trained in the stage it chose


def _wait_for(swarm, name: str, pattern: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, swarm.log(name)):
        assert time.monotonic() < deadline and swarm.procs[name].poll() is None, swarm.log(name)[-3000:]
        time.sleep(0.5)
