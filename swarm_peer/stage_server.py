"""A stage peer's data plane: the rpc_forward handler (validate, admit, forward/backward, reply) and the hop to
the next stage (router choice, retries elsewhere, bans), mixed into StageWorker (stage_worker.py)."""
from __future__ import annotations

import asyncio
import logging
import time

import torch

from swarm_peer.compute import BACKWARD, FORWARD
from swarm_peer.transport import RemoteError, StageServicer, TransportError, call_forward
from swarm_peer.validation import (RequestShape, checked_values, validate_hidden_request, validate_sample_position,
                                   validate_token_request)

log = logging.getLogger("swarm_peer")
MAX_HOP_ATTEMPTS = 50  # per microbatch per hop; bounded so nothing retries forever


class StageServing:
    def _shape(self) -> RequestShape:
        hf = self.trainer.model.hf
        return RequestShape(self.cfg.data.microbatch_size, self.cfg.data.seq_len, hf.hidden_size, hf.vocab_size)

    async def handle(self, meta: dict, tensors: list, remote) -> tuple[dict, list]:
        if self.state != "online":
            raise RuntimeError(f"busy: peer is {self.state}")
        if self.spec.is_first:  # stage 0 owns the data: it serves only inference (eval / sample) from token ids
            ids, labels = validate_token_request(meta, tensors, self._shape())
            return await self._handle_eval(meta, ids, labels)
        samples, hidden, labels = validate_hidden_request(meta, tensors, self._shape())
        if self.window.waiting + self.window.pending >= 2 * self.cfg.swarm.max_inflight:
            raise RuntimeError("busy: queue full")  # backpressure: the sender reroutes
        if self.sync.progress.syncing:
            raise RuntimeError("busy: synchronizing with stage peers")
        if meta.get("eval") or "sample" in meta:
            return await self._handle_eval(meta, hidden, labels)
        await self.window.admit(samples, rejectable=True)
        ticket = self.trainer.ticket(meta["mb"], samples, meta.get("clock", -1.0))
        ok = False
        try:
            if self.spec.is_last:
                grad, loss = await self.compute.run(BACKWARD, lambda: self.trainer.forward_backward_last(
                    hidden, labels, ticket))
                self._step_losses.append(loss)
                self.telemetry.on_loss(loss)
                reply = {"loss": loss}
            else:
                pending = await self.compute.run(FORWARD, lambda: self.trainer.forward(hidden))
                # never forward what the next peer must refuse (it would be banned for refusing): the caller's input
                # is what made it, so the caller gets the error
                checked_values(pending.outputs.detach(), "activations this input produces")
                reply, (grad_out,) = await self.send_downstream(meta, pending.outputs, labels)
                grad = await self.compute.run(BACKWARD, lambda: self.trainer.backward(pending, grad_out, ticket))
            ok = True
            self.stats["microbatches"] += 1
            self.upstream_heard_at = time.monotonic()
            return {k: v for k, v in reply.items() if k == "loss"}, [grad.to("cpu")]
        finally:
            if not ok:  # failed, or cancelled by a caller that timed out: a queued backward must not run
                ticket.abandoned = True
            self.window.finish()

    async def _handle_eval(self, meta: dict, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[dict, list]:
        """No gradients, no window: eval returns the last stage's loss, sample its logits at position `sample`."""
        validate_sample_position(meta, self.cfg.data.seq_len)
        if self.spec.is_last:
            if "sample" in meta:
                logits = await self.compute.run(FORWARD, lambda: self.trainer.forward_no_grad(hidden))
                return {}, [logits[:, meta["sample"]].float().cpu()]
            return {"loss": await self.compute.run(FORWARD, lambda: self.trainer.evaluate_last(hidden, labels))}, []
        out = await self.compute.run(FORWARD, lambda: self.trainer.forward_no_grad(hidden))
        reply, tensors = await self.send_downstream(meta, out, labels)
        return {k: v for k, v in reply.items() if k == "loss"}, tensors

    def servicer(self) -> StageServicer:
        return StageServicer(self.handle, reply_codec=self.cfg.swarm.compression.backward,
                             request_timeout=self.cfg.swarm.request_timeout, swarm_key=self.swarm_key)

    async def send_downstream(self, meta: dict, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[dict, list]:
        """Send one microbatch to a next-stage peer chosen by the router; retry elsewhere until one answers."""
        from hivemind.p2p import PeerID

        tensors = [hidden.detach().to("cpu"), labels.to("cpu", torch.int32)]
        failures, busy_wait = 0, 0.02
        deadline = time.monotonic() + 10 * self.cfg.swarm.request_timeout
        while failures < MAX_HOP_ATTEMPTS and time.monotonic() < deadline:
            if self.stop_event.is_set():
                raise RuntimeError("peer is shutting down")
            peer = self.router.choose()
            if peer is None and time.monotonic() - self.downstream_seen_at > self.cfg.swarm.upstream_timeout:
                raise RuntimeError(f"no stage {self.stage + 1} peer visible for swarm.upstream_timeout")
            if peer is None:
                now = time.monotonic()
                if now - self._last_wait_log > 10:
                    log.warning(f"stage {self.stage + 1} has no live peers; waiting")
                    self._last_wait_log = now
                await asyncio.sleep(0.5)
                continue
            self.router.started(peer)
            t0 = time.monotonic()
            try:
                reply, out = await call_forward(self.p2p, PeerID.from_base58(peer), meta, tensors,
                                                self.cfg.swarm.compression.forward, self.router.timeout(peer),
                                                namespace=self.run_id, swarm_key=self.swarm_key)
                if not _reply_ok(meta, out, hidden, self.trainer.model.hf.vocab_size):
                    raise RemoteError(f"malformed reply {[tuple(t.shape) for t in out]}")
                out = [checked_values(t, "reply values") if t.is_floating_point() else t for t in out]
            except ValueError as e:  # bad values from that peer: it is the one banned
                self.router.failed(peer, ban=True)
                failures += 1
                self.stats["retries"] += 1
                log.warning(f"stage {self.stage + 1} peer {peer[-8:]} sent a bad reply ({e}); banned, rerouting")
                continue
            except RemoteError as e:
                busy = str(e).startswith("busy")
                self.router.failed(peer, ban=not busy)
                if busy:  # backpressure, not a fault: back off a little and draw again
                    self.stats["busy_replies"] += 1
                    await asyncio.sleep(busy_wait)
                    busy_wait = min(0.5, busy_wait * 1.5)
                    continue
                failures += 1
                self.stats["retries"] += 1
                log.warning(f"stage {self.stage + 1} peer {peer[-8:]} rejected microbatch: {e}")
                continue
            except TransportError as e:
                ban = self.router.failed(peer)
                failures += 1
                self.stats["retries"] += 1
                log.warning(f"stage {self.stage + 1} peer {peer[-8:]} failed ({e}); banned {ban:.0f}s, rerouting")
                continue
            self.router.succeeded(peer, time.monotonic() - t0)
            return reply, out
        raise RuntimeError(f"no stage {self.stage + 1} peer took the microbatch ({failures} failures)")


def _reply_ok(meta: dict, out: list, hidden: torch.Tensor, vocab: int) -> bool:
    """The reply a request of this kind must get: a gradient like `hidden`, nothing (eval) or logits (sample)."""
    if "sample" in meta:
        return len(out) == 1 and tuple(out[0].shape) == (hidden.shape[0], vocab) and out[0].is_floating_point()
    if meta.get("eval"):
        return not out
    return len(out) == 1 and out[0].shape == hidden.shape and out[0].is_floating_point()
