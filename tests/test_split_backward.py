"""Split backward (swarm_peer/split_backward.py): the input gradient at once, the weight gradients later, and the
stage's gradients exactly those of a plain backward."""
import pytest
import torch

from swarm_peer.compute import StageTrainer
from swarm_peer.config import load_config
from swarm_peer.model import build_stage
from swarm_peer.split_backward import DeferredWeightGrads

CONFIGS = {"gpt2": "configs/tiny.yaml", "llama": "configs/llama-tiny.yaml"}


def _stage(family: str, stage: int, *over: str):
    cfg = load_config(CONFIGS[family], ["swarm.num_stages=3", "model.num_layers=3", *over])
    return cfg, build_stage(cfg, stage)


def _microbatches(cfg, count: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    h = cfg.model.hidden_size
    return [torch.randn(2, 16, h, generator=gen) for _ in range(count)]


def _run(model, inputs, book: DeferredWeightGrads | None, last: bool, labels=None):
    """Backward of each microbatch as a stage does it; returns the input gradients and, after completing, p.grad."""
    input_grads = []
    gen = torch.Generator().manual_seed(2)
    for x in inputs:
        x = x.clone().requires_grad_(True)
        out = model(x)
        if last:
            target = torch.randint(0, out.shape[-1], out.shape[:-1], generator=gen)
            loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
            outputs, grad = loss, None
        else:
            outputs, grad = out, torch.randn(out.shape, generator=gen)
        if book is None:
            torch.autograd.backward(outputs, grad)
        else:
            book.backward(outputs, grad)
        input_grads.append(x.grad.clone())
    if book is not None:
        assert book.pending > 0
        book.complete()
        assert book.pending == 0
    return input_grads, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("stage", [1, 2])
def test_split_backward_is_bit_identical_to_a_plain_backward(family, stage):
    torch.set_num_threads(1)
    cfg, plain = _stage(family, stage)
    _, split = _stage(family, stage)
    book = DeferredWeightGrads(limit=8)
    assert book.install(split) > 0
    inputs = _microbatches(cfg, 3)
    last = stage == 2
    gx_plain, grads_plain = _run(plain, inputs, None, last)
    gx_split, grads_split = _run(split, inputs, book, last)
    for a, b in zip(gx_plain, gx_split):
        assert torch.equal(a, b)
    assert grads_plain.keys() == grads_split.keys()
    for name in grads_plain:
        assert torch.equal(grads_plain[name], grads_split[name]), name


def test_split_backward_under_bf16_autocast_matches_a_plain_one():
    cfg, plain = _stage("gpt2", 1)
    _, split = _stage("gpt2", 1)
    book = DeferredWeightGrads(limit=8)
    book.install(split)
    inputs = _microbatches(cfg, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gx_plain, grads_plain = _run(plain, inputs, None, False)
        gx_split, grads_split = _run(split, inputs, book, False)
    for a, b in zip(gx_plain, gx_split):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)
    for name in grads_plain:
        assert grads_split[name].dtype == torch.float32
        torch.testing.assert_close(grads_plain[name], grads_split[name], rtol=2e-2, atol=1e-3, msg=name)


def test_deferred_work_is_capped_run_in_small_pieces_and_dropped_with_the_gradients():
    cfg, model = _stage("gpt2", 1)
    book = DeferredWeightGrads(limit=2)
    book.install(model)
    weight = model.blocks[0].mlp.c_fc.weight
    for i, x in enumerate(_microbatches(cfg, 4)):
        book.make_room()  # what a training forward does first: the oldest completed while `limit` wait
        assert book.pending == min(i, 1)
        out = model(x.requires_grad_(True))
        book.backward(out, torch.ones_like(out))  # never completes anything itself: the reply must not wait
        assert book.pending == min(i + 1, 2)
    assert weight.grad is not None  # the first two microbatches' products went in
    assert book.run_one() and book.pending == 2  # one matmul's product, not a whole microbatch
    book.drop()
    assert book.pending == 0 and not book.run_one()
    with torch.no_grad():  # evaluation: the original forward, nothing deferred
        model(_microbatches(cfg, 1)[0])
    assert book.pending == 0


def test_a_trainer_completes_deferred_gradients_before_its_step_and_drops_them_on_discard():
    cfg = load_config("configs/tiny.yaml", ["swarm.split_backward=true"])
    trainer = StageTrainer(cfg, 1, torch.device("cpu"))
    assert trainer.deferred is not None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, cfg.data.seq_len, cfg.model.hidden_size, generator=gen)
    labels = torch.randint(0, 256, (4, cfg.data.seq_len), generator=gen)
    trainer.forward_backward_last(x, labels, trainer.ticket("a", 4))
    assert trainer.deferred.pending == 1
    head = trainer.model.lm_head.weight
    assert head.grad is None  # deferred: the head's weight gradient is not in yet
    out = [torch.empty(p.shape) for p in trainer.params]
    trainer.mean_gradients(4, out)  # sync mode reads p.grad: deferred work lands first
    assert trainer.deferred.pending == 0 and head.grad is not None
    trainer.forward_backward_last(x, labels, trainer.ticket("b", 4))
    trainer.discard_gradients()
    assert trainer.deferred.pending == 0
    trainer.forward_backward_last(x, labels, trainer.ticket("c", 4))
    before = head.detach().clone()
    assert trainer.step() == 4 and trainer.deferred.pending == 0
    assert not torch.equal(before, head.detach())
    first = StageTrainer(cfg, 0, torch.device("cpu"))
    assert first.deferred is None  # stage 0 sends no input gradient: nothing to gain


def test_the_compute_thread_runs_idle_work_only_between_queued_tasks():
    import asyncio
    import threading

    from swarm_peer.compute import FORWARD, ComputeThread

    compute, order, gate = ComputeThread(), [], threading.Event()
    pieces = [3]

    def idle() -> bool:  # three pieces of idle work, each after whatever is queued
        if pieces[0] == 0:
            return False
        pieces[0] -= 1
        order.append("idle")
        return True

    async def main():
        blocker = asyncio.ensure_future(compute.run(FORWARD, gate.wait))  # holds the thread while tasks queue up
        await asyncio.sleep(0.05)
        compute.set_idle_work(idle)
        tasks = [asyncio.ensure_future(compute.run(FORWARD, lambda i=i: order.append(i))) for i in range(2)]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(blocker, *tasks)
        for _ in range(100):
            if pieces[0] == 0:
                break
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
    finally:
        compute.stop()
    assert order == [0, 1, "idle", "idle", "idle"], order
    assert compute.busy_seconds > 0.04  # the blocker's wait counts as busy: it ran on the thread
