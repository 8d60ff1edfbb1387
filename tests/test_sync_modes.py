"""The sync modes as strategies, alone (a real stage model, no network): what each serves, how it loads, and what a
round's average does to the weights."""
import pytest
import torch

from swarm_peer.compute import StageTrainer
from swarm_peer.config import load_config
from swarm_peer.sync_modes import MODES, DiLoCo, GradientSync, Independent, make_mode
from tests.swarm_harness import FAST


def _trainer(mode: str, *over: str) -> StageTrainer:
    cfg = load_config(None, [*FAST, "swarm.num_stages=2", f"swarm.sync_mode={mode}", *over])
    trainer = StageTrainer(cfg, 1, torch.device("cpu"))
    return trainer


def _train_one_step(trainer: StageTrainer) -> None:
    x, labels = torch.randn(2, 32, 64), torch.randint(0, 257, (2, 32))
    trainer.forward_backward_last(x, labels, trainer.ticket("a:0", trainer.cfg.data.batch_size))
    trainer.seal()
    trainer.step()


def test_make_mode_picks_the_configured_strategy():
    assert set(MODES) == {"diloco", "sync", "none"}
    for mode, kind in (("diloco", DiLoCo), ("sync", GradientSync), ("none", Independent)):
        trainer = _trainer(mode)
        strategy = make_mode(trainer.cfg, trainer)
        assert type(strategy) is kind and strategy.name == mode
        assert (strategy.outer is not None) == (mode == "diloco")
        assert strategy.outer_rounds == (mode == "diloco") and strategy.averages_gradients == (mode == "sync")


@pytest.mark.parametrize("mode", ["diloco", "sync", "none"])
def test_a_served_state_loads_into_another_replica_with_the_same_hash(mode):
    donor, joiner = _trainer(mode), _trainer(mode)
    a, b = make_mode(donor.cfg, donor), make_mode(joiner.cfg, joiner)
    _train_one_step(donor)
    if mode == "diloco":  # the state is the global copy: move it off the init, as an outer step would
        delta = [torch.full_like(p, 1e-2) for p in donor.params]
        a.apply(delta)
    assert a.state_hash() != b.state_hash()
    meta, tensors = a.state_tensors({"round": 3})
    assert len(tensors) == a.num_state_tensors() and meta["round"] == 3
    b.load_state(meta, [t.clone() for t in tensors])
    assert b.state_hash() == a.state_hash()
    if mode != "diloco":  # gradient sync and independent replicas also take the AdamW moments and step count
        assert joiner.inner_state_tensors()[0] == donor.inner_state_tensors()[0] == 1


def test_diloco_round_of_ones_own_delta_with_plain_sgd_lands_on_the_local_weights():
    """Outer lr 1, no momentum: θ_global − (θ_global − θ_local) = θ_local, the check that contribute and apply are
    the two halves of one outer step."""
    trainer = _trainer("diloco", "optim.outer.lr=1.0", "optim.outer.momentum=0.0", "optim.outer.nesterov=false")
    mode = make_mode(trainer.cfg, trainer)
    _train_one_step(trainer)
    local = [p.detach().clone() for p in trainer.params]
    out = [torch.zeros_like(p) for p in trainer.params]
    mode.contribute(out, completed=0)
    assert any(o.abs().max() > 0 for o in out)  # the inner step moved the weights off the global copy
    mode.apply(out)
    for p, q, g in zip(trainer.params, local, mode.outer.global_params):
        assert torch.allclose(p.detach(), q, atol=1e-6) and torch.allclose(g, q, atol=1e-6)
    assert mode.round_samples(round_samples=24, completed=8) == 24  # a round stands for all its inner steps


def test_gradient_sync_contributes_the_batch_mean_gradient_and_applies_the_average():
    trainer = _trainer("sync")
    mode = make_mode(trainer.cfg, trainer)
    x, labels = torch.randn(2, 32, 64), torch.randint(0, 257, (2, 32))
    trainer.forward_backward_last(x, labels, trainer.ticket("a:0", 2))
    completed = trainer.seal()
    out = [torch.zeros_like(p) for p in trainer.params]
    mode.contribute(out, completed)
    scale = trainer.cfg.data.batch_size / completed
    for o, p in zip(out, trainer.params):
        if p.grad is not None:
            assert torch.allclose(o, p.grad * scale)
    average = [torch.full_like(p, 0.5) for p in trainer.params]
    mode.apply(average)
    assert all(torch.equal(p.grad, a) for p, a in zip(trainer.params, average))
    assert mode.round_samples(round_samples=24, completed=completed) == completed


def test_independent_replicas_have_no_rounds():
    trainer = _trainer("none")
    mode = make_mode(trainer.cfg, trainer)
    with pytest.raises(NotImplementedError):
        mode.contribute([], 0)
    assert mode.state_dict() is None


def test_an_overlapped_round_averages_the_snapshot_and_keeps_the_steps_trained_meanwhile():
    """begin_round fixes the contribution; inner steps go on; land gives θ_global_new + (θ_local − snapshot): an
    overlapped round is a blocking round plus the steps trained while it ran, and exactly θ_global without them."""
    trainer = _trainer("diloco")
    mode = make_mode(trainer.cfg, trainer)
    _train_one_step(trainer)
    at_start = [p.detach().clone() for p in trainer.params]
    expected_delta = [g - p for g, p in zip(mode.outer.global_params, at_start)]
    mode.begin_round(overlap=True)
    _train_one_step(trainer)  # training goes on while the round runs
    drift = [p.detach() - s for p, s in zip(trainer.params, at_start)]
    assert any(d.abs().max() > 0 for d in drift)
    out = [torch.zeros_like(p) for p in trainer.params]
    mode.contribute(out, completed=0)  # every attempt: from the snapshot, not from the weights as they are now
    for o, d in zip(out, expected_delta):
        assert torch.equal(o, d)
    mode.apply(out)  # the outer step on the global copy only: the local weights still train
    for p, s, d in zip(trainer.params, at_start, drift):
        assert torch.allclose(p.detach(), s + d, atol=1e-7)
    mode.land()
    for p, g, d in zip(trainer.params, mode.outer.global_params, drift):
        assert torch.allclose(p.detach(), g + d, atol=1e-6)
    assert not mode.overlapping

    mode.begin_round(overlap=True)  # no inner step while it ran: the local weights are the global copy, bit for bit
    out = [torch.zeros_like(p) for p in trainer.params]
    mode.contribute(out, completed=0)
    mode.apply(out)
    mode.land()
    for p, g in zip(trainer.params, mode.outer.global_params):
        assert torch.equal(p.detach(), g)
