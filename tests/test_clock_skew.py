"""Clock skew between machines: one stage-0 peer's clock 30 s behind, one stage-1 peer's 30 s ahead, the monitor's
30 s behind (tests/fault_peer.py shifts time.time in the whole peer: its DHT and averager processes too). Stage mates
still average together and end on one model, and the monitor counts every peer in the same windows."""
import json
import os
import re
import signal
import subprocess
import time

import pytest

from tests.conftest import PYTHON, ROOT
from tests.swarm_harness import group_pids

pytestmark = pytest.mark.slow
SKEWED = (PYTHON, str(ROOT / "tests" / "fault_peer.py"))


def _skew(seconds: float) -> dict:
    return {"env": {"SWARM_TEST_CLOCK_OFFSET": str(seconds)}, "prefix": SKEWED}


def test_30s_clock_skew_neither_splits_a_stage_nor_the_monitor(swarm_factory, tmp_path):
    over = ["swarm.num_stages=2", "swarm.sync_every=3", "run.metrics_period=2", "run.eval_interval=0"]
    swarm = swarm_factory("skew", over)
    swarm.start("c", 1)
    bootstrap = swarm.wait_ready("c")  # the swarm's clock: true time
    history = tmp_path / "monitor.jsonl"
    args = [*SKEWED, PYTHON, "-m", "swarm_peer", "monitor", "--run-id", "skew", "--initial-peers", bootstrap,
            "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--until-done", "--history-json", str(history)]
    for o in swarm.overrides:
        args += ["--set", o]
    with open(tmp_path / "monitor.log", "w") as out:
        monitor = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "SWARM_TEST_CLOCK_OFFSET": "-30"})
    try:
        swarm.start("d", 1, **_skew(+30))
        swarm.wait_ready("d")
        swarm.start("a", 0, "--data-shard", "0/2", "--max-steps", "30", **_skew(-30))
        swarm.start("b", 0, "--data-shard", "1/2", "--max-steps", "30")
        for name in ("a", "b", "c", "d"):
            assert swarm.wait_exit(name, 300) == 0, swarm.log(name)[-3000:]
        assert monitor.wait(120) == 0, (tmp_path / "monitor.log").read_text()[-3000:]
    finally:
        if monitor.poll() is None:
            os.killpg(monitor.pid, signal.SIGKILL)
            monitor.wait(10)
    deadline = time.monotonic() + 15
    while group_pids(monitor.pid) and time.monotonic() < deadline:  # its DHT and p2pd finish exiting
        time.sleep(0.2)
    assert not group_pids(monitor.pid)
    for name, seconds in (("a", -30), ("d", 30)):  # each says how far off its clock is, and goes on
        said = re.search(r"this machine's clock is ([+-][\d.]+) s off the swarm's", swarm.log(name))
        assert said and abs(float(said.group(1)) - seconds) < 1.0, swarm.log(name)[-2000:]
    # eval_interval 0: the untrained model (not by a peer that joined a stage already past step 0) and the last step
    # only (step // 0 once crashed the evaluation task)
    curves = [[step for step, _ in swarm.summary(name)["eval_curve"]] for name in ("a", "b")]
    assert [0, 30] in curves and all(c in ([0, 30], [30]) for c in curves), curves
    for mates in (("a", "b"), ("c", "d")):
        s = [swarm.summary(n) for n in mates]
        rounds = [r for r in s[0]["sync"]["rounds"]]
        paired = [r for r in rounds if r["group_size"] == 2]
        assert len(paired) >= 0.6 * len(rounds) and len(paired) >= 3, (mates, [r["outcome"] for r in rounds])
        assert s[0]["sync"]["global_hash"] == s[1]["sync"]["global_hash"], mates  # one model at the end
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    both = [r for r in rows if r.get("alive/stage0") == 2 and r.get("alive/stage1") == 2]
    assert both and any("loss" in r for r in both), rows[-5:]
    print(f"\nclock skew -30 s / +30 s: stage rounds paired {len(paired)}/{len(rounds)} (stage 1); "
          f"monitor windows with all 4 peers: {len(both)} of {len(rows)}")
