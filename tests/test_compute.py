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
    assert last.step() == 2 and last.ledger == [[1, 2, ["a:0"]]] and last.abandoned == 2
