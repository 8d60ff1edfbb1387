"""The torch side of a peer, alone (no network): evaluation semantics and gradient accounting."""
import torch

from swarm_peer.compute import Abandoned, StageTrainer
from swarm_peer.config import load_config
from tests.swarm_harness import FAST

import pytest


def _trainer(stage: int, *over: str) -> StageTrainer:
    return StageTrainer(load_config(None, [*FAST, "swarm.num_stages=2", *over]), stage, torch.device("cpu"))


def test_evaluation_and_sampling_run_without_dropout():
    last = _trainer(1, "model.dropout=0.5")
    x, labels = torch.randn(2, 32, 64), torch.randint(0, 257, (2, 32))
    assert last.evaluate_last(x, labels) == last.evaluate_last(x, labels)  # deterministic: dropout off
    assert torch.equal(last.forward_no_grad(x), last.forward_no_grad(x))
    assert last.model.training  # training resumes in train mode


def test_only_counted_backwards_reach_the_gradient():
    last = _trainer(1)
    x, labels = torch.randn(2, 32, 64), torch.randint(0, 257, (2, 32))
    kept, dropped = last.ticket("a:0", 2), last.ticket("a:1", 2)
    dropped.abandoned = True  # its caller timed out before the backward began
    last.forward_backward_last(x, labels, kept)
    with pytest.raises(Abandoned):
        last.forward_backward_last(x, labels, dropped)
    stale = last.ticket("a:2", 2)
    assert last.seal() == 2  # the window's gradient is closed: a backward of this window can no longer join it
    with pytest.raises(Abandoned):
        last.forward_backward_last(x, labels, stale)
    assert last.step() == 2 and last.abandoned == 2
    assert [(e["step"], e["samples"], e["mbs"]) for e in last.ledger] == [(1, 2, ["a:0"])]


def test_later_stages_step_on_the_run_clock_their_microbatches_carry():
    """Stage 0 counts the run's steps; a later stage steps at the median clock of what it summed, never backwards,
    and its lr is the schedule's at that clock (not at its own step count)."""
    from swarm_peer.optim import scheduled_lr

    first = _trainer(0, "optim.inner.warmup_steps=4", "run.max_steps=20")
    assert first.position() == 0
    first.clock = 7  # e.g. adopted from its stage on joining
    assert first.position() == 7
    last = _trainer(1, "optim.inner.warmup_steps=4", "run.max_steps=20")
    x, labels = torch.randn(2, 32, 64), torch.randint(0, 257, (2, 32))
    for i, clock in enumerate((9, 11, 10, 2)):  # one stray (or hostile) low clock moves the median by one rank
        last.forward_backward_last(x, labels, last.ticket(f"a:{i}", 2, clock))
    assert last.position() == 9
    last.step()
    entry = last.ledger[-1]
    assert entry["clock"] == 9 and entry["lr"] == scheduled_lr(last.cfg.optim.inner, 9, 20) and last.clock == 9
    last.forward_backward_last(x, labels, last.ticket("a:4", 2, 3))  # an old microbatch: the clock never goes back
    assert last.position() == 9
    last.step(clock=12)  # sync mode: the group's clock
    assert last.ledger[-1]["clock"] == 12 and last.clock == 12


def test_bf16_precision_runs_the_forward_in_bfloat16_and_keeps_fp32_state():
    first, last = _trainer(0, "run.precision=bf16"), _trainer(1, "run.precision=bf16")
    ids = torch.randint(0, 257, (2, 32))
    pending = first.forward(ids)
    plain = _trainer(0)
    plain.model.load_state_dict(first.model.state_dict())
    ref_out = plain.forward(ids).outputs
    # the matmuls ran in bfloat16 (the residual stream stays fp32, so the boundary tensor is fp32): close, not equal
    err = float((pending.outputs - ref_out).norm() / ref_out.norm())
    assert pending.outputs.dtype == torch.float32 and 0 < err < 0.02, err
    grad_in, loss = last.forward_backward_last(pending.outputs.detach().float(), ids, last.ticket("m", 2))
    assert grad_in.dtype == torch.float32 and loss == loss  # the next stage's input stays fp32
    first.backward(pending, grad_in, first.ticket("m", 2))
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in first.params if p.requires_grad)
    fp32 = _trainer(1)
    fp32.model.load_state_dict(last.model.state_dict())
    ref = fp32.evaluate_last(pending.outputs.detach().float(), ids)
    assert abs(last.evaluate_last(pending.outputs.detach().float(), ids) - ref) < 0.05 * ref  # bf16 rounding only
