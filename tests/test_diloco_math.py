"""DiLoCo's outer step against a plain-PyTorch reference written out by hand."""
import pytest
import torch

from swarm_peer.compression import deserialize, serialize
from swarm_peer.config import OuterOptimConfig
from swarm_peer.diloco import OuterOptimizer, weighted_mean


def _rounds(seed, peers=3, rounds=4, shape=(5, 7)):
    gen = torch.Generator().manual_seed(seed)
    g0 = torch.randn(shape, generator=gen)
    locals_ = [[g0 + 0.1 * torch.randn(shape, generator=gen) * (r + 1) for _ in range(peers)] for r in range(rounds)]
    weights = [[float(torch.randint(1, 100, (1,), generator=gen)) for _ in range(peers)] for _ in range(rounds)]
    return g0, locals_, weights


def _run(g0, locals_, weights, cfg, codec=None):
    outer = OuterOptimizer([g0.clone()], cfg)
    for round_locals, round_weights in zip(locals_, weights):
        per_peer = []
        for x in round_locals:
            # each peer's local weights are the round's start (global) plus its own drift
            delta = outer.pseudo_gradient([outer.global_params[0].detach() + (x - g0)])
            if codec is not None:
                delta = [deserialize(serialize(d, codec)) for d in delta]
            per_peer.append(delta)
        outer.step(weighted_mean(per_peer, round_weights))
    return outer.global_params[0].detach()


def _ref_run(g0, locals_, weights, lr, mu):
    # the reference sees the same "global + drift" locals
    g, buf = g0.clone(), None
    for round_locals, round_weights in zip(locals_, weights):
        xs = [g + (x - g0) for x in round_locals]
        delta = sum(w * (g - x) for w, x in zip(round_weights, xs)) / sum(round_weights)
        buf = delta.clone() if buf is None else mu * buf + delta
        g = g - lr * (delta + mu * buf)
    return g


def test_outer_step_matches_reference_in_fp32():
    g0, locals_, weights = _rounds(0)
    got = _run(g0, locals_, weights, OuterOptimConfig(lr=0.7, momentum=0.9, nesterov=True))
    torch.testing.assert_close(got, _ref_run(g0, locals_, weights, 0.7, 0.9), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("codec, tol", [("fp16", 2e-3), ("8bit", 5e-2)])
def test_outer_step_within_quantization_error(codec, tol):
    g0, locals_, weights = _rounds(1, shape=(64, 48))
    got = _run(g0, locals_, weights, OuterOptimConfig(lr=0.7, momentum=0.9, nesterov=True), codec)
    ref = _ref_run(g0, locals_, weights, 0.7, 0.9)
    rel = (got - ref).norm() / (ref - g0).norm()
    assert rel < tol, float(rel)


def test_lr1_no_momentum_is_plain_weighted_averaging():
    g0, locals_, weights = _rounds(2, rounds=1)
    got = _run(g0, locals_, weights, OuterOptimConfig(lr=1.0, momentum=0.0, nesterov=False))
    torch.testing.assert_close(got, weighted_mean([[x] for x in locals_[0]], weights[0])[0], atol=1e-6, rtol=0)


def test_load_into_and_state_round_trip():
    local = [torch.nn.Parameter(torch.randn(3, 3))]
    outer = OuterOptimizer(local, OuterOptimConfig())
    outer.step([torch.ones(3, 3)])
    outer.load_into(local)
    torch.testing.assert_close(local[0].detach(), outer.global_params[0].detach())
    other = OuterOptimizer([torch.zeros(3, 3)], OuterOptimConfig())
    other.load_state_dict(outer.state_dict())
    outer.step([torch.ones(3, 3)])
    other.step([torch.ones(3, 3)])
    torch.testing.assert_close(other.global_params[0], outer.global_params[0])
    with pytest.raises(ValueError):
        outer.step([torch.full((3, 3), float("nan"))])


def test_an_fp16_pseudo_gradient_buffer_holds_exactly_what_the_fp16_codec_would_send():
    """DiLoCo's averaging buffers are fp16 under the fp16 codec (sync_rules.averaging_buffer_dtype): writing the
    pseudo-gradient there must round it exactly as hivemind's codec rounds the fp32 one, saturation included."""
    from hivemind.compression import CompressionInfo, deserialize_torch_tensor

    from swarm_peer.compression import compression_strategy

    gen = torch.Generator().manual_seed(0)
    local = [torch.randn(3000, generator=gen), torch.randn(40, 50, generator=gen) * 1e-3]
    outer = OuterOptimizer(local, OuterOptimConfig(lr=0.7, momentum=0.9, nesterov=True))
    trained = [local[0] + torch.randn(3000, generator=gen) * 1e-4, local[1] + torch.randn(40, 50, generator=gen)]
    trained[0][:3] = torch.tensor([1e6, -1e6, 7e4])  # beyond fp16's range: saturates like the codec
    exact = outer.pseudo_gradient(trained)
    half = outer.pseudo_gradient(trained, out=[torch.empty(t.shape, dtype=torch.float16) for t in trained])
    codec = compression_strategy("fp16")
    for e, h in zip(exact, half):
        wire = deserialize_torch_tensor(codec.compress(e, CompressionInfo.from_tensor(e)))
        assert torch.equal(wire.to(torch.float16), h)
        assert torch.isfinite(h).all()


@pytest.mark.parametrize("nesterov", [True, False])
def test_the_outer_step_is_plain_ieee_fp32_one_operation_at_a_time(nesterov):
    """Bit for bit what numpy computes one correctly rounded float32 operation at a time: no fused multiply-add (which
    some CPUs' kernels would use and others not) can make two replicas' weights differ."""
    import numpy as np

    gen = torch.Generator().manual_seed(3)
    g0, buf0 = torch.randn(3000, generator=gen), torch.randn(3000, generator=gen)
    delta = (torch.randn(3000, generator=gen) * 1e-2).to(torch.float16)  # the fp16 averaging buffer
    cfg = OuterOptimConfig(lr=0.7, momentum=0.9, nesterov=nesterov)
    outer = OuterOptimizer([g0.clone()], cfg)
    outer.buffers[0].copy_(buf0)
    outer.step([delta])
    f32 = np.float32
    b = buf0.numpy() * f32(0.9) + delta.numpy().astype(f32)
    update = (b * f32(0.9) + delta.numpy().astype(f32)) if nesterov else b
    want = g0.numpy() - update * f32(0.7)
    assert np.array_equal(outer.buffers[0].numpy(), b) and np.array_equal(outer.global_params[0].numpy(), want)
