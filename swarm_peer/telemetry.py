"""What a peer reports: a metric record per time window in the DHT (for the monitor and `status`) and one progress
line per interval on its console.

Windows are aligned on DHT time (window = floor(time / period)), so every peer closes window w at about the same
moment and publishes its figures for w right then: the monitor aggregates one window at a time and never mixes them.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time

import torch
from hivemind.utils import get_dht_time

from swarm_peer.memory import FootprintPeak
from swarm_peer.progress import count, eta
from swarm_peer.records import EVAL_HISTORY, MAX_DELIVERED_PEERS, MetricRecord, store_metric_record

log = logging.getLogger("swarm_peer")


class PeerTelemetry:
    def __init__(self, worker, period: float):
        self.worker, self.period = worker, period
        self.loss_sum, self.loss_count = 0.0, 0  # training losses seen in the current window (last stage)
        self.eval_loss: float | None = None
        self.eval_step = 0
        self.eval_curve: list[list[float]] = []
        self._last_tokens = 0  # tokens stepped when the current window began
        self.delivered: dict[str, int] = {}  # next-stage peer id -> training microbatches it took in this window
        self.received: dict[str, int] = {}  # previous-stage peer id -> training microbatches served for it
        self.footprint = FootprintPeak()

    def on_loss(self, loss: float) -> None:
        if math.isfinite(loss):
            self.loss_sum += loss
            self.loss_count += 1

    def on_delivered(self, peer_id: str) -> None:
        _count(self.delivered, peer_id)

    def on_received(self, peer_id: str) -> None:
        _count(self.received, peer_id)

    def on_eval(self, step: int, loss: float) -> None:
        self.eval_loss, self.eval_step = loss, step
        self.eval_curve.append([step, loss])

    def record(self, window: int, tokens_per_s: float) -> MetricRecord:
        from swarm_peer.transport import STATS

        w, sync = self.worker, self.worker.sync
        traffic = list(sync.averager.traffic) if sync.averager is not None else [0, 0, 0]
        wire = STATS.snapshot()
        return MetricRecord(
            peer_id=w.peer_id, stage=w.stage, state=w.state, window=window, period=float(self.period),
            round=sync.progress.round, inner_step=w.trainer.inner_step, samples=w.trainer.samples_stepped,
            tokens=w.trainer.samples_stepped * w.cfg.data.seq_len, loss_sum=float(self.loss_sum),
            loss_count=self.loss_count, evals=[(int(step), float(min(loss, 1e6)))
                                               for step, loss in self.eval_curve[-EVAL_HISTORY:]],
            tokens_per_s=float(tokens_per_s),
            queue=w.window.waiting + w.compute.pending(), inflight=w.window.pending,
            sync_seconds=float(sum(r["seconds"] for r in sync.rounds)),
            bytes_sent=int(wire["bytes_sent"] + traffic[0]), bytes_received=int(wire["bytes_received"] + traffic[1]),
            global_hash=sync.progress.global_hash, round_ok=sync.progress.round_ok, delivered=dict(self.delivered),
            received=dict(self.received))

    async def publish_loop(self) -> None:
        """At every window boundary: publish the closed window's figures, then reset the window counters."""
        self._last_tokens = self._tokens()
        while self.worker.state in ("online", "idle"):
            now = get_dht_time()
            window = int(now // self.period)
            await asyncio.sleep(max(0.0, (window + 1) * self.period - now) + 0.05)
            await self.publish(self._close_window(window))

    async def publish_last(self) -> None:
        """The figures of the window the peer ends in (its last evaluation, its last losses): the loop above stops
        with the peer, before that window closes."""
        await self.publish(self._close_window(int(get_dht_time() // self.period)))

    def _tokens(self) -> int:
        return self.worker.trainer.samples_stepped * self.worker.cfg.data.seq_len

    def _close_window(self, window: int) -> MetricRecord:
        tokens = self._tokens()
        record = self.record(window, (tokens - self._last_tokens) / self.period)
        self.loss_sum, self.loss_count, self._last_tokens = 0.0, 0, tokens
        self.delivered, self.received = {}, {}
        return record

    async def publish(self, record: MetricRecord) -> None:
        w = self.worker
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, store_metric_record, w.dht, w.run_id, record, w.announcer.subkey, 3 * self.period)
        except Exception as e:
            log.warning(f"could not publish metrics: {e}")

    async def progress_loop(self, every: float = 5.0) -> None:
        """One line per interval: where the run is (run step of the total, ETA), loss, validation loss, tokens/s,
        tokens so far, round; or what the peer is waiting for."""
        w = self.worker
        last_t, last_samples = time.monotonic(), 0
        clocks = [(last_t, float(w.trainer.clock))]  # (time, run clock) over the last minute: the ETA's rate
        while True:
            await asyncio.sleep(every)
            await asyncio.get_running_loop().run_in_executor(None, self.footprint.sample)
            now, samples = time.monotonic(), w.trainer.samples_stepped
            rate = (samples - last_samples) * w.cfg.data.seq_len / max(now - last_t, 1e-6)
            clocks = [c for c in clocks if now - c[0] <= 60.0][-12:] + [(now, float(w.trainer.clock))]
            print(f"[stage {w.stage}] {progress_line(w, rate, clocks)}", flush=True)
            last_t, last_samples = now, samples


def progress_line(w, tokens_per_s: float, clocks: list[tuple[float, float]]) -> str:
    total, clock = w.cfg.run.max_steps, min(float(w.trainer.clock), w.cfg.run.max_steps)
    (t0, c0), (t1, c1) = clocks[0], clocks[-1]
    speed = (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0  # run steps per second
    parts = [f"run step {int(clock)}/{total} {clock / max(total, 1):.0%}", eta(clock, total, speed)]
    if w.loss_curve:
        parts.append(f"loss {w.loss_curve[-1][1]:.4f}")
    if w.telemetry.eval_loss is not None:
        parts.append(f"val {w.telemetry.eval_loss:.4f}")
    tokens = w.trainer.samples_stepped * w.cfg.data.seq_len
    parts += [f"{tokens_per_s:,.0f} tok/s", f"{count(tokens)} tokens", f"inner step {w.trainer.inner_step}",
              f"microbatches {w.stats['microbatches']}"]
    if w.sync.mode != "none":
        parts.append(f"round {w.sync.progress.round}")
    if not w.spec.is_last:
        parts.append(f"next-stage peers {len(w.router.live())}")
    if not w.spec.is_first and w.stats["microbatches"] == 0:  # say what it waits for, not "step 0" for ever
        parts.append(f"waiting for stage {w.stage - 1}: " + (f"{w.upstream_online} peer(s) visible, none has sent a "
                                                             f"microbatch yet" if w.upstream_online else
                                                             "no peer of it visible yet (is one running?)"))
    return " | ".join(parts)


def _count(counts: dict[str, int], peer_id: str) -> None:
    if peer_id in counts or len(counts) < MAX_DELIVERED_PEERS:  # bounded: a window's record stays small
        counts[peer_id] = counts.get(peer_id, 0) + 1


def memory_report(w) -> dict:
    """Peak RSS of this process (Linux ru_maxrss is KiB) against what training must hold: parameters, grads,
    inner optimizer state, the DiLoCo global copy + momentum + averaging buffers, activations in flight."""
    import resource

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    params = nbytes(w.trainer.params)
    # every backward allocates them and the step frees them (zero_grad(set_to_none)): at the end of a run they are
    # gone, yet they are part of the state a step needs
    grads = nbytes(p for p in w.trainer.params if p.requires_grad)
    inner = nbytes(t for st in w.trainer.opt.state.values() for t in st.values() if torch.is_tensor(t))
    outer = nbytes([*w.sync.outer.global_params, *w.sync.outer.buffers, *(w.sync.strategy.snapshot or [])]
                   ) if w.sync.outer else 0  # + the snapshot overlapped rounds contribute from
    buffers = nbytes(w.sync.buffers) if w.sync.averager is not None else 0  # shared with the averager process
    # boundary activations of the microbatches in flight (a lower bound: autograd also keeps inner ones)
    d = w.cfg.data
    acts = w.cfg.swarm.max_inflight * d.microbatch_size * d.seq_len * w.trainer.model.hf.hidden_size * 4
    w.telemetry.footprint.sample()
    peak = w.telemetry.footprint
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_footprint_pss_bytes": peak.total, "footprint_by_process": peak.by_process, "params_bytes": params,
            "grads_bytes": grads, "inner_optimizer_bytes": inner, "outer_state_bytes": outer,
            "averaging_buffers_bytes": buffers, "inflight_activation_bytes": acts}
