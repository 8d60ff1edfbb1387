"""Checkpoint and resume with real peers: a peer stopped by SIGTERM saves its state; restarted on the same directory
it resumes, and since its stage has moved on meanwhile, it downloads the newer state; a corrupt checkpoint stops it."""
import re
import subprocess
import time

import pytest

from tests.conftest import PYTHON, ROOT

pytestmark = pytest.mark.slow


def _round_reached(log: str) -> int:
    rounds = [int(m) for m in re.findall(r"round \d+ -> (\d+)", log)]
    return max(rounds, default=0)


def test_sigterm_checkpoint_then_resume_and_catch_up(swarm_factory, tmp_path):
    swarm = swarm_factory("resume", ["swarm.num_stages=2", "swarm.sync_every=3", "run.checkpoint_interval=1"])
    swarm.start("s1", 1, "--max-steps", "100")
    swarm.wait_ready("s1")
    ck_a, ck_b = tmp_path / "ck_a", tmp_path / "ck_b"
    common = {"faults": "slow=0.1"}  # slowed down: the run outlasts a restart
    swarm.start("s0a", 0, "--data-shard", "0/2", "--checkpoint-dir", str(ck_a), "--max-steps", "100", **common)
    swarm.start("s0b", 0, "--data-shard", "1/2", "--checkpoint-dir", str(ck_b), "--max-steps", "100", **common)
    deadline = time.monotonic() + 180
    while _round_reached(swarm.log("s0a")) < 2:
        assert time.monotonic() < deadline, swarm.log("s0a")[-3000:]
        time.sleep(0.3)
    swarm.procs["s0a"].terminate()  # graceful: withdraws, saves a checkpoint, exits 0
    assert swarm.wait_exit("s0a", 60) == 0, swarm.log("s0a")[-3000:]
    assert "checkpoint (signal)" in swarm.log("s0a")
    stopped_at = _round_reached(swarm.log("s0a"))
    while _round_reached(swarm.log("s0b")) < stopped_at + 2:  # the stage moves on without it
        assert time.monotonic() < deadline + 120, swarm.log("s0b")[-3000:]
        time.sleep(0.3)
    swarm.start("s0a2", 0, "--data-shard", "0/2", "--checkpoint-dir", str(ck_a), "--max-steps", "100", **common)
    for name in ("s0a2", "s0b", "s1"):
        assert swarm.wait_exit(name, 300) == 0, swarm.log(name)[-3000:]
    a, b = swarm.summary("s0a2"), swarm.summary("s0b")
    resumed = a["resumed_from"]
    assert resumed and resumed["inner_step"] > 0 and resumed["round"] == stopped_at, resumed
    joined = a["sync"]["recoveries"][0]
    assert joined["reason"] == "joining the stage" and joined["round"] > resumed["round"], a["sync"]["recoveries"]
    # it went on from its checkpoint at the stage's run step (the stage trained on meanwhile), to the end of the run
    assert joined["clock"] > resumed["inner_step"] and a["clock"] >= 100 and a["inner_steps"] < 100, (joined, a["clock"])
    assert a["sync"]["global_hash"] == b["sync"]["global_hash"]


def test_corrupt_checkpoint_is_reported_and_refused(tmp_path, cache_dir):
    from tests.swarm_harness import FAST

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "stage1.ckpt").write_bytes(b"SWARMPEER-CKPT-1\n" + b"\0" * 40 + b"truncated")
    args = [PYTHON, "-m", "swarm_peer", "--stage", "1", "--checkpoint-dir", str(ck), "--host-maddrs",
            "/ip4/127.0.0.1/tcp/0"]
    for o in [*FAST, f"data.cache_dir={cache_dir}"]:
        args += ["--set", o]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: checkpoint" in proc.stderr and "corrupt or truncated" in proc.stderr
