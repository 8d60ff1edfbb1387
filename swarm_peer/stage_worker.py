"""A stage peer: the composition root of its parts, and its announcements.

    Forwarder (forwarder.py)      next-stage records -> routing.Router; sends a microbatch there, retrying elsewhere
    StageServer (stage_server.py) rpc_forward: checks, backpressure, forward -> next hop -> backward, inference
    Driver (driver.py)            stage 0: its data shard through the pipeline, evaluation
    Stepper (stepper.py)          window drained -> [sync round] -> inner step -> [outer round] -> [recover] -> reopen
    StageSync (sync.py)           same-stage rounds, state downloads (its averager process)

This module announces the peer's record, watches the previous stage's liveness (the end of the run), reads its own
stage's records into the StageView the sync decides from, checkpoints, and runs the parts until the run ends. All of
it runs on one asyncio loop; torch work goes to the compute thread (compute.py).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

import torch
from hivemind.utils import get_dht_time

from swarm_peer.compute import STEP, ComputeThread, StageTrainer
from swarm_peer.config import Config
from swarm_peer.data import Microbatch, ShardSampler
from swarm_peer.driver import Driver
from swarm_peer.forwarder import Forwarder
from swarm_peer.model import config_summary, mates_fingerprint, stage_fingerprint, stage_param_shapes, stage_spec
from swarm_peer.records import Announcer, StageRecord, read_stage_records
from swarm_peer.run_end import unbacked_grace, upstream_done
from swarm_peer.stage_server import StageServer
from swarm_peer.stepper import Phase, Stepper
from swarm_peer.sync import StageSync
from swarm_peer.sync_rules import StageView, mismatched_mates, stage_peers
from swarm_peer.telemetry import PeerTelemetry, memory_report
from swarm_peer.transport import StageServicer
from swarm_peer.window import GradientWindow

log = logging.getLogger("swarm_peer")


class StageWorker:
    def __init__(self, cfg: Config, stage: int, dht, p2p, run_id: str, subkey: bytes, device: torch.device,
                 sampler: ShardSampler | None = None, client_mode: bool = False,
                 address: str = "", val_batches: list[Microbatch] = (), metrics_period: float = 10.0,
                 swarm_key=None, lanes=None):
        self.cfg, self.stage, self.dht, self.p2p, self.run_id = cfg, stage, dht, p2p, run_id
        self.swarm_key = swarm_key  # private swarm: our requests carry its token, we refuse requests without
        self.spec = stage_spec(cfg, stage)
        self.compute = ComputeThread()
        self.fingerprint = stage_fingerprint(cfg, stage)
        # the averager process first (forked before the model exists, it shares no page the trainer writes later)
        self.sync = StageSync(cfg, stage, dht, run_id, stage_param_shapes(cfg, stage), self.compute, self.fingerprint,
                              swarm_key)
        self.trainer = StageTrainer(cfg, stage, device)
        self.compute.set_idle_work(self.trainer.idle_work)  # deferred weight gradients (split_backward.py)
        self.sync.attach(self.trainer)
        self.sampler = sampler
        self.client_mode = client_mode
        self.peer_id = str(dht.peer_id)
        self.mates_fingerprint = mates_fingerprint(cfg, stage)
        self.announcer = Announcer(dht, run_id, subkey, cfg.swarm.record_ttl)
        self.address = address[:256]
        self.checkpoint_dir: str | None = None  # set by the CLI (--checkpoint-dir)
        self.resumed_from: dict | None = None
        self._last_checkpoint = time.monotonic()
        self.checkpoint_times: list[dict] = []  # per checkpoint: compute paused, total, bytes (the summary's)
        self.state = "online"
        self.stop_event = asyncio.Event()
        self.warned_peers: set[str] = set()
        self.seen_upstream = False
        self.upstream_online = 0
        self.upstream_ended = False  # the previous stage's records say it is done (idle/finished/offline)
        self.upstream_seen_at = time.monotonic()  # last time any record of the previous stage was visible
        self.stage_read_at = time.monotonic()  # last successful read of this stage's records (_refresh_stage)
        self.upstream_ended_at: float | None = None  # first sight of an upstream peer that ended (run_end.py)
        self.upstream_heard_at: float | None = None  # the last training microbatch from upstream
        self.stats = defaultdict(int)
        self.started = time.monotonic()
        # the parts
        self.telemetry = PeerTelemetry(self, metrics_period)
        self.window = GradientWindow(cfg.data.batch_size)
        stopping = self.stop_event.is_set
        self.forwarder = None if self.spec.is_last else Forwarder(
            cfg, stage, dht, p2p, run_id, self.trainer.model.hf.vocab_size, self.stats, self.warned_peers, stopping,
            self.telemetry.on_delivered, swarm_key, lanes)
        self.server = StageServer(cfg, self.spec, self.trainer, self.compute, self.window, self.forwarder,
                                  self.telemetry, lambda: self.state, lambda: self.sync.paused,
                                  self._trained, swarm_key)
        self.driver = Driver(cfg, self.spec, self.peer_id, self.trainer, self.compute, self.window, self.forwarder,
                             sampler, list(val_batches), self.telemetry, self.stats, self._trained,
                             stopping) if self.spec.is_first else None
        self.stepper = Stepper(cfg, stage, self.trainer, self.compute, self.window, self.sync, self._refresh_stage,
                               self._publish_now, self._checkpoint_due, lambda: self.save_checkpoint("periodic"),
                               stopping)

    @property
    def router(self):
        return self.forwarder.router if self.forwarder else None

    @property
    def loss_curve(self) -> list[list[float]]:
        return self.stepper.loss_curve

    def _trained(self, loss: float | None, upstream: str | None) -> None:
        """One training microbatch done (served for `upstream`, or driven by stage 0 when None)."""
        if loss is not None:
            self.stepper.add_loss(loss)
        self.stats["microbatches"] += 1
        if upstream is not None:
            self.telemetry.on_received(upstream)
        self.upstream_heard_at = time.monotonic()

    # ------------------------------------------------------------------------------------------ record
    def record(self) -> StageRecord:
        w = self.window
        return StageRecord(
            peer_id=self.peer_id, stage=self.stage, fingerprint=self.fingerprint, mates_fingerprint=self.mates_fingerprint,
            config_summary=config_summary(self.cfg, self.stage), state=self.state, client_mode=self.client_mode,
            queue=w.waiting + self.compute.pending(), inflight=w.pending,
            max_inflight=self.cfg.swarm.max_inflight, throughput=float(self.trainer.throughput),
            inner_step=self.trainer.inner_step, samples=self.trainer.samples_stepped, clock=float(min(self.trainer.clock, 2**31)),
            round=self.sync.progress.round, round_steps=self.sync.progress.round_steps,
            round_samples=self.sync.progress.round_samples, syncing=self.sync.progress.syncing,
            paused=self.sync.paused,
            global_hash=self.sync.progress.global_hash, round_ok=self.sync.progress.round_ok, address=self.address,
            recent=list(self.sync.agreed_rounds))

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
            if self.forwarder is not None:
                await self.forwarder.refresh()
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

    # ------------------------------------------------------------------------------- same-stage sync glue
    def _refresh_stage(self) -> StageView:
        """Blocking: re-read this stage's records; what sync.py decides from (one StageView, handed over whole)."""
        peers = read_stage_records(self.dht, self.run_id, self.stage)
        sw, now = self.cfg.swarm, get_dht_time()
        if self.announcer.last_expiration > now and not any(p.peer_id == self.peer_id for p in peers):
            # our own live record is missing: the read failed (a timed-out get returns nothing), which says nothing
            # of the mates. Until their records would have expired they count as unreachable, not gone: a round
            # then neither waits for them nor ends "alone" as an agreed result (CI saw that split a stage)
            last = self.sync.view
            known = time.monotonic() - self.stage_read_at <= sw.record_ttl
            view = StageView(silent=last.others + last.silent if known else (), unreadable=True)
            self.sync.see(view)
            return view
        self.stage_read_at = time.monotonic()
        peers = [p for p in peers if self.sync.trusts(p.peer_id)]
        # a record not refreshed for a few announce periods belongs to a peer that is gone (killed, cut off): do not
        # wait for it in rounds until its record expires (swarm.record_ttl), which would stall the stage that long
        stale_after = min(max(4 * sw.announce_period, 6.0), sw.record_ttl)
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

    async def save_checkpoint(self, reason: str) -> None:
        """Atomic checkpoint of this peer's state (captured on the compute thread, written in another)."""
        from swarm_peer.checkpoint import checkpoint_path, commit, write_payload

        self._last_checkpoint = time.monotonic()
        try:
            path = checkpoint_path(self.checkpoint_dir, self.stage)
            t0 = time.monotonic()

            def write():  # on the compute thread: nothing changes the state while it is serialized
                state = self.state_dict()
                return state["inner_step"], state["progress"]["round"], write_payload(path, state)
            inner_step, rnd, (tmp, nbytes) = await self.compute.run(STEP, write)
            paused = time.monotonic() - t0
            await self._in_thread(commit, tmp, path)
            self.checkpoint_times.append({"paused_s": paused, "total_s": time.monotonic() - t0, "bytes": nbytes})
            log.info(f"checkpoint ({reason}): inner step {inner_step}, round {rnd}, {nbytes / 2**20:.1f} MiB -> "
                     f"{path} (compute paused {paused:.2f}s)")
        except Exception as e:
            log.warning(f"checkpoint ({reason}) failed: {e}")

    def state_dict(self) -> dict:
        """What a checkpoint holds: the sum of the stateful parts' state (by reference: serialize it on the compute
        thread, before the next step), flat, plus which stage and config it is of."""
        return {"stage": self.stage, "fingerprint": self.fingerprint, **self.trainer.state_dict(),
                **self.sync.state_dict(), "sampler": self.sampler.state_dict() if self.sampler is not None else None,
                "rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        """Load a checkpoint's state into this freshly built peer (before it serves); ValueError if it is not ours."""
        if state.get("stage") != self.stage or state.get("fingerprint") != self.fingerprint:
            raise ValueError(f"checkpoint is of stage {state.get('stage')} / config {state.get('fingerprint')}, "
                             f"this peer is stage {self.stage} / config {self.fingerprint}")
        self.sync.load_state_dict(state)  # first: it refuses another sync mode's state
        self.trainer.load_state_dict(state)
        if self.sampler is not None and state.get("sampler") is not None:
            self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"])

    def _checkpoint_due(self) -> bool:
        return bool(self.checkpoint_dir) and time.monotonic() - self._last_checkpoint >= self.cfg.run.checkpoint_interval

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
        return self.server.servicer()

    # ------------------------------------------------------------------------------------------ lifecycle
    async def main(self, max_steps: int) -> None:
        loops = [self.announce_loop(), self.discover_loop(), self.stepper.run(), self.telemetry.progress_loop(),
                 self.telemetry.publish_loop()]
        if self.sync.mode != "none":
            loops.append(self.stepper.watch(lambda: self.state in ("online", "idle")))
        background = [asyncio.create_task(c) for c in loops]
        self.started = time.monotonic()
        self.stepper.begin()
        try:
            if self.spec.is_first:
                evaluating = asyncio.create_task(self.driver.eval_loop(max_steps, lambda: self.state == "online"))
                await self.driver.drive(max_steps)
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
                self.state, self.sync.training = "idle", False
                await self._publish_now()
                await self.stepper.finish_with_stage()
        finally:
            self.wall = time.monotonic() - self.started
            self.stepper.enter(Phase.FINISHED)
            self.state = "offline" if self.stop_event.is_set() else "finished"
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            try:
                await asyncio.wait_for(asyncio.gather(self._in_thread(self.announcer.publish, self.record()),
                                                      self.telemetry.publish_last()), 10)
            except Exception as e:
                log.warning(f"could not publish final record: {e}")

    def summary(self) -> dict:
        from swarm_peer.transport import STATS

        tokens = self.trainer.samples_stepped * self.cfg.data.seq_len
        wall = getattr(self, "wall", time.monotonic() - self.started)
        phases = self.stepper.phase_report()
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
            "compute_time_s": self.trainer.compute_seconds, "compute_busy_s": self.compute.busy_seconds,
            "forwarded_to": self.router.sent_counts() if self.router else {}, "checkpoints": self.checkpoint_times, "transport": STATS.snapshot(),
            "final_weights_hash": self.trainer.weights_hash(), "fingerprint": self.fingerprint,
            "sync": self.sync.summary(), "phase_seconds": phases, "sync_blocked_share": Stepper.sync_blocked_share(phases, wall),
            "eval_curve": self.telemetry.eval_curve, "resumed_from": self.resumed_from,
            "config": self.cfg.model_dump(mode="json"),
        }
