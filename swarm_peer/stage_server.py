"""What a peer answers on rpc_forward: checks, backpressure, then one microbatch through this stage.

    training, stage i : forward -> Forwarder.send(stage i+1) -> backward with the gradient it returns -> reply grad
    training, last    : forward, loss, backward                                                   -> reply grad + loss
    eval / sample     : forward without gradients (-> next stage) -> reply loss / logits

Stage 0 owns the data, so it serves only inference from token ids. A request is refused as busy (the sender
reroutes) while the peer is not online, while its queue is full and during a same-stage round.
"""
from __future__ import annotations

from typing import Callable

import torch

from swarm_peer.compute import BACKWARD, FORWARD, ComputeThread, StageTrainer
from swarm_peer.config import Config
from swarm_peer.forwarder import Forwarder
from swarm_peer.model import StageSpec
from swarm_peer.telemetry import PeerTelemetry
from swarm_peer.transport import Busy, StageServicer
from swarm_peer.validation import (RequestShape, checked_values, validate_hidden_request, validate_sample_position,
                                   validate_token_request)
from swarm_peer.window import GradientWindow


class StageServer:
    def __init__(self, cfg: Config, spec: StageSpec, trainer: StageTrainer, compute: ComputeThread,
                 window: GradientWindow, forwarder: Forwarder | None, telemetry: PeerTelemetry,
                 state: Callable[[], str], syncing: Callable[[], bool],
                 on_trained: Callable[[float | None, str | None], None], swarm_key=None):
        self.cfg, self.spec, self.trainer, self.compute, self.window = cfg, spec, trainer, compute, window
        self.forwarder, self.telemetry, self.swarm_key = forwarder, telemetry, swarm_key
        self._state, self._syncing, self._on_trained = state, syncing, on_trained
        hf = trainer.model.hf
        self.shape = RequestShape(cfg.data.microbatch_size, cfg.data.seq_len, hf.hidden_size, hf.vocab_size)

    def servicer(self) -> StageServicer:
        return StageServicer(self.handle, reply_codec=self.cfg.swarm.compression.backward,
                             request_timeout=self.cfg.swarm.request_timeout, swarm_key=self.swarm_key,
                             precheck=self.refuse_if_busy)

    def refuse_if_busy(self, meta: dict) -> None:
        """Backpressure (Busy: the sender reroutes), decided from what the peer is doing now. The servicer asks it
        from the request's metadata, before the tensors are uploaded, and `handle` again once they are (the peer may
        have started a round meanwhile)."""
        state = self._state()
        if state != "online":
            raise Busy(f"peer is {state}")
        if self.spec.is_first:  # stage 0 serves only inference requests (eval, sample)
            return
        if self.window.waiting + self.window.pending >= 2 * self.cfg.swarm.max_inflight:
            raise Busy("queue full")
        if self._syncing():
            raise Busy("synchronizing with stage peers")

    async def handle(self, meta: dict, tensors: list, remote) -> tuple[dict, list]:
        self.refuse_if_busy(meta)
        if self.spec.is_first:
            ids, labels = validate_token_request(meta, tensors, self.shape)
            return await self.handle_inference(meta, ids, labels)
        samples, hidden, labels = validate_hidden_request(meta, tensors, self.shape)
        if meta.get("eval") or "sample" in meta:
            return await self.handle_inference(meta, hidden, labels)
        await self.window.admit(samples, rejectable=True)
        ticket = self.trainer.ticket(meta["mb"], samples, meta.get("clock", -1.0))
        ok = False
        try:
            if self.spec.is_last:
                grad, loss = await self.compute.run(BACKWARD, lambda: self.trainer.forward_backward_last(
                    hidden, labels, ticket))
                self.telemetry.on_loss(loss)
                reply = {"loss": loss}
            else:
                pending = await self.compute.run(FORWARD, lambda: self.trainer.forward(hidden))
                # never forward what the next peer must refuse (it would be banned for refusing): the caller's input
                # is what made it, so the caller gets the error
                checked_values(pending.outputs.detach(), "activations this input produces")
                reply, (grad_out,) = await self.forwarder.send(meta, pending.outputs, labels)
                grad = await self.compute.run(BACKWARD, lambda: self.trainer.backward(pending, grad_out, ticket))
                loss = None
            ok = True
            self._on_trained(loss, str(remote))
            return {k: v for k, v in reply.items() if k == "loss"}, [grad.to("cpu")]
        finally:
            if not ok:  # failed, or cancelled by a caller that timed out: a queued backward must not run
                ticket.abandoned = True
            self.window.finish()

    async def handle_inference(self, meta: dict, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[dict, list]:
        """No gradients, no window: eval returns the last stage's loss, sample its logits at position `sample`."""
        validate_sample_position(meta, self.cfg.data.seq_len)
        if self.spec.is_last:
            if "sample" in meta:
                logits = await self.compute.run(FORWARD, lambda: self.trainer.forward_no_grad(hidden))
                return {}, [logits[:, meta["sample"]].float().cpu()]
            return {"loss": await self.compute.run(FORWARD, lambda: self.trainer.evaluate_last(hidden, labels))}, []
        out = await self.compute.run(FORWARD, lambda: self.trainer.forward_no_grad(hidden))
        reply, tensors = await self.forwarder.send(meta, out, labels)
        return {k: v for k, v in reply.items() if k == "loss"}, tensors
