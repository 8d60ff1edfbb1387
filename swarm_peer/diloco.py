"""DiLoCo's outer step (Douillard et al. 2023): the math, no I/O. The rounds that drive it are in sync.py.

Per peer: a global copy of the stage parameters (fp32, on the CPU, off the accelerator), an outer SGD with Nesterov
momentum over that copy, and the working (local) parameters the inner AdamW trains. After a round of inner steps:
    pseudo-gradient  Δ_i = θ_global − θ_i                     (per peer)
    Δ = Σ_i w_i Δ_i / Σ_i w_i                                  (w_i = samples peer i processed in the round)
    b ← μ b + Δ;  θ_global ← θ_global − lr (Δ + μ b)  (Nesterov; plain momentum: − lr b)
    θ_i ← θ_global                                             (every peer continues from the same weights)
With lr 1.0 and no momentum the outer step is plain parameter averaging: θ_global ← Σ w_i θ_i / Σ w_i.

The update is computed in fp32 with one IEEE operation per kernel (a multiply, or an add: nothing a CPU could fuse
into a multiply-add), so peers that averaged the same Δ (bit-identical, see averaging.py) end with bit-identical
weights on any machine.
"""
from __future__ import annotations

import hashlib

import torch

from swarm_peer.config import OuterOptimConfig
from swarm_peer.validation import all_finite


FP16_MIN, FP16_MAX = torch.finfo(torch.float16).min, torch.finfo(torch.float16).max
CHUNK = 1 << 20  # values per slice of the outer step (4 MiB temporaries, not a tensor's size)


def squared_norm(tensors: list[torch.Tensor]) -> float:
    """Σ x² (a round's metric): one read pass, fp32 within a slice, float64 across slices (~1e-6 relative; the
    float64 copy per slice this replaced cost 5x as much: 0.19 s a sync round at GPT-2-small's shape). Not finite
    when any value is not (or the sum overflows fp32 within a slice: |x| ~ 1e16)."""
    return sum(float(torch.linalg.vector_norm(s)) ** 2 for t in tensors for s in t.reshape(-1).split(CHUNK))


class OuterOptimizer:
    def __init__(self, local_params: list[torch.Tensor], cfg: OuterOptimConfig):
        self.lr, self.momentum = cfg.lr, cfg.momentum
        self.nesterov = cfg.nesterov and cfg.momentum > 0
        # in shared memory: a donor's averager process streams them to joiners as they are (no copy per request)
        self.global_params = [p.detach().to("cpu", torch.float32).clone().share_memory_() for p in local_params]
        self.buffers = [torch.zeros_like(g).share_memory_() for g in self.global_params]  # zeros == torch SGD's
        # first-step clone

    @torch.no_grad()
    def pseudo_gradient(self, local_params: list[torch.Tensor], out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """θ_global − θ_local on the CPU (what goes into the all-reduce), fp32; written into `out` when given. An fp16
        `out` is rounded once, saturating at ±65504 as hivemind's fp16 codec does (sync_rules.averaging_buffer_dtype)."""
        out = out if out is not None else [torch.empty_like(g) for g in self.global_params]
        for o, g, p in zip(out, self.global_params, local_params):
            if o.dtype == torch.float16:  # in slices: no fp32 copy of a whole tensor
                for o_, g_, p_ in zip(o.view(-1).split(CHUNK), g.view(-1).split(CHUNK),
                                      p.detach().to("cpu", torch.float32).reshape(-1).split(CHUNK)):
                    o_.copy_(torch.sub(g_, p_).clamp_(FP16_MIN, FP16_MAX))
            else:
                torch.sub(g, p.detach().to("cpu", torch.float32), out=o)
        return out

    @torch.no_grad()
    def step(self, averaged_pseudo_gradient: list[torch.Tensor]) -> None:
        """Apply the outer step with the (sample-weighted, averaged) pseudo-gradient."""
        if len(averaged_pseudo_gradient) != len(self.global_params) or any(
                d.shape != g.shape or not all_finite(d)
                for d, g in zip(averaged_pseudo_gradient, self.global_params)):
            raise ValueError("pseudo-gradient has the wrong shape or non-finite values; outer step refused")
        for g, b, delta in zip(self.global_params, self.buffers, averaged_pseudo_gradient):
            # fp32, one IEEE operation per kernel (no `alpha=`, which a CPU may fuse into a multiply-add): the bits
            # do not depend on the machine. In slices, so the one temporary stays small. ~4x faster than the float64
            # arithmetic this replaced (82M values, one thread: 0.5 s against 1.8-2.1 s)
            for g_, b_, delta_ in zip(*(t.view(-1).split(CHUNK) for t in (g, b, delta))):
                b_.mul_(self.momentum).add_(delta_)  # buf = mu * buf + delta (a delta in fp16 is widened exactly)
                update = torch.mul(b_, self.momentum).add_(delta_) if self.nesterov else b_.clone()
                g_.sub_(update.mul_(self.lr))  # g -= lr * (delta + mu * buf)  (plain momentum: lr * buf)

    @torch.no_grad()
    def load_into(self, local_params: list[torch.Tensor]) -> None:
        """θ_local ← θ_global (each peer keeps its own inner optimizer state)."""
        for g, p in zip(self.global_params, local_params):
            p.copy_(g.to(p.device, p.dtype))

    def state_tensors(self) -> list[torch.Tensor]:
        """What a joining peer downloads: global weights, then momentum buffers (the live tensors: their readers
        check the averager's state version, averaging.stream_consistent)."""
        return [*self.global_params, *self.buffers]

    @torch.no_grad()
    def load_state_tensors(self, tensors: list[torch.Tensor]) -> None:
        n = len(self.global_params)
        if len(tensors) != 2 * n or any(t.shape != g.shape for t, g in zip(tensors, [*self.global_params] * 2)):
            raise ValueError("downloaded outer state does not match this stage's parameters")
        if not all(all_finite(t) for t in tensors):
            raise ValueError("downloaded outer state has non-finite values")
        for dst, src in zip((*self.global_params, *self.buffers), tensors):
            dst.copy_(src)

    def state_dict(self, copy: bool = True) -> dict:
        own = (lambda t: t.clone()) if copy else (lambda t: t)  # noqa: E731
        return {"global": [own(g) for g in self.global_params], "buffers": [own(b) for b in self.buffers]}

    def load_state_dict(self, state: dict) -> None:
        self.load_state_tensors([*state["global"], *state["buffers"]])

    def global_hash(self) -> str:
        return tensors_hash(self.global_params)


def tensors_hash(tensors: list[torch.Tensor]) -> str:
    """sha256 of the tensors' bytes in order: equal hash = bit-identical values."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())  # its buffer, not a copy
    return h.hexdigest()[:16]


def weighted_mean(per_peer: list[list[torch.Tensor]], weights: list[float]) -> list[torch.Tensor]:
    """Σ_i w_i x_i / Σ_i w_i, tensor by tensor: what the averager computes with weight = samples."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    return [sum(w * x[k] for w, x in zip(weights, per_peer)) / total for k in range(len(per_peer[0]))]
