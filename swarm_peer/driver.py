"""Stage 0's own work: feed its data shard through the pipeline, max_inflight microbatches at a time, until the run
clock reaches the run's end, and evaluate on the held-out microbatches every run.eval_interval steps.

    next microbatch -> forward -> Forwarder.send(stage 1) ... -> backward with the returned gradient
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Callable

from swarm_peer.compute import BACKWARD, FORWARD, ComputeThread, StageTrainer
from swarm_peer.config import Config
from swarm_peer.data import Microbatch, ShardSampler
from swarm_peer.evaluation import due_eval_step
from swarm_peer.forwarder import Forwarder
from swarm_peer.model import StageSpec
from swarm_peer.telemetry import PeerTelemetry
from swarm_peer.window import GradientWindow

log = logging.getLogger("swarm_peer")


class Driver:
    def __init__(self, cfg: Config, spec: StageSpec, peer_id: str, trainer: StageTrainer, compute: ComputeThread,
                 window: GradientWindow, forwarder: Forwarder | None, sampler: ShardSampler,
                 val_batches: list[Microbatch], telemetry: PeerTelemetry, stats: dict,
                 on_trained: Callable[[float | None, str | None], None], stopping: Callable[[], bool]):
        self.cfg, self.spec, self.peer_id, self.trainer, self.compute = cfg, spec, peer_id, trainer, compute
        self.window, self.forwarder, self.sampler, self.val_batches = window, forwarder, sampler, val_batches
        self.telemetry, self.stats, self._on_trained, self._stopping = telemetry, stats, on_trained, stopping
        # microbatches in flight; an evaluation holds every slot, so it measures the model of one step
        self._slots = asyncio.Semaphore(cfg.swarm.max_inflight)
        self._first_look = asyncio.Event()  # the eval loop has decided about step 0 (training waits for that)
        if not val_batches:
            self._first_look.set()

    async def drive(self, max_steps: int) -> None:
        """Feed microbatches until the run clock reaches `max_steps` (a joiner ends with its stage)."""
        sem = self._slots
        await self._first_look.wait()  # a fresh run's step-0 evaluation sees the untrained model
        index, tasks = 0, set()
        while self.trainer.clock < max_steps and not self._stopping():
            silent = time.monotonic() - self.forwarder.seen_at if self.forwarder else 0.0
            if silent > self.cfg.swarm.upstream_timeout:  # mirrors the later stages' wait for a vanished upstream
                log.warning(f"stage 0: no usable peer of stage 1 visible for {silent:.0f}s (network cut, or that "
                            f"stage is gone); leaving")
                self.stats["downstream_lost"] = 1
                break
            await sem.acquire()
            await self.window.admit(self.cfg.data.microbatch_size)
            if self.trainer.clock >= max_steps:  # the window that just closed was the last one
                self.window.finish()
                sem.release()
                break
            mb = self.sampler.next()
            task = asyncio.create_task(self._drive_one(index, mb, sem))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            index += 1
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _drive_one(self, index: int, mb: Microbatch, sem: asyncio.Semaphore) -> None:
        samples = mb.input_ids.shape[0]
        ticket = self.trainer.ticket(f"{self.peer_id[-12:]}:{index}", samples, self.trainer.clock)
        ok = False
        try:
            if self.spec.is_last:  # a single-stage swarm: data-parallel training (DiLoCo between the peers)
                _, loss = await self.compute.run(BACKWARD, lambda: self.trainer.forward_backward_last(
                    mb.input_ids, mb.labels, ticket))
                reply = {"loss": loss}
            else:
                pending = await self.compute.run(FORWARD, lambda: self.trainer.forward(mb.input_ids))
                meta = {"mb": ticket.mb, "n": samples, "clock": ticket.clock}
                reply, (grad_out,) = await self.forwarder.send(meta, pending.outputs, mb.labels)
                await self.compute.run(BACKWARD, lambda: self.trainer.backward(pending, grad_out, ticket))
            loss = reply.get("loss")
            loss = loss if isinstance(loss, float) and math.isfinite(loss) else None
            if loss is not None and self.spec.num_stages == 1:
                self.telemetry.on_loss(loss)
            ok = True
            self._on_trained(loss, None)
        except Exception as e:
            self.stats["lost_microbatches"] += 1
            log.warning(f"stage 0: microbatch {index} lost: {e}")
        finally:
            if not ok:
                ticket.abandoned = True
            self.window.finish()
            sem.release()

    async def evaluate(self) -> float | None:
        """Mean validation loss of the held-out microbatches, sent through the pipeline without gradients. Training is
        paused meanwhile (the evaluation holds every in-flight slot), so this stage's weights do not move under it; its
        microbatches go max_inflight at a time. In CI a step-0 evaluation interleaved with training measured 4.65
        where the untrained model scores 5.56."""
        for _ in range(self.cfg.swarm.max_inflight):
            await self._slots.acquire()
        try:
            self._first_look.set()
            if self.spec.is_last:  # a single stage evaluates on its own
                losses = [await self.compute.run(FORWARD, lambda: self.trainer.evaluate_last(mb.input_ids, mb.labels))
                          for mb in self.val_batches]
            else:
                width = asyncio.Semaphore(self.cfg.swarm.max_inflight)
                losses = await asyncio.gather(*(self._evaluate_one(i, mb, width)
                                                for i, mb in enumerate(self.val_batches)), return_exceptions=True)
                failed = [e for e in losses if isinstance(e, BaseException)]
                if failed:
                    raise failed[0]
        except Exception as e:
            log.warning(f"stage 0: evaluation incomplete: {e}")
            return None
        finally:
            for _ in range(self.cfg.swarm.max_inflight):
                self._slots.release()
        losses = [loss for loss in losses if isinstance(loss, float) and math.isfinite(loss)]
        return sum(losses) / len(losses) if losses else None

    async def _evaluate_one(self, i: int, mb: Microbatch, width: asyncio.Semaphore) -> float | None:
        async with width:
            out = await self.compute.run(FORWARD, lambda: self.trainer.forward_no_grad(mb.input_ids))
            meta = {"mb": f"{self.peer_id[-12:]}:eval{i}", "n": mb.input_ids.shape[0], "eval": True}
            reply, _ = await self.forwarder.send(meta, out, mb.labels)
            return reply.get("loss")

    async def eval_loop(self, max_steps: int, online: Callable[[], bool]) -> None:
        """Evaluate every `run.eval_interval` run steps and at the last one."""
        done = None
        try:
            while self.val_batches and online() and not self._stopping():
                clock = min(int(self.trainer.clock), max_steps)  # the run's step (a joiner starts at its stage's, not 0)
                step = due_eval_step(clock, done, self.cfg.run.eval_interval, max_steps)
                done = clock
                if step is not None:
                    loss = await self.evaluate()
                    if loss is not None:
                        self.telemetry.on_eval(step, loss)
                        print(f"[stage 0] step {step} | val loss {loss:.4f} | ppl {math.exp(min(loss, 50)):.2f}",
                              flush=True)
                    if step >= max_steps:
                        return
                self._first_look.set()
                await asyncio.sleep(0.2)
        finally:
            self._first_look.set()
