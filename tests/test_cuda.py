"""The CUDA path for real, when this machine has a GPU (skipped otherwise): 2 stages x 2 DiLoCo peers on one GPU
(four processes share it), bf16 autocast, the tiny config; every peer ends, stage mates end on one model, and each
peer's estimate was made for the GPU."""
import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]
STEPS = 12


def test_two_by_two_swarm_on_one_gpu_with_bf16(swarm_factory):
    swarm = swarm_factory("cuda", ["swarm.num_stages=2", "swarm.sync_every=3", "run.device=cuda",
                                   "run.precision=bf16", "run.eval_interval=0"])
    for name in ("c", "d"):
        swarm.start(name, 1, "--max-steps", str(STEPS))
        swarm.wait_ready(name)
    for i, name in enumerate(("a", "b")):
        swarm.start(name, 0, "--max-steps", str(STEPS), "--data-shard", f"{i}/2")
    for name in ("a", "b", "c", "d"):
        assert swarm.wait_exit(name, 300) == 0, swarm.log(name)[-3000:]
        assert "memory estimate (cuda" in swarm.log(name), swarm.log(name)[:2000]
    for mates in (("a", "b"), ("c", "d")):
        s = [swarm.summary(n) for n in mates]
        assert s[0]["sync"]["global_hash"] == s[1]["sync"]["global_hash"], mates
        assert all(r["ok"] for r in s[0]["sync"]["rounds"]), s[0]["sync"]["rounds"]
    for name in ("c", "d"):  # the last stage trained on real losses
        curve = swarm.summary(name)["loss_curve"]
        assert curve and all(loss == loss and loss < 20 for _, loss in curve), curve[-3:]
