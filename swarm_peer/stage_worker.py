"""A stage peer at work: serve rpc_forward, drive training (stage 0), route downstream, announce itself.

Flow of one microbatch (one RPC per hop carries activations forward and gradients back in its reply):

    stage 0  : next microbatch from its data shard -> forward -> call_forward(stage-1 peer) ... -> backward
    stage i  : rpc_forward(hidden, labels) -> forward -> call_forward(stage-(i+1) peer) -> backward -> reply grad
    last     : rpc_forward(hidden, labels) -> forward, loss, backward                    -> reply grad + loss

Each hop picks its next peer with the Router (stochastic wiring) and retries elsewhere on failure, so a dead peer
costs a retry of one hop, not of the whole microbatch. All of this runs on one asyncio loop; torch work goes to the
compute thread (compute.py).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict

import torch
from hivemind.utils import get_dht_time

from swarm_peer.compute import BACKWARD, FORWARD, STEP, ComputeThread, GradientWindow, StageTrainer
from swarm_peer.config import Config
from swarm_peer.data import Microbatch, ShardSampler
from swarm_peer.evaluation import due_eval_step
from swarm_peer.model import mates_fingerprint, stage_fingerprint, stage_param_shapes, stage_spec
from swarm_peer.records import Announcer, StageRecord, read_stage_records
from swarm_peer.routing import Candidate, Router
from swarm_peer.run_end import unbacked_grace, upstream_done
from swarm_peer.sync import StageSync
from swarm_peer.sync_rules import StageView, format_round, mismatched_mates, stage_peers
from swarm_peer.telemetry import PeerTelemetry, memory_report
from swarm_peer.transport import Busy, RemoteError, StageServicer, TransportError, call_forward
from swarm_peer.validation import (RequestShape, checked_values, validate_hidden_request, validate_sample_position,
                                   validate_token_request)

log = logging.getLogger("swarm_peer")
MAX_HOP_ATTEMPTS = 50  # per microbatch per hop; bounded so nothing retries forever
RECOVERY_TRIES = 5  # state downloads before a peer goes on with its own state (backoff 1, 2, 4, 8 s between)


def config_summary(cfg: Config, stage: int) -> str:
    spec = stage_spec(cfg, stage)
    m = cfg.model
    return (f"{m.name_or_path or m.family} h{m.hidden_size} L{m.num_layers} v{m.vocab_size} "
            f"layers[{spec.start}:{spec.end}] of {cfg.swarm.num_stages} stages, seq {cfg.data.seq_len}")[:200]


class StageWorker:
    def __init__(self, cfg: Config, stage: int, dht, p2p, run_id: str, subkey: bytes, device: torch.device,
                 sampler: ShardSampler | None = None, client_mode: bool = False,
                 address: str = "", val_batches: list[Microbatch] = (), metrics_period: float = 10.0,
                 swarm_key=None):
        self.cfg, self.stage, self.dht, self.p2p, self.run_id = cfg, stage, dht, p2p, run_id
        self.swarm_key = swarm_key  # private swarm: our requests carry its token, we refuse requests without
        self.spec = stage_spec(cfg, stage)
        self.compute = ComputeThread()
        self.fingerprint = stage_fingerprint(cfg, stage)
        # the averager process first (forked before the model exists, it shares no page the trainer writes later)
        self.sync = StageSync(cfg, stage, dht, run_id, stage_param_shapes(cfg, stage), self.compute, self.fingerprint,
                              swarm_key)
        self.trainer = StageTrainer(cfg, stage, device)
        self.sync.attach(self.trainer)
        self.sampler = sampler
        self.client_mode = client_mode
        self.peer_id = str(dht.peer_id)
        self.mates_fingerprint = mates_fingerprint(cfg, stage)
        self.next_fingerprint = stage_fingerprint(cfg, stage + 1) if not self.spec.is_last else None
        self.announcer = Announcer(dht, run_id, subkey, cfg.swarm.record_ttl)
        self.router = Router(cfg.data.microbatch_size, max_timeout=cfg.swarm.request_timeout)
        self._sync_waiters: list[asyncio.Future] = []  # callers waiting for a round run by the stepper
        self.address, self.val_batches = address[:256], list(val_batches)
        self.checkpoint_dir: str | None = None  # set by the CLI (--checkpoint-dir)
        self.resumed_from: dict | None = None
        self._last_checkpoint = time.monotonic()
        self.checkpoint_times: list[dict] = []  # per checkpoint: compute paused, total, bytes (the summary's)
        self.telemetry = PeerTelemetry(self, metrics_period)
        self._recover_wanted = False
        self._retry_recovery_at, self._recovery_backoff = 0, 1  # after giving up: try again 1, 2, 4 ... 16 rounds later
        self._recovering = asyncio.Lock()
        self.window: GradientWindow | None = None  # created on the loop
        self.state = "online"
        self.stop_event: asyncio.Event | None = None
        self.warned_peers: set[str] = set()
        self.seen_upstream = False
        self.upstream_online = 0
        self.upstream_ended = False  # the previous stage's records say it is done (idle/finished/offline)
        self.upstream_seen_at = time.monotonic()  # last time any record of the previous stage was visible
        self.upstream_ended_at: float | None = None  # first sight of an upstream peer that ended (run_end.py)
        self.upstream_heard_at: float | None = None  # the last training microbatch from upstream
        self.downstream_seen_at = time.monotonic()  # last time a usable next-stage peer was visible
        self.stats = defaultdict(int)
        self.loss_curve: list[list[float]] = []  # [inner step, mean loss of the microbatches of that step]
        self._step_losses: list[float] = []
        self.started = time.monotonic()
        self._last_wait_log = 0.0

    # ------------------------------------------------------------------------------------------ record
    def record(self) -> StageRecord:
        w = self.window
        return StageRecord(
            peer_id=self.peer_id, stage=self.stage, fingerprint=self.fingerprint, mates_fingerprint=self.mates_fingerprint,
            config_summary=config_summary(self.cfg, self.stage), state=self.state, client_mode=self.client_mode,
            queue=(w.waiting if w else 0) + self.compute.pending(), inflight=w.pending if w else 0,
            max_inflight=self.cfg.swarm.max_inflight, throughput=float(self.trainer.throughput),
            inner_step=self.trainer.inner_step, samples=self.trainer.samples_stepped, clock=float(min(self.trainer.clock, 2**31)),
            round=self.sync.progress.round, round_steps=self.sync.progress.round_steps,
            round_samples=self.sync.progress.round_samples, syncing=self.sync.progress.syncing,
            global_hash=self.sync.progress.global_hash, round_ok=self.sync.progress.round_ok, address=self.address)

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def announce_loop(self) -> None:
        while self.state in ("online", "idle"):
            try:
                await self._in_thread(self.announcer.publish, self.record())
            except Exception as e:
                log.warning(f"could not announce stage {self.stage}: {e}")
            await asyncio.sleep(self.cfg.swarm.announce_period)

    async def discover_loop(self) -> None:
        """Refresh the next stage's candidates (routing) and the previous stage's liveness (end of run)."""
        while self.state in ("online", "idle"):
            if not self.spec.is_last:
                peers = await self._in_thread(read_stage_records, self.dht, self.run_id, self.stage + 1)
                live = [self._candidate(p.record) for p in peers if self._usable(p.record)]
                self.router.update(live)
                if live:
                    self.downstream_seen_at = time.monotonic()
            if not self.spec.is_first:
                peers = await self._in_thread(read_stage_records, self.dht, self.run_id, self.stage - 1)
                self.upstream_online = sum(p.record.state == "online" for p in peers)
                now = time.monotonic()
                if self.upstream_online < len(peers) and self.upstream_ended_at is None:
                    self.upstream_ended_at = now
                self.upstream_ended = bool(peers) and upstream_done(
                    self.upstream_online, self.upstream_ended_at, self.upstream_heard_at, now,
                    unbacked_grace(self.cfg.swarm.upstream_timeout))
                if peers:
                    self.upstream_seen_at = time.monotonic()
                # a finished record counts as seen: a short run upstream may end between two of our looks
                self.seen_upstream |= bool(peers) or self.stats["microbatches"] > 0
            await asyncio.sleep(min(1.0, self.cfg.swarm.announce_period))

    def _usable(self, rec: StageRecord) -> bool:
        if rec.state != "online" or rec.client_mode:
            return False
        if rec.fingerprint != self.next_fingerprint:
            if rec.peer_id not in self.warned_peers:
                self.warned_peers.add(rec.peer_id)
                log.warning(f"ignoring stage {rec.stage} peer {rec.peer_id[-8:]}: config fingerprint mismatch "
                            f"(theirs: {rec.config_summary}; ours: {config_summary(self.cfg, rec.stage)})")
            return False
        return True

    @staticmethod
    def _candidate(rec: StageRecord) -> Candidate:
        return Candidate(rec.peer_id, rec.queue, rec.inflight, rec.max_inflight, rec.throughput, rec.syncing)

    # ------------------------------------------------------------------------------- same-stage sync glue
    def _refresh_stage(self) -> StageView:
        """Blocking: re-read this stage's records; what sync.py decides from (one StageView, handed over whole)."""
        peers = [p for p in read_stage_records(self.dht, self.run_id, self.stage) if self.sync.trusts(p.peer_id)]
        # a record not refreshed for a few announce periods belongs to a peer that is gone (killed, cut off): do not
        # wait for it in rounds until its record expires (swarm.record_ttl), which would stall the stage that long
        sw = self.cfg.swarm
        stale_after = min(max(4 * sw.announce_period, 6.0), sw.record_ttl)
        now = get_dht_time()
        fresh = [p.record for p in peers if now - (p.expires_at - sw.record_ttl) <= stale_after]
        stale = [p.record for p in peers if now - (p.expires_at - sw.record_ttl) > stale_after]
        view = StageView(
            others=tuple(stage_peers(self.peer_id, fresh, self.mates_fingerprint)),
            silent=tuple(stage_peers(self.peer_id, stale, self.mates_fingerprint)),
            departed=tuple(r for r in fresh if r.peer_id != self.peer_id and r.state in ("finished", "offline")
                           and r.mates_fingerprint == self.mates_fingerprint))
        self.sync.see(view)
        for rec in mismatched_mates(self.peer_id, fresh, self.fingerprint, self.mates_fingerprint):
            if rec.peer_id not in self.warned_peers:
                self.warned_peers.add(rec.peer_id)
                log.warning(f"ignoring stage {self.stage} peer {rec.peer_id[-8:]} in rounds: its training settings "
                            f"differ from ours (sync mode, optimizer, batch, seed, data or averaging codec; "
                            f"model.MATES_SETTINGS): it is never averaged with")
        return view

    async def _publish_now(self) -> None:
        try:
            await self._in_thread(self.announcer.publish, self.record())
        except Exception as e:
            log.warning(f"could not announce stage {self.stage}: {e}")

    async def sync_watch_loop(self) -> None:
        """Close the window when a round is due (someone started it) or this peer's weights must be recovered; the
        stepper acts once in-flight microbatches drain."""
        while self.state in ("online", "idle"):
            await self._in_thread(self._refresh_stage)
            if not self.sync.progress.syncing and (self.sync.due() or self._disagrees()):
                self.window.close()
            await asyncio.sleep(max(0.5, self.cfg.swarm.announce_period / 2))

    async def _round(self) -> None:
        self.window.close()  # queued requests get "busy" now instead of timing out during the round
        metrics = await self.sync.run_round(0, self._refresh_stage, self._publish_now)
        if metrics is None:
            self._recover_wanted = True
            return
        print(f"[stage {self.stage}] {format_round(metrics)}", flush=True)

    async def finish_with_stage(self) -> None:
        """Done training: stay in the stage's rounds (idle) until none of its peers trains any more, then run a final
        round if any work is unmerged (DiLoCo). So every peer of a stage ends on the same global model."""
        self.state, self.sync.training = "idle", False
        await self._publish_now()
        deadline = time.monotonic() + self.cfg.swarm.finish_timeout
        while time.monotonic() < deadline and not self.stop_event.is_set():
            await self._in_thread(self._refresh_stage)
            if not any(o.state == "online" for o in self.sync.others):
                # sync mode: every step had its round (a mate's partial last window it stepped alone: we recover it)
                if self.sync.mode == "sync" or not self.sync.unmerged_work():
                    return await self._linger_for_laggards()
                try:
                    await asyncio.wait_for(self.request_round(), 3 * self.cfg.swarm.averaging_timeout)
                except asyncio.TimeoutError:
                    log.warning(f"stage {self.stage}: the final round did not complete; leaving")
                    return
                continue
            await asyncio.sleep(0.5)
        log.warning(f"stage {self.stage}: stage peers still training after {self.cfg.swarm.finish_timeout:g}s; leaving")

    async def _linger_for_laggards(self) -> None:
        """Before leaving, end on the stage's model (bounded): a stage peer whose end of the last all-reduce failed
        (e.g. our reply stream was cut) recovers from us, so we keep serving our state until it has; if our own end
        failed, we recover from a mate that completed it."""
        deadline = time.monotonic() + self.cfg.swarm.averaging_timeout + 2 * self.cfg.swarm.record_ttl
        while time.monotonic() < deadline and not self.stop_event.is_set():
            if self._disagrees():
                await self._recover(behind=False)
            if not any(self._waits_for(o) for o in self.sync.others):
                return
            await asyncio.sleep(0.5)
            await self._in_thread(self._refresh_stage)

    def _waits_for(self, other: StageRecord) -> bool:
        mine = self.sync.progress
        if mine.round_ok:  # we can serve the stage's model: laggards recover from us
            return other.round < mine.round or (other.round == mine.round and not other.round_ok)
        return other.round < mine.round and other.round_ok  # it may complete the round we failed: then we recover

    def _disagrees(self) -> bool:
        """Our weights differ from the stage majority's and it is time to try recovering (not soon after giving up)."""
        return bool(self.sync.donors()) and self.sync.progress.round >= self._retry_recovery_at

    async def _recover(self, behind: bool) -> bool:
        """Download the stage's state (we are behind it, or our weights disagree with its majority), retrying with
        backoff while donors fail or none is visible; then go on with this peer's own state, not voting
        (round_ok false), rather than never step again."""
        async with self._recovering:  # the stepper and the end of the run may both want it
            return await self._recover_once(behind)

    async def _recover_once(self, behind: bool) -> bool:
        reason = "behind the stage" if behind else "weights disagree"
        for attempt in range(RECOVERY_TRIES):
            if behind and attempt and not any(o.round > self.sync.progress.round and o.round_ok for o in self.sync.others):
                behind = False  # the peers ahead are gone or were not believed (an unbacked claim)
            donors = self.sync.donors() or (self.sync.top_peers() if behind else [])
            if not donors and not behind:
                return True  # the disagreement resolved itself (e.g. the majority moved to our hash)
            if donors and await self.sync.recover(donors, reason, self._refresh_stage):
                self._recovery_backoff = 1
                return True
            if self.stop_event.is_set():
                return False
            await asyncio.sleep(min(2.0 ** attempt, 8.0))
            await self._in_thread(self._refresh_stage)
        log.warning(f"stage {self.stage}: no stage peer could serve the stage state ({reason}) after "
                    f"{RECOVERY_TRIES} tries; continuing on this peer's own weights, not voting until a round agrees")
        top = max((o.round for o in self.sync.others if o.round_ok), default=self.sync.progress.round)
        self.sync.progress.round = max(self.sync.progress.round, top)  # take part in the stage's rounds again
        self.sync.progress.round_ok = False
        # next try: some rounds later (each try costs its backoff), not at every step
        self._retry_recovery_at = self.sync.progress.round + self._recovery_backoff
        self._recovery_backoff = min(2 * self._recovery_backoff, 16)
        await self._publish_now()
        return False

    async def save_checkpoint(self, reason: str) -> None:
        """Atomic checkpoint of this peer's state (captured on the compute thread, written in another)."""
        from swarm_peer.checkpoint import capture, checkpoint_path, commit, write_payload

        self._last_checkpoint = time.monotonic()
        try:
            path = checkpoint_path(self.checkpoint_dir, self.stage)
            t0 = time.monotonic()

            def write():  # on the compute thread: nothing changes the state while it is serialized
                state = capture(self)
                return state["inner_step"], state["progress"]["round"], write_payload(path, state)
            inner_step, rnd, (tmp, nbytes) = await self.compute.run(STEP, write)
            paused = time.monotonic() - t0
            await self._in_thread(commit, tmp, path)
            self.checkpoint_times.append({"paused_s": paused, "total_s": time.monotonic() - t0, "bytes": nbytes})
            log.info(f"checkpoint ({reason}): inner step {inner_step}, round {rnd}, {nbytes / 2**20:.1f} MiB -> "
                     f"{path} (compute paused {paused:.2f}s)")
        except Exception as e:
            log.warning(f"checkpoint ({reason}) failed: {e}")

    async def request_round(self) -> None:
        """Ask the stepper for a round now (end of run) and wait until it has run it."""
        future = asyncio.get_running_loop().create_future()
        self._sync_waiters.append(future)
        self.window.close()
        await future

    # -------------------------------------------------------------------------------------- downstream
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
            except Busy:  # backpressure, not a fault: back off a little and draw again
                self.router.failed(peer, ban=False)
                self.stats["busy_replies"] += 1
                await asyncio.sleep(busy_wait)
                busy_wait = min(0.5, busy_wait * 1.5)
                continue
            except RemoteError as e:
                self.router.failed(peer, ban=True)
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
            if not meta.get("eval") and "sample" not in meta:
                self.telemetry.on_delivered(peer)
            return reply, out
        raise RuntimeError(f"no stage {self.stage + 1} peer took the microbatch ({failures} failures)")

    # ----------------------------------------------------------------------------------------- serving
    def _shape(self) -> RequestShape:
        hf = self.trainer.model.hf
        return RequestShape(self.cfg.data.microbatch_size, self.cfg.data.seq_len, hf.hidden_size, hf.vocab_size)

    async def handle(self, meta: dict, tensors: list, remote) -> tuple[dict, list]:
        if self.state != "online":
            raise Busy(f"peer is {self.state}")
        if self.spec.is_first:  # stage 0 owns the data: it serves only inference (eval / sample) from token ids
            ids, labels = validate_token_request(meta, tensors, self._shape())
            return await self._handle_eval(meta, ids, labels)
        samples, hidden, labels = validate_hidden_request(meta, tensors, self._shape())
        if self.window.waiting + self.window.pending >= 2 * self.cfg.swarm.max_inflight:
            raise Busy("queue full")  # backpressure: the sender reroutes
        if self.sync.progress.syncing:
            raise Busy("synchronizing with stage peers")
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
            self.telemetry.on_received(str(remote))
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
        """Stage 0: evaluate every `run.eval_interval` run steps and at the last one."""
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

    # ----------------------------------------------------------------------------------------- driving
    async def stepper(self) -> None:
        """Whenever the window is closed and drained: [sync mode: average gradients], inner step, [diloco: an outer
        round when due or asked for], [recover the stage's state if ours disagrees], then reopen the window."""
        while True:
            await self.window.wait_full()
            completed = await self.compute.run(STEP, self.trainer.seal)  # exactly the samples in p.grad
            if self.sync.clock_pending:  # joined (or recovered) meanwhile: step at the stage's run clock of now
                await self._in_thread(self._refresh_stage)
                self.sync.catch_up_clock()
            averaged = None
            if self.sync.mode == "sync" and self.sync.training and (completed > 0 or self.sync.others):
                self.window.close()  # queued requests get "busy" now instead of timing out during the round
                averaged = await self.sync.run_round(completed, self._refresh_stage, self._publish_now)
                self._recover_wanted |= averaged is None
            if averaged is not None or not self._recover_wanted:
                try:
                    await self.compute.run(STEP, lambda: self.trainer.step(
                        grads_are_mean=averaged is not None, clock=averaged["clock"] if averaged else None))
                except ValueError as e:
                    log.warning(f"stage {self.stage}: {e}")
                if completed > 0:
                    self.sync.stepped(completed)
            if averaged is not None:
                await self.sync.end_sync_round(averaged, self._publish_now)
            if self._step_losses:
                self.loss_curve.append([self.trainer.inner_step, sum(self._step_losses) / len(self._step_losses)])
                self._step_losses = []
            if completed > 0 and self.sync.due(lookahead=1):  # nearly due: tell the stage, look again
                await self._publish_now()
                await self._in_thread(self._refresh_stage)
            waiters, self._sync_waiters = self._sync_waiters, []
            if self.sync.mode == "diloco" and not self.stop_event.is_set() and (
                    self.sync.due() or (waiters and self.sync.unmerged_work())):
                await self._round()
            if self._disagrees() or self._recover_wanted:
                await self._recover(behind=self._recover_wanted)
                self._recover_wanted = False
            if self.checkpoint_dir and time.monotonic() - self._last_checkpoint >= self.cfg.run.checkpoint_interval:
                await self.save_checkpoint("periodic")
            for future in waiters:
                if not future.done():
                    future.set_result(None)
            self.window.reopen()
            if self._sync_waiters:  # asked for during this iteration: close again (nothing admitted: no step)
                self.window.close()

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
                reply, (grad_out,) = await self.send_downstream(meta, pending.outputs, mb.labels)
                await self.compute.run(BACKWARD, lambda: self.trainer.backward(pending, grad_out, ticket))
            if isinstance(reply.get("loss"), float) and math.isfinite(reply["loss"]):
                self._step_losses.append(reply["loss"])
                if self.spec.num_stages == 1:
                    self.telemetry.on_loss(reply["loss"])
            ok = True
            self.stats["microbatches"] += 1
            self.upstream_heard_at = time.monotonic()
        except Exception as e:
            self.stats["lost_microbatches"] += 1
            log.warning(f"stage 0: microbatch {index} lost: {e}")
        finally:
            if not ok:
                ticket.abandoned = True
            self.window.finish()
            sem.release()

    async def drive(self, max_steps: int) -> None:
        """Stage 0: feed microbatches until the run clock reaches `max_steps` (a joiner ends with its stage)."""
        sem = asyncio.Semaphore(self.cfg.swarm.max_inflight)
        index, tasks = 0, set()
        while self.trainer.clock < max_steps and not self.stop_event.is_set():
            silent = time.monotonic() - self.downstream_seen_at
            if not self.spec.is_last and silent > self.cfg.swarm.upstream_timeout:  # mirrors the later stages' wait for a vanished upstream
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

    async def serve_until_upstream_done(self, idle_grace: float = 1.0) -> None:
        """Non-first stages: serve until the previous stage has been seen and its records say it is done. A stage
        that vanishes without a word (a network cut on either side, or all its peers crashed) is waited for
        `swarm.upstream_timeout` seconds: a cut-off peer that is reconnected in time rejoins its stage."""
        idle_since = None
        while not self.stop_event.is_set():
            await asyncio.sleep(0.25)
            silent = time.monotonic() - self.upstream_seen_at
            if self.seen_upstream and silent > self.cfg.swarm.upstream_timeout:
                log.warning(f"stage {self.stage}: no peer of stage {self.stage - 1} visible for {silent:.0f}s "
                            f"(network cut, or that stage is gone); leaving")
                self.stats["upstream_lost"] = 1
                break
            done = self.seen_upstream and self.upstream_ended
            busy = self.window.pending or self.window.waiting
            if done and not busy:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= idle_grace:
                    if self.upstream_online:
                        log.warning(f"stage {self.stage}: {self.upstream_online} stage-{self.stage - 1} record(s) still "
                                    f"say online, but no microbatch came for "
                                    f"{unbacked_grace(self.cfg.swarm.upstream_timeout):.0f}s after its other peers "
                                    f"ended (stalled, or claims no peer backs); leaving")
                    break
            else:
                idle_since = None
        if self.window.close_partial():  # step what was accumulated: it is real gradient on real data
            # ... and stay "online" until that step (and in sync mode its round) is done, so stage mates that are
            # finished wait for it in their rounds instead of leaving this peer to step alone
            deadline = time.monotonic() + 2 * self.cfg.swarm.averaging_timeout
            while not self.window.is_open and time.monotonic() < deadline and not self.stop_event.is_set():
                await asyncio.sleep(0.1)  # the stepper reopens the window when it is done

    def servicer(self) -> StageServicer:
        return StageServicer(self.handle, reply_codec=self.cfg.swarm.compression.backward,
                             request_timeout=self.cfg.swarm.request_timeout, swarm_key=self.swarm_key)

    # ------------------------------------------------------------------------------------------ lifecycle
    async def main(self, max_steps: int) -> None:
        self.stop_event = asyncio.Event()
        self.window = GradientWindow(self.cfg.data.batch_size)
        loops = [self.announce_loop(), self.discover_loop(), self.stepper(), self.telemetry.progress_loop(),
                 self.telemetry.publish_loop()]
        if self.sync.mode != "none":
            loops.append(self.sync_watch_loop())
        background = [asyncio.create_task(c) for c in loops]
        self.started = time.monotonic()
        try:
            if self.spec.is_first:
                evaluating = asyncio.create_task(self.eval_loop(max_steps))
                await self.drive(max_steps)
                if not self.stop_event.is_set() and not self.stats["downstream_lost"]:  # the last evaluation (at
                    # max_steps) may still be running
                    await asyncio.wait([evaluating], timeout=max(60.0, 2 * self.cfg.swarm.request_timeout))
                evaluating.cancel()
            else:
                await self.serve_until_upstream_done()
                for _ in range(600):  # let the stepper apply a partial last window (bounded: 60 s)
                    if self.window.admitted == 0:
                        break
                    await asyncio.sleep(0.1)
            if self.sync.mode != "none" and not self.stop_event.is_set():
                await self.finish_with_stage()
        finally:
            self.wall = time.monotonic() - self.started
            self.state = "offline" if self.stop_event.is_set() else "finished"
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            try:
                await asyncio.wait_for(self._in_thread(self.announcer.publish, self.record()), 10)
            except Exception as e:
                log.warning(f"could not publish final record: {e}")

    def summary(self) -> dict:
        from swarm_peer.transport import STATS

        tokens = self.trainer.samples_stepped * self.cfg.data.seq_len
        wall = getattr(self, "wall", time.monotonic() - self.started)
        return {
            "kind": "peer", "stage": self.stage, "num_stages": self.spec.num_stages, "peer_id": self.peer_id,
            "layers": [self.spec.start, self.spec.end], "state": self.state,
            "inner_steps": self.trainer.inner_step, "clock": self.trainer.clock, "samples": self.trainer.samples_stepped, "tokens": tokens,
            "microbatches": self.stats["microbatches"], "lost_microbatches": self.stats["lost_microbatches"],
            "retries": self.stats["retries"], "busy_replies": self.stats["busy_replies"],
            "upstream_lost": bool(self.stats["upstream_lost"]),
            "downstream_lost": bool(self.stats["downstream_lost"]), "memory": memory_report(self),
            "abandoned_backwards": self.trainer.abandoned, "ledger": self.trainer.ledger,
            "loss_curve": self.loss_curve, "tokens_per_s": tokens / max(wall, 1e-6), "wall_time_s": wall,
            "compute_time_s": self.trainer.compute_seconds,
            "forwarded_to": self.router.sent_counts(), "checkpoints": self.checkpoint_times, "transport": STATS.snapshot(),
            "final_weights_hash": self.trainer.weights_hash(), "fingerprint": self.fingerprint,
            "sync": self.sync.summary(), "eval_curve": self.telemetry.eval_curve, "resumed_from": self.resumed_from,
            "config": self.cfg.model_dump(mode="json"),
        }


def _reply_ok(meta: dict, out: list, hidden: torch.Tensor, vocab: int) -> bool:
    """The reply a request of this kind must get: a gradient like `hidden`, nothing (eval) or logits (sample)."""
    if "sample" in meta:
        return len(out) == 1 and tuple(out[0].shape) == (hidden.shape[0], vocab) and out[0].is_floating_point()
    if meta.get("eval"):
        return not out
    return len(out) == 1 and out[0].shape == hidden.shape and out[0].is_floating_point()
