"""Split backward: a stage's input gradient first, its weight gradients when the compute thread is idle.

A stage's caller waits only for the gradient of the activations it sent; the weight gradients of the stage's matmuls
(about half of a backward) are needed only at the inner step. So on stages after the first, every `nn.Linear` and
transformers `Conv1D` runs through `_DeferredMatmul`: its backward returns the input (and bias) gradient at once and
leaves (input, output gradient) for `DeferredWeightGrads`, which adds `x^T g` into the weight's `.grad` later — in the
compute thread's idle time, or before anything reads `p.grad` (the step, a sync-mode average). That shortens the
critical path of the pipeline's flush by every later stage's weight-gradient time (zero-bubble pipelines' B/W split,
Qi et al. 2023), without changing which weights any gradient is computed against.

Exactness: the deferred products are the very kernels autograd runs (`mm` on the same 2-D views, accumulated in
microbatch order), so in fp32 `p.grad` is bit-identical to a plain backward (tests/test_split_backward.py). Memory: a
deferred microbatch holds its matmuls' output gradients (and keeps their inputs, which autograd would have freed);
a training forward first completes the oldest until fewer than `limit` wait (`make_room`), so the last stage holds
at most `limit` and a middle stage, whose backwards come between its forwards, up to `2 limit - 1`
(`memory.estimate` counts them).
"""
from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR, CONV1D = 0, 1  # y = x W^T + b (nn.Linear) | y = x W + b (GPT-2's Conv1D)


class DeferredWeightGrads:
    """Weight-gradient products waiting to be added to `.grad`, grouped by microbatch (compute thread only)."""

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self._groups: deque[list] = deque()
        self._open: list | None = None
        self.items_run = 0

    def install(self, model: nn.Module) -> int:
        """Route every Linear / Conv1D of `model` through `_DeferredMatmul` while gradients are on; returns how many."""
        count = 0
        for module in model.modules():
            layout = CONV1D if isinstance(module, Conv1D) else LINEAR if isinstance(module, nn.Linear) else None
            if layout is not None:
                module.forward = _deferring_forward(module, layout, self)
                count += 1
        return count

    def backward(self, outputs: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """`torch.autograd.backward` whose matmul weight gradients are deferred as one microbatch's group."""
        self._open = []
        try:
            torch.autograd.backward(outputs, grad)
        except BaseException:
            self._open = None  # a failed backward put nothing it deferred into .grad: drop it with the rest
            raise
        group, self._open = self._open, None
        if group:
            self._groups.append(group)

    def make_room(self) -> None:
        """Before a training forward (which adds activations): complete the oldest groups until fewer than `limit`
        wait. Not after a backward: the reply would wait for it."""
        while len(self._groups) >= self.limit:
            self._run_group(self._groups.popleft())

    def defer(self, item: tuple) -> None:
        if self._open is None:  # a backward not started through backward(): nothing waits for it
            _accumulate(*item)
        else:
            self._open.append(item)

    @property
    def pending(self) -> int:
        return len(self._groups)

    def run_one(self) -> bool:
        """One deferred product (the compute thread's idle work); False when there is none."""
        if not self._groups:
            return False
        group = self._groups[0]
        _accumulate(*group.pop(0))
        self.items_run += 1
        if not group:
            self._groups.popleft()
        return True

    def complete(self) -> None:
        """Everything deferred into `.grad`, oldest first (before `.grad` is read)."""
        while self._groups:
            self._run_group(self._groups.popleft())

    def drop(self) -> None:
        """Forget what waits (the gradients are being discarded)."""
        self._groups.clear()

    def _run_group(self, group: list) -> None:
        for item in group:
            _accumulate(*item)
        self.items_run += len(group)


@torch.no_grad()
def _accumulate(weight: nn.Parameter, layout: int, x2: torch.Tensor, g2: torch.Tensor) -> None:
    gw = x2.t().mm(g2) if layout == CONV1D else g2.t().mm(x2)  # what autograd's mm backward computes
    gw = gw.to(weight.dtype)
    if weight.grad is None:
        weight.grad = gw
    else:
        weight.grad.add_(gw)


def _deferring_forward(module: nn.Module, layout: int, book: DeferredWeightGrads):
    original = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not module.weight.requires_grad:
            return original(x)
        return _DeferredMatmul.apply(x, module.weight, module.bias, layout, book)

    return forward


class _DeferredMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layout, book):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):  # autocast's casts made here, explicitly, and saved
            xc, wc = x.to(dtype), weight.to(dtype)
            bc = None if bias is None else bias.to(dtype)
            x2 = xc.reshape(-1, xc.shape[-1])
            if layout == CONV1D:
                y = (x2.mm(wc) if bc is None else torch.addmm(bc, x2, wc)).view(*x.shape[:-1], wc.shape[1])
            else:
                y = F.linear(xc, wc, bc)
        ctx.save_for_backward(x2, wc)
        ctx.layout, ctx.book, ctx.weight, ctx.x_shape, ctx.x_dtype = layout, book, weight, x.shape, x.dtype
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x2, wc = ctx.saved_tensors
        g2 = grad.to(wc.dtype).reshape(-1, grad.shape[-1])
        gx = None
        if ctx.needs_input_grad[0]:
            gx = (g2.mm(wc.t()) if ctx.layout == CONV1D else g2.mm(wc)).view(ctx.x_shape).to(ctx.x_dtype)
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[1]:
            ctx.book.defer((ctx.weight, ctx.layout, x2, g2))
        return gx, None, gb, None, None
