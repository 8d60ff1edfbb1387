"""DiLoCo's outer step (Douillard et al. 2023), the math only; the stage-local all-reduce that feeds it is issue 4.

Per peer: a global copy of the stage parameters (fp32, on the CPU, off the accelerator), an outer SGD with
Nesterov momentum over that copy, and the working (local) parameters the inner AdamW trains. After H inner steps:
    pseudo-gradient  Δ_i = θ_global − θ_i                     (per peer)
    Δ = Σ_i w_i Δ_i / Σ_i w_i                                  (w_i = samples peer i processed in the round)
    θ_global ← OuterSGD-Nesterov(θ_global, Δ); θ_i ← θ_global  (every peer continues from the same weights)
With lr 1.0 and no momentum the outer step is plain parameter averaging: θ_global ← Σ w_i θ_i / Σ w_i.
"""
from __future__ import annotations

import copy

import torch

from swarm_peer.config import OuterOptimConfig


class OuterOptimizer:
    def __init__(self, local_params: list[torch.Tensor], cfg: OuterOptimConfig):
        self.global_params = [torch.nn.Parameter(p.detach().to("cpu", torch.float32).clone(), requires_grad=False)
                              for p in local_params]
        self.opt = torch.optim.SGD(self.global_params, lr=cfg.lr, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov and cfg.momentum > 0)

    @torch.no_grad()
    def pseudo_gradient(self, local_params: list[torch.Tensor]) -> list[torch.Tensor]:
        """θ_global − θ_local, fp32 on the CPU (what goes into the all-reduce)."""
        return [g - p.detach().to("cpu", torch.float32) for g, p in zip(self.global_params, local_params)]

    @torch.no_grad()
    def step(self, averaged_pseudo_gradient: list[torch.Tensor]) -> None:
        """Apply the outer step with the (sample-weighted, averaged) pseudo-gradient."""
        for g, delta in zip(self.global_params, averaged_pseudo_gradient):
            if delta.shape != g.shape or not torch.isfinite(delta).all():
                raise ValueError("pseudo-gradient has the wrong shape or non-finite values; outer step refused")
            g.grad = delta.to(torch.float32).clone()
        self.opt.step()
        for g in self.global_params:
            g.grad = None

    @torch.no_grad()
    def load_into(self, local_params: list[torch.Tensor]) -> None:
        """θ_local ← θ_global (each peer keeps its own inner optimizer state)."""
        for g, p in zip(self.global_params, local_params):
            p.copy_(g.to(p.device, p.dtype))

    def state_dict(self) -> dict:
        # deep copy: torch's SGD state_dict hands out its live momentum buffers
        return {"global": [g.detach().clone() for g in self.global_params], "opt": copy.deepcopy(self.opt.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for g, saved in zip(self.global_params, state["global"]):
                g.copy_(saved)
        self.opt.load_state_dict(state["opt"])


def weighted_mean(per_peer: list[list[torch.Tensor]], weights: list[float]) -> list[torch.Tensor]:
    """Σ_i w_i x_i / Σ_i w_i, tensor by tensor: what the averager computes with weight = samples."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    return [sum(w * x[k] for w, x in zip(weights, per_peer)) / total for k in range(len(per_peer[0]))]
