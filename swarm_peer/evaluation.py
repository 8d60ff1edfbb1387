"""Stage 0's validation passes: the held-out microbatches through the live pipeline without gradients, every
`run.eval_interval` run steps, at step 0 of a fresh run and at the last step; mixed into StageWorker."""
from __future__ import annotations

import asyncio
import logging
import math

from swarm_peer.compute import FORWARD

log = logging.getLogger("swarm_peer")


def due_eval_step(step: int, done: int | None, every: int, max_steps: int) -> int | None:
    """The step to evaluate now (None: none due). `done`: the run step last looked at (None before the first look:
    a fresh run evaluates step 0, a joiner nothing it downloaded). The step is the interval crossed, not the clock
    (a round may have moved it past): every peer's evaluation of it carries the same step."""
    if done is None:
        return 0 if step == 0 else None
    if step == done or not ((every and step // every > done // every) or step >= max_steps):
        return None
    return step if step >= max_steps else step // every * every


class StageEvaluation:
    async def evaluate(self) -> float | None:
        """Stage 0: send the held-out microbatches through the pipeline without gradients; mean validation loss."""
        losses = []
        for i, mb in enumerate(self.val_batches):
            if self.spec.is_last:  # a single stage evaluates on its own
                losses.append(await self.compute.run(FORWARD, lambda: self.trainer.evaluate_last(mb.input_ids, mb.labels)))
                continue
            out = await self.compute.run(FORWARD, lambda: self.trainer.forward_no_grad(mb.input_ids))
            meta = {"mb": f"{self.peer_id[-12:]}:eval{i}", "n": mb.input_ids.shape[0], "eval": True}
            try:
                reply, _ = await self.send_downstream(meta, out, mb.labels)
            except Exception as e:
                log.warning(f"stage 0: evaluation incomplete: {e}")
                return None
            if isinstance(reply.get("loss"), float) and math.isfinite(reply["loss"]):
                losses.append(reply["loss"])
        return sum(losses) / len(losses) if losses else None

    async def eval_loop(self, max_steps: int) -> None:
        """Stage 0: evaluate every `run.eval_interval` run steps, at step 0 of a fresh run and at the last step."""
        done = None
        while self.val_batches and self.state == "online" and not self.stop_event.is_set():
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
