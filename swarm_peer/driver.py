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

    async def drive(self, max_steps: int) -> None:
        """Feed microbatches until the run clock reaches `max_steps` (a joiner ends with its stage)."""
        sem = asyncio.Semaphore(self.cfg.swarm.max_inflight)
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
        """Send the held-out microbatches through the pipeline without gradients; mean validation loss."""
        losses = []
        for i, mb in enumerate(self.val_batches):
            if self.spec.is_last:  # a single stage evaluates on its own
                losses.append(await self.compute.run(FORWARD, lambda: self.trainer.evaluate_last(mb.input_ids, mb.labels)))
                continue
            out = await self.compute.run(FORWARD, lambda: self.trainer.forward_no_grad(mb.input_ids))
            meta = {"mb": f"{self.peer_id[-12:]}:eval{i}", "n": mb.input_ids.shape[0], "eval": True}
            try:
                reply, _ = await self.forwarder.send(meta, out, mb.labels)
            except Exception as e:
                log.warning(f"stage 0: evaluation incomplete: {e}")
                return None
            if isinstance(reply.get("loss"), float) and math.isfinite(reply["loss"]):
                losses.append(reply["loss"])
        return sum(losses) / len(losses) if losses else None

    async def eval_loop(self, max_steps: int, online: Callable[[], bool]) -> None:
        """Evaluate every `run.eval_interval` run steps and at the last one."""
        done = None
        while self.val_batches and online() and not self._stopping():
            clock = min(int(self.trainer.clock), max_steps)  # the run's step (a joiner starts at its stage's, not 0)
            step = due_eval_step(clock, done, self.cfg.run.eval_interval, max_steps)
            done = clock
            if step is not None:
                loss = await self.evaluate()
                if loss is not None:
                    self.telemetry.on_eval(step, loss)
                    print(f"[stage 0] step {step} | val loss {loss:.4f} | ppl {math.exp(min(loss, 50)):.2f}", flush=True)
                if step >= max_steps:
                    return
            await asyncio.sleep(0.2)
