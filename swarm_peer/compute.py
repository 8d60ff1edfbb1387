"""The torch side of a stage peer: its model and inner optimizer, run on one compute thread.

Training semantics (why the numbers are exact):
- Gradient accumulation window. A peer admits microbatches until it holds `data.batch_size` samples, then admits
  nothing more until every admitted microbatch has finished its backward (or been abandoned), steps AdamW, and
  reopens. So every gradient a peer applies was computed against exactly the weights its forward used: no weight
  stashing and no version mismatch, at the price of one pipeline flush per inner step (bubble (S-1)/(M+S-1) for
  S stages and M microbatches per step). Senders see a closed window as queue/backpressure and route around it.
- Loss scale. The last stage back-propagates mean_loss * n / batch_size for a microbatch of n samples, so a full
  window sums to the batch-mean gradient exactly as the single-process baseline computes it. A window that closes
  with fewer samples in `p.grad` (an abandoned microbatch) is rescaled to its own sample count before the step.
- What is in `p.grad` is counted on the compute thread, by the backward that put it there (`grad_samples`), not by
  the caller: a request abandoned by its caller (a hop timeout cancels the handler) has its queued backward skipped
  (`Ticket.abandoned`), one already running is counted, and a backward of an earlier window never runs into a
  later one (`Ticket.window`). So every step's gradient is exactly the sum over the microbatches it counts.
- The learning-rate schedule runs on the run's clock, not on each peer's step count (`StageTrainer.clock`): stage 0
  advances it by one per inner step; every microbatch carries the clock of the stage-0 step that drew it, and a later
  stage steps at the median clock of the microbatches it summed. So a later stage that takes more (or fewer) inner
  steps than stage 0 follows stage 0's warmup and cosine. Stage mates align their clocks at every averaged round
  (median of the group's; a float, so a faster peer's extra steps are neither gained nor lost) and a joiner adopts its stage's, so peers of a stage use the same lr in the same round.
- One compute thread executes all torch work in priority order: optimizer step, then backward, then forward (a
  backward frees memory and unblocks the sender; a forward only adds work); when nothing is queued, the weight
  gradients a split backward deferred (split_backward.py: a later stage replies with its input gradient before it
  computes its weight gradients, which land in p.grad before anything reads it).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from swarm_peer.config import Config
from swarm_peer.model import StageModel, build_stage, stage_spec, weights_hash
from swarm_peer.optim import build_inner_optimizer, clip_grad_norm, scheduled_lr
from swarm_peer.split_backward import DeferredWeightGrads
from swarm_peer.validation import all_finite

STEP, BACKWARD, FORWARD = 0, 1, 2
LEDGER_STEPS = 256  # the summary lists which microbatches each of the last this-many inner steps summed


class ComputeThread:
    """A single worker thread with a priority queue; `await run(priority, fn)` from the event loop."""

    def __init__(self, name: str = "swarm-peer-compute"):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._counter = itertools.count()
        self._idle_work: Callable[[], bool] | None = None
        self.busy_seconds = 0.0  # time spent running work (the rest of its life the thread waited: the bubble)
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def set_idle_work(self, fn: Callable[[], bool]) -> None:
        """`fn` runs whenever nothing is queued, one small piece at a time; it returns False when it has none."""
        self._idle_work = fn

    def _work(self) -> None:
        while True:
            try:
                _, _, item = self._queue.get_nowait()
            except queue.Empty:
                if self._idle_work is not None and self._timed(self._idle_work):
                    continue
                _, _, item = self._queue.get()
            if item is None:
                return
            fn, done = item
            try:
                result, error = self._timed(fn), None
            except BaseException as e:  # reported to the waiting caller
                result, error = None, e
            done(result, error)

    def _timed(self, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.busy_seconds += time.perf_counter() - t0

    async def run(self, priority: int, fn):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        done = lambda result, error: loop.call_soon_threadsafe(_resolve, future, result, error)  # noqa: E731
        self._queue.put((priority, next(self._counter), (fn, done)))
        return await future

    def call(self, priority: int, fn, timeout: float | None = None):
        """Blocking variant for other threads (e.g. hivemind's state-sharing thread)."""
        future = concurrent.futures.Future()
        done = lambda result, error: future.set_exception(error) if error else future.set_result(result)  # noqa: E731
        self._queue.put((priority, next(self._counter), (fn, done)))
        return future.result(timeout)

    def pending(self) -> int:
        return self._queue.qsize()

    def stop(self) -> None:
        self._queue.put((-1, -1, None))
        self._thread.join(timeout=10)


def _resolve(future: asyncio.Future, result, error) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Abandoned(Exception):
    """The caller gave up on this microbatch (or its window was stepped) before its backward began."""


@dataclass
class Ticket:
    """One microbatch's claim on the current gradient window (see the module docstring)."""
    mb: str
    samples: int
    window: int
    clock: float = -1.0  # the run clock of the stage-0 step that drew it (-1: unknown)
    abandoned: bool = False


@dataclass
class Pending:
    """A microbatch between its forward and its backward on this peer."""
    inputs: torch.Tensor
    outputs: torch.Tensor
    started: float


def autocast(cfg: Config, device: torch.device):
    """run.precision bf16: a forward under bfloat16 autocast (peers and the baseline alike)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.run.precision == "bf16")


class StageTrainer:
    """Model + AdamW for one stage; every method runs on the compute thread."""

    def __init__(self, cfg: Config, stage: int, device: torch.device):
        self.cfg, self.device = cfg, device
        self.spec = stage_spec(cfg, stage)
        self.model: StageModel = build_stage(cfg, stage).to(device)
        self.model.train()
        self.params = list(self.model.parameters())
        self.opt, _ = build_inner_optimizer(self.params, cfg.optim.inner, cfg.run.max_steps)
        self.inner_step = 0
        self.clock = 0.0  # the run's step this peer trains at (module docstring): what the lr schedule reads
        self.samples_stepped = 0
        self.window_id = 0  # bumped by every step: tickets of an earlier window never touch p.grad
        self.grad_samples = 0  # samples whose backward is in p.grad (compute thread only)
        self._grad_mbs: list[str] = []  # ... and their microbatch ids, in accumulation order
        self._grad_clocks: list[float] = []  # ... and the run clocks they carry
        self.abandoned = 0  # backwards skipped because their caller had given up
        self.ledger: list[dict] = []  # what each of the last LEDGER_STEPS steps summed, at which lr, when
        self.compute_seconds = 0.0
        self.throughput = 0.0  # samples/s EMA of this peer's compute
        # later stages: weight gradients after the reply (split_backward.py); stage 0 sends no input gradient
        self.deferred = DeferredWeightGrads(cfg.swarm.max_inflight) if (
            cfg.swarm.split_backward and not self.spec.is_first) else None
        if self.deferred is not None:
            self.deferred.install(self.model)
        self._deferred_seconds = 0.0  # deferred work done since the last _account (it is part of the throughput)

    def idle_work(self) -> bool:
        """One piece of deferred weight-gradient work (the compute thread's idle hook); False when none waits."""
        if self.deferred is None:
            return False
        t0 = time.perf_counter()
        ran = self.deferred.run_one()
        self._deferred_seconds += time.perf_counter() - t0
        return ran

    def _complete_gradients(self) -> None:
        """Every deferred weight gradient into p.grad (before anything reads it)."""
        if self.deferred is not None and self.deferred.pending:
            t0 = time.perf_counter()
            self.deferred.complete()
            self.compute_seconds += time.perf_counter() - t0

    def _backward(self, outputs: torch.Tensor, grad: torch.Tensor | None) -> None:
        if self.deferred is None:
            torch.autograd.backward(outputs, grad)
        else:
            self.deferred.backward(outputs, grad)

    def _autocast(self):
        return autocast(self.cfg, self.device)

    def _account(self, samples: int, seconds: float) -> None:
        seconds, self._deferred_seconds = seconds + self._deferred_seconds, 0.0
        self.compute_seconds += seconds
        rate = samples / max(seconds, 1e-6)
        self.throughput = rate if self.throughput == 0 else 0.8 * self.throughput + 0.2 * rate

    def forward(self, x: torch.Tensor) -> Pending:
        t0 = time.perf_counter()
        if self.deferred is not None:
            self.deferred.make_room()  # bounded deferred work (split_backward.py), off the reply's path
        x = x.to(self.device)
        if not self.spec.is_first:
            x = x.detach().requires_grad_(True)
        with self._autocast():
            out = self.model(x)
        self._account(x.shape[0], time.perf_counter() - t0)
        return Pending(x, out, t0)

    def ticket(self, mb: str, samples: int, clock: float = -1.0) -> Ticket:
        return Ticket(mb, samples, self.window_id, float(clock))

    def _check(self, ticket: Ticket) -> None:
        if ticket.abandoned or ticket.window != self.window_id:
            self.abandoned += 1
            raise Abandoned(f"microbatch {ticket.mb} abandoned before its backward")

    def _counted(self, ticket: Ticket) -> None:
        self.grad_samples += ticket.samples
        self._grad_mbs.append(ticket.mb)
        if ticket.clock >= 0:
            self._grad_clocks.append(ticket.clock)

    def backward(self, pending: Pending, grad_out: torch.Tensor, ticket: Ticket) -> torch.Tensor | None:
        self._check(ticket)
        t0 = time.perf_counter()
        grad_out = grad_out.to(self.device, dtype=pending.outputs.dtype)
        if not all_finite(grad_out):
            raise ValueError("non-finite gradient received; microbatch dropped")
        self._backward(pending.outputs, grad_out)
        self._counted(ticket)
        self._account(pending.inputs.shape[0], time.perf_counter() - t0)
        return None if self.spec.is_first else pending.inputs.grad.detach()

    def forward_backward_last(self, x: torch.Tensor, labels: torch.Tensor, ticket: Ticket) -> tuple[torch.Tensor, float]:
        """Last stage: forward, loss, backward of loss * samples / batch_size; returns (input grad, mean loss)."""
        self._check(ticket)
        samples = ticket.samples
        pending = self.forward(x)
        self._check(ticket)  # abandoned during the forward: nothing reaches p.grad
        t0 = time.perf_counter()
        loss = StageModel.loss(pending.outputs, labels.to(self.device))
        value = loss.item()
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("non-finite loss; microbatch dropped")
        self._backward(loss * (samples / self.cfg.data.batch_size), None)
        self._counted(ticket)
        self._account(samples, time.perf_counter() - t0)
        return (None if self.spec.is_first else pending.inputs.grad.detach()), value

    @torch.no_grad()
    def evaluate_last(self, x: torch.Tensor, labels: torch.Tensor) -> float:
        return StageModel.loss(self.forward_no_grad(x), labels.to(self.device)).item()

    @torch.no_grad()
    def forward_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation and sampling: eval mode (no dropout), then back to training (all on the compute thread, so no
        training forward runs in between)."""
        self.model.eval()
        try:
            with self._autocast():
                return self.model(x.to(self.device))
        finally:
            self.model.train()

    def seal(self) -> int:
        """Close the gradient of the current window (compute thread): returns the samples in p.grad; a backward
        still queued for this window is skipped from now on."""
        self.window_id += 1
        return self.grad_samples

    def discard_gradients(self) -> None:
        """Drop what is in p.grad (its state was replaced, e.g. by a download): nothing of it may be stepped."""
        if self.deferred is not None:
            self.deferred.drop()
        self.opt.zero_grad(set_to_none=True)
        self.window_id += 1
        self.grad_samples, self._grad_mbs, self._grad_clocks = 0, [], []

    def position(self) -> float:
        """The run clock the coming step trains at: stage 0's own; a later stage's follows the microbatches it summed
        (their median, never backwards)."""
        if self.spec.is_first or not self._grad_clocks:
            return self.clock
        return max(self.clock, sorted(self._grad_clocks)[(len(self._grad_clocks) - 1) // 2])

    def step(self, grads_are_mean: bool = False, clock: float | None = None) -> int:
        """Inner AdamW step on the samples counted in p.grad (`grads_are_mean`: already the batch mean, as after a
        sync-mode gradient average) at run clock `clock` (default: `position()`). Returns the samples stepped."""
        self._complete_gradients()
        completed, mbs = self.grad_samples, self._grad_mbs
        position = self.position() if clock is None else float(clock)
        self.window_id += 1
        self.grad_samples, self._grad_mbs, self._grad_clocks = 0, [], []
        if completed <= 0 and not grads_are_mean:
            self.opt.zero_grad(set_to_none=True)
            return 0
        if completed != self.cfg.data.batch_size and not grads_are_mean:
            scale = self.cfg.data.batch_size / completed
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        for p in self.params:
            if p.grad is not None and not all_finite(p.grad):
                self.opt.zero_grad(set_to_none=True)
                raise ValueError("non-finite accumulated gradient; step skipped")
        clip_grad_norm(self.params, self.cfg.optim.inner.grad_clip)
        lr = scheduled_lr(self.cfg.optim.inner, position, self.cfg.run.max_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.inner_step += 1
        self.clock = position + 1 if self.spec.is_first else position
        self.samples_stepped += completed
        entry = {"step": self.inner_step, "samples": completed, "mbs": mbs, "clock": position, "lr": lr,
                 "t": time.time()}
        self.ledger = [*self.ledger[-(LEDGER_STEPS - 1):], entry]
        return completed

    @torch.no_grad()
    def mean_gradients(self, completed_samples: int, out: list[torch.Tensor]) -> None:
        """Write the batch-mean gradient over this peer's completed samples into `out` (CPU fp32; zeros if none)."""
        self._complete_gradients()
        scale = self.cfg.data.batch_size / max(completed_samples, 1)
        for o, p in zip(out, self.params):
            g = None if p.grad is None else p.grad.detach()
            if g is None:
                o.zero_()
            elif scale == 1.0:
                o.copy_(g)  # a full window: already the batch mean
            elif g.device == o.device and g.dtype == o.dtype:
                torch.mul(g, scale, out=o)  # one pass (a copy, then a scale, read the buffer twice)
            else:
                o.copy_(g).mul_(scale)

    @torch.no_grad()
    def set_gradients(self, grads: list[torch.Tensor]) -> None:
        if self.deferred is not None:
            self.deferred.drop()  # nothing is deferred here (mean_gradients completed it, the window is closed)
        for p, g in zip(self.params, grads):
            if p.grad is None:
                p.grad = g.to(p.device, p.dtype).clone()
            else:
                p.grad.copy_(g)  # in place: no second set of gradients while the old one is freed

    def inner_state_tensors(self) -> tuple[int, list[torch.Tensor]]:
        """(AdamW step count, [exp_avg..., exp_avg_sq...]) as CPU copies; zeros before the first step."""
        steps, avgs, sqs = 0, [], []
        for p in self.params:
            st = self.opt.state.get(p, {})
            steps = max(steps, int(st["step"])) if "step" in st else steps
            avgs.append(st["exp_avg"].detach().cpu().clone() if "exp_avg" in st else torch.zeros(p.shape))
            sqs.append(st["exp_avg_sq"].detach().cpu().clone() if "exp_avg_sq" in st else torch.zeros(p.shape))
        return steps, [*avgs, *sqs]

    @torch.no_grad()
    def load_inner_state(self, adam_steps: int, tensors: list[torch.Tensor], inner_step: int) -> None:
        """Adopt another replica's AdamW moments and step count (sync mode joiners)."""
        n = len(self.params)
        if len(tensors) != 2 * n or any(t.shape != p.shape for t, p in zip(tensors, [*self.params] * 2)):
            raise ValueError("downloaded optimizer state does not match this stage's parameters")
        self.opt.state.clear()
        if adam_steps > 0:
            for i, p in enumerate(self.params):
                self.opt.state[p] = {"step": torch.tensor(float(adam_steps)), "exp_avg": tensors[i].to(p.device).clone(),
                                     "exp_avg_sq": tensors[n + i].to(p.device).clone()}
        self.inner_step = inner_step

    def weights_hash(self) -> str:
        return weights_hash(self.model)

    def state_dict(self) -> dict:
        """Model, AdamW and counters, by reference (a checkpoint serializes it on the compute thread)."""
        return {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "inner_opt": self.opt.state_dict(), "clock": self.clock, "inner_step": self.inner_step,
                "samples_stepped": self.samples_stepped}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["inner_opt"])
        self.inner_step, self.samples_stepped = int(state["inner_step"]), int(state["samples_stepped"])
        self.clock = float(state.get("clock", self.inner_step))  # checkpoints before the run clock: own steps
