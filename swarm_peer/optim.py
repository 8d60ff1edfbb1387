"""The inner optimizer every trainer uses: AdamW, linear warmup + cosine decay, gradient clipping.

Clipping is per pipeline stage: a stage peer only sees its own gradients, and a global norm would need a
cross-stage exchange on every step. The single-process baseline clips each stage's parameter group separately
with the same boundaries, so it applies exactly the update the swarm applies.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from swarm_peer.config import InnerOptimConfig


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduled_lr(cfg: InnerOptimConfig, step: int, total: int) -> float:
    """The inner lr at run step `step` (the same product LambdaLR computes, so swarm and baseline agree)."""
    return cfg.lr * lr_factor(step, cfg.warmup_steps, total, cfg.min_lr_ratio)


def build_inner_optimizer(params: list[nn.Parameter], cfg: InnerOptimConfig, total_steps: int):
    """AdamW with decay on matrices only (biases, norms and nothing 1-D decay), plus its LambdaLR schedule."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        foreach=False,  # the same kernel on every device and group size keeps swarm == baseline to the bit
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio))
    return opt, sched


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip in place (no-op when max_norm is 0); returns the pre-clip norm."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm <= 0:
        return float(torch.norm(torch.stack([g.grad.detach().norm() for g in grads])))
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
