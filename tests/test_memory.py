"""The memory estimate a peer prints at start and refuses by (swarm_peer/memory.py): sizes from the model's shape
alone, checked against real stages; the fit decision; the CLI's one-line refusal."""
import subprocess

import pytest

from swarm_peer.config import load_config
from swarm_peer.memory import GB, MemoryEstimate, estimate, fit_problem, stage_parameter_count
from swarm_peer.model import build_stage
from tests.conftest import PYTHON, ROOT


@pytest.mark.parametrize("config, stages", [("configs/tiny.yaml", 2), ("configs/llama-tiny.yaml", 3),
                                            ("configs/gpt2-small-local.yaml", 2)])
def test_parameter_count_from_the_shape_matches_the_built_stage(config, stages):
    cfg = load_config(config, [f"swarm.num_stages={stages}"])
    for stage in range(stages):
        assert stage_parameter_count(cfg, stage) == sum(p.numel() for p in build_stage(cfg, stage).parameters())


def test_gpt2_small_stage_state_is_24_bytes_per_parameter_in_diloco():
    cfg = load_config("configs/gpt2-small-local.yaml", ["swarm.overlap_rounds=false"])
    n = stage_parameter_count(cfg, 1)
    est = estimate(cfg, 1)
    assert 75e6 < n < 90e6  # ~82M per stage
    state = est.weights + est.gradients + est.inner_optimizer + est.outer_state
    assert state == 24 * n and est.averaging_buffers == 2 * n  # fp16 codec: fp16 buffers (lossless, see sync_rules)
    overlapped = estimate(load_config("configs/gpt2-small-local.yaml", ["swarm.overlap_rounds=true"]), 1)  # + a 4 B snapshot
    assert overlapped.outer_state == 12 * n
    fp32 = estimate(load_config("configs/gpt2-small-local.yaml", ["swarm.compression.averaging=fp32"]), 1)
    assert fp32.averaging_buffers == 4 * n
    sync = estimate(load_config("configs/gpt2-small-local.yaml", ["swarm.sync_mode=sync"]), 1)
    assert sync.outer_state == 0 and sync.averaging_buffers == 6 * n  # a lone sync step applies fp32 gradients,
    # + the standing group's sums of the chunks a peer of a pair reduces (standing_group.py)
    no_lanes = estimate(load_config("configs/gpt2-small-local.yaml", ["swarm.sync_mode=sync", "swarm.direct_lanes=false"]), 1)
    assert no_lanes.averaging_buffers == 4 * n
    none = estimate(load_config("configs/gpt2-small-local.yaml", ["swarm.sync_mode=none"]), 1)
    assert none.outer_state == none.averaging_buffers == 0


def test_fit_decision_on_cpu_and_on_an_accelerator():
    est = MemoryEstimate(weights=GB, gradients=GB, inner_optimizer=2 * GB, outer_state=2 * GB,
                         averaging_buffers=2 * GB, activations=GB, runtime=GB)
    assert est.total == 10 * GB and est.on_accelerator == 5 * GB and est.on_host == 5 * GB
    assert fit_problem(est, host=11 * GB, accelerator=None) is None
    assert "10.0 GB" in fit_problem(est, host=9 * GB, accelerator=None)
    assert fit_problem(est, host=6 * GB, accelerator=6 * GB) is None  # split between the GPU and the host
    assert "on the GPU" in fit_problem(est, host=60 * GB, accelerator=4 * GB)
    assert "host memory" in fit_problem(est, host=4 * GB, accelerator=60 * GB)


def test_a_stage_the_machine_cannot_hold_is_refused_in_one_line_before_anything_starts():
    big = ["--set", "model.hidden_size=8192", "--set", "model.num_heads=64", "--set", "model.num_layers=48",
           "--set", "swarm.num_stages=1"]
    proc = subprocess.run([PYTHON, "-m", "swarm_peer", "--stage", "0", *big], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "stage 0 needs ~" in lines[0] and "run.memory_check=false" in lines[0], proc.stderr
