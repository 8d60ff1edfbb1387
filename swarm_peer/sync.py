"""Keeping the replicas of one stage in sync: when its peers enter a round, the round itself, agreement, recovery.

`swarm.sync_mode` is a strategy (sync_modes.py: what a round averages, what the stage's state is, how an average is
applied): `diloco` (default) averages pseudo-gradients after H inner steps, `sync` gradients before every inner step,
`none` has no rounds. Everything below is the same for every mode.

When. Every peer publishes its round, the inner steps and samples it has done in it, and whether it is averaging
now (StageRecord). Round r is due when the stage's peers in round r have done H = `swarm.sync_every` inner steps on
average (or `swarm.sync_samples` samples together), or when any of them has started averaging. So a fast peer does
more inner steps per round, nobody waits for a barrier, and stages sync independently.

The round. hivemind's all-reduce among the stage's peers in round r (group key = round bits, target group size = the
peers that can join), every timeout set, bit-identical results (averaging.py). Attempts repeat until
`swarm.averaging_timeout`; a peer that finds itself alone applies its own outer step on schedule (`round_ok`); one
that failed to average with peers that exist steps alone too but marks `round_ok = False`, so it won't vote.
Overlapped (DiLoCo, `swarm.overlap_rounds`): `begin_round` fixes the contribution, the round runs while the peer
trains and serves, and `land` hands its update to the local weights at a later inner step. Sync mode: once a
hivemind round averaged a group of peers that all keep a standing group, their next rounds go over it, with no
matchmaking (standing_group.py).

Agreement. Peers publish the hash of their global weights at the start of each round. A peer whose hash differs from
the majority of the voting peers at the newest round (ties: the hash held by the smallest peer id), or who is behind
that round, downloads the state (global weights, momentum, round) from the peers holding the majority hash, several
donors at once. Joiners do the same before they serve; the first peer of an empty stage keeps the seeded init.
At the run's end, when no peer's last round agreed (nobody may serve), the stage ends on the hash most of them hold
at the newest round, ties to the smallest peer id (sync_rules.end_fallback): its holders serve it, the rest download.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time

import torch

from swarm_peer.allreduce import FAILED_VALUES, RECEIVED, SENT
from swarm_peer.averaging import StageAverager, await_step
from swarm_peer.compression import compression_strategy
from swarm_peer.compute import STEP, ComputeThread, StageTrainer
from swarm_peer.config import Config
from swarm_peer.diloco import OuterOptimizer, squared_norm
from swarm_peer.donor_trust import DonorTrust
from swarm_peer.records import RECENT_ROUNDS, StageRecord
from swarm_peer.overlap import OverlappedRounds
from swarm_peer.stage_state import StageState
from swarm_peer.standing_group import sees_only
from swarm_peer.sync_modes import Independent, make_mode
from swarm_peer.sync_rules import (ROUND_PHASES, Progress, StageView, averaging_buffer_dtype, group_clock,
                                   group_hash, max_round_weight, remember_agreements, round_bits, round_due)
from swarm_peer.validation import all_finite

log = logging.getLogger("swarm_peer")
AGREEMENT_MEMORY_S = 30.0  # how long a round's majority hash, once seen in the records, vouches for a download


# ------------------------------------------------------------------------------------------------ the peer side
class StageSync(StageState, OverlappedRounds):
    """One peer's side of its stage's rounds. Torch work runs on the peer's compute thread; blocking hivemind calls
    in executor threads; decisions read the stage's records that the worker refreshes (`view`, replaced whole)."""

    def __init__(self, cfg: Config, stage: int, dht, run_id: str, shapes: list[torch.Size], compute: ComputeThread,
                 fingerprint: str, swarm_key=None):
        """Starts the averager process: call before the stage's model and optimizer exist, then `attach(trainer)`.
        A forked child keeps a private copy of every page its parent writes after the fork: forked after the
        model, the averager held a stale copy of the weights and the outer state (1.5 GB at GPT-2-small size)."""
        self.cfg, self.mode, self.compute = cfg, cfg.swarm.sync_mode, compute
        self.me, self.fingerprint = str(dht.peer_id), fingerprint
        self.trainer: StageTrainer | None = None
        self.strategy: Independent | None = None  # the mode's behaviour (attach)
        self.progress = Progress(global_hash="")
        self.view = StageView()  # replaced whole by see(): read it once per decision
        self.agreed: dict[int, dict[str, float]] = {}  # round -> majority hashes seen recently (remember_agreements)
        self.agreed_rounds: tuple[tuple[int, str], ...] = ()  # this peer's last agreed (round, hash): its record's
        # `recent` (a tuple replaced whole: the announcer reads it from another thread)
        self.training = True  # False once this peer is done training (it still takes part in rounds)
        self.rounds: list[dict] = []
        self.recoveries: list[dict] = []
        self.averager = None
        self.group = None  # sync mode's standing group over direct lanes (standing_group.py; set by the peer)
        self._publishing: asyncio.Future | None = None  # the last record publication (_publish)
        self.clock_pending = False
        self.background = False  # an overlapped round is running: the peer trains and serves meanwhile
        self.applying = False  # ... and writing its outer step into the global copy (not to be cancelled)
        self._began = (0, 0, 0.0)  # round_steps, round_samples and run clock when the current round began
        self._since_began = (0, 0)  # inner steps and samples trained while an overlapped round runs
        self._counts = threading.Lock()  # the round counters: the event loop counts, an overlapped round resets
        self.trust = DonorTrust(cfg.swarm.announce_period)  # whose state claims are believed (unbacked: not)
        self._fallback_told: tuple[int, str] | None = None
        if self.mode != "none":
            sw = cfg.swarm
            dtype = averaging_buffer_dtype(self.mode, sw.compression.averaging)
            self.buffers = [torch.zeros(shape, dtype=dtype) for shape in shapes]
            self.averager = StageAverager(
                self.buffers, dht, get_state=self._state_for_download, prefix=f"{run_id}_avg{stage}", start=True,
                min_group_size=2, target_group_size=None, initial_group_bits=round_bits(0),
                min_matchmaking_time=sw.matchmaking_time, request_timeout=max(0.2, 0.5 * sw.matchmaking_time),
                compression=compression_strategy(sw.compression.averaging), allreduce_timeout=sw.averaging_timeout / 2,
                next_chunk_timeout=sw.averaging_chunk_timeout, client_mode=False, declare_state_period=10,
                swarm_key=swarm_key, weight_cap=lambda size: max_round_weight(
                    self.mode, cfg.data.batch_size, sw.sync_every, sw.sync_samples, size))

    def attach(self, trainer: StageTrainer) -> None:
        self.trainer = trainer
        self.strategy = make_mode(self.cfg, trainer)
        self.progress = Progress(global_hash=self.strategy.state_hash())

    @property
    def paused(self) -> bool:
        """In a round that admits no training request (every round but an overlapped one)."""
        return self.progress.syncing and not self.background

    @property
    def outer(self) -> OuterOptimizer | None:
        """DiLoCo's global copy and outer momentum (None in the other modes)."""
        return self.strategy.outer if self.strategy else None

    def see(self, view: StageView) -> None:
        """The worker's fresh look at the stage's other peers."""
        agreed = {r: dict(hashes) for r, hashes in self.agreed.items()}  # a new dict, handed over whole like the view
        remember_agreements(agreed, list(view.others), time.monotonic(), AGREEMENT_MEMORY_S)
        self.view, self.agreed = view, agreed

    @property
    def others(self) -> tuple[StageRecord, ...]:
        return self.view.others

    def trusts(self, peer_id: str) -> bool:
        return self.trust.trusts(peer_id)

    # ---- bookkeeping from the worker
    def catch_up_clock(self) -> None:
        """Before the first step on a downloaded state: the run clock of the stage as it is now (the median of the
        live stage mates' published ones, never backwards), not as it was at the download."""
        if not self.clock_pending:
            return
        self.clock_pending = False
        now = {o.peer_id: {"clock": o.clock} for o in self.others if o.state == "online"}
        self.trainer.clock = max(self.trainer.clock, group_clock(now, self.trainer.clock, self.cfg.run.max_steps))

    def stepped(self, samples: int) -> None:
        with self._counts:  # an overlapped round's end resets them in an executor thread
            self.progress.round_steps += 1
            self.progress.round_samples += samples
        if self.background:
            self._since_began = (self._since_began[0] + 1, self._since_began[1] + samples)

    def due(self, lookahead: int = 0) -> bool:
        """Is an outer round due (only modes with outer rounds have one)?"""
        if not self.strategy.outer_rounds or self.progress.syncing:
            return False
        return round_due(self.progress, self.others, self.cfg.swarm.sync_every, self.cfg.swarm.sync_samples,
                         lookahead, training=self.training)

    def unmerged_work(self) -> bool:
        """Has anyone in my round (me included) done inner steps that no outer step has merged yet?"""
        return self.progress.round_steps > 0 or any(
            o.round == self.progress.round and o.round_steps > 0 for o in self.others)

    # ---- a round
    async def _average(self, r: int, weight: float, clock: float, refresh, contribute,
                       phases: dict) -> tuple[dict | None, str]:
        """Attempts until one completes or the round's deadline, in the event loop: it awaits the averager's step
        control; blocking calls (records, the averager's lock, its pipe) go to executor threads. Returns (gathered,
        outcome); `phases` gets "prepare_s" (writing the contributions, all attempts), and the completed attempt's
        "matchmaking_s" and "allreduce_s" (split where the all-reduce was first seen running, to within
        averaging.PHASE_POLL_S). Each attempt writes this peer's contribution afresh into the averager's buffers
        (`contribute`, on the compute thread): a failed attempt leaves them partly averaged, and no second full-size copy is kept to
        refill them from."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.cfg.swarm.averaging_timeout
        attempts, last_error = 0, ""
        if self.fast_round(r):
            fast = await self._average_fast(r, weight, clock, contribute, phases)
            if fast is not None:
                return fast
        while time.monotonic() < deadline:
            view = await loop.run_in_executor(None, refresh)
            others = view.others
            if any(o.round > r and o.round_ok for o in others):
                return None, "behind"
            # r - 1: about to publish round r. Sync mode: a mate done training (idle) steps no more
            joinable = [o for o in others if o.round in (r - 1, r) and (self.strategy.outer_rounds or o.state == "online")]
            if not joinable:
                # laggards further back recover from us instead. But a stage mate in this round whose record merely
                # went quiet (an overloaded host, a slow DHT) may be averaging with others right now: a lone step
                # then must not vote, or the round would end on two "agreed" hashes
                if view.unreadable:
                    return None, "alone (the stage's records could not be read)"
                if any(o.round >= r - 1 for o in view.silent):
                    return None, "alone (stage peers in this round unreachable)"
                if any(o.round > r and o.round_ok for o in view.departed):  # they completed it, then left (or were
                    return None, "alone (stage peers completed this round and left)"  # stopped): no second hash
                return None, "alone"
            def prepare(size: int) -> None:  # the averager's lock may be held by a timed-out attempt: not the loop
                with self.averager.get_tensors() as tensors:
                    self.compute.call(STEP, lambda: contribute(tensors))
                self.averager.set_group_bits(round_bits(r))
                self.averager.set_target_group_size(size)
            t_prepare = time.monotonic()
            await loop.run_in_executor(None, prepare, 1 + len(joinable))
            phases["prepare_s"] = phases.get("prepare_s", 0.0) + time.monotonic() - t_prepare
            attempts += 1
            budget = min(deadline - time.monotonic(), 3 * self.cfg.swarm.matchmaking_time + 1)
            if budget <= self.cfg.swarm.matchmaking_time:
                break
            mine = self._gather(r, clock)
            control = self.averager.step(weight=weight, gather=mine, timeout=budget, allow_retries=False, wait=False)

            async def give_up():
                now = await loop.run_in_executor(None, refresh)
                if any(o.round > r and o.round_ok for o in now.others) and not control.began_allreduce:
                    return "the stage moved on"
                return None

            seen, t_step = {}, time.monotonic()
            gathered, error = await await_step(control, give_up, poll=0.5, deadline=deadline + 5, phases=seen)
            if gathered is not None:
                began = seen.get("allreduce_at", time.monotonic())
                phases["matchmaking_s"], phases["allreduce_s"] = began - t_step, time.monotonic() - began
                if self.group is not None and sees_only(gathered):
                    self.group.form([str(k) for k in gathered], r + 1)  # the next rounds need no matchmaking
                return {str(k): v for k, v in gathered.items()}, f"averaged in {attempts} attempt(s)"
            last_error = error
            log.info(f"stage round {r}: attempt {attempts} failed: {error}")
            if control.began_allreduce:
                # groupmates may have completed this very all-reduce (their last part reached them, ours did not):
                # a retry with other peers would end the round on a second "agreed" result. Not voting instead;
                # the stage's majority is recovered at the next round
                return None, f"failed during the all-reduce ({error}); not retried: a groupmate may have completed it"
        return None, f"failed after {attempts} attempt(s): {last_error or 'no groupmates'}"

    def _gather(self, r: int, clock: float) -> dict:
        """What this peer tells its groupmates (their group_hash and group_clock read it; a standing group's members
        how many stage mates it sees)."""
        mine = {"round": r, "hash": self.progress.global_hash, "clock": clock, "ok": self.progress.round_ok}
        if self.group is not None:
            mine.update(fast=True, mates=sum(o.state == "online" for o in self.others))
        return mine

    def fast_round(self, r: int) -> bool:
        """Is round r for the standing group (sync mode, standing_group.py)?"""
        return self.group is not None and self.group.usable(r)

    async def _average_fast(self, r: int, weight: float, clock: float, contribute, phases: dict):
        """A round over the standing group: (gathered, outcome), or None when nobody completed it (then hivemind's
        matchmaking; the group it forms stands next)."""
        loop, t0 = asyncio.get_running_loop(), time.monotonic()
        def prepare() -> None:  # the averager's lock may be held by a timed-out attempt: not the loop
            with self.averager.get_tensors() as tensors:
                self.compute.call(STEP, lambda: contribute(tensors))
        await loop.run_in_executor(None, prepare)
        phases["prepare_s"] = time.monotonic() - t0
        gathered, kind, error = await self.group.run(r, self.buffers, weight, self._gather(r, clock))
        if kind == "ok":
            phases["allreduce_s"] = time.monotonic() - t0 - phases["prepare_s"]
            phases["waiting_s"] = self.group.last_wait_s  # (of the all-reduce: for the last groupmate's part)
            return {str(k): v for k, v in gathered.items()}, "averaged over the standing group"
        self.group.disband()
        if kind == "ambiguous":
            return None, f"failed during the all-reduce ({error}); not retried: a groupmate may have completed it"
        log.info(f"stage round {r}: the standing group's all-reduce did not complete ({error}); matchmaking")
        return None

    async def run_round(self, completed_samples: int, refresh, publish) -> dict | None:
        """One round. diloco: outer step on the averaged pseudo-gradient (after `begin_round`). sync: average gradients
        (the caller then steps AdamW with grads_are_mean). Returns the round's metrics, or None when this peer must
        recover."""
        loop = asyncio.get_running_loop()
        r, t0 = self.progress.round, time.monotonic()
        self.progress.syncing = True
        await self._publish(publish, soon=self.fast_round(r))
        mode = self.strategy
        began_steps, began_samples, began_clock = self._began if mode.outer_rounds else (0, 0, 0.0)
        samples = mode.round_samples(began_samples, completed_samples)
        # an idle peer's Δ = 0 must not dilute the average; never 0 (a group of all-zero weights would divide 0 by 0)
        weight = float(samples) if samples > 0 else 1e-6
        def contribute(out: list[torch.Tensor]) -> None:
            mode.contribute(out, completed_samples)

        # gradient rounds: the step this average is for
        clock = began_clock if mode.outer_rounds else await self.compute.run(STEP, self.trainer.position)
        before = list(self.averager.traffic)
        phases: dict = {}
        gathered, outcome = await self._average(r, weight, clock, refresh, contribute, phases)
        if outcome == "behind":
            self.progress.syncing = False
            log.warning(f"stage round {r}: the stage is ahead of this peer; recovering its state")
            return None
        averaged = gathered is not None
        group_ok = True
        if averaged:  # the group goes on at one run clock, so its members use one lr (sync mode: this very step)
            clock = group_clock(gathered, clock, self.cfg.run.max_steps)
            started_from = group_hash(gathered)
            group_ok = started_from is None or started_from == self.progress.global_hash
            if not group_ok:
                log.warning(f"stage round {r}: groupmates started from other weights; this peer's result won't vote")

        def apply(delta: list[torch.Tensor]) -> float:  # delta: the averager's buffers, the average or ours
            nonlocal averaged
            if not averaged:
                contribute(delta)
            norm = math.sqrt(squared_norm(delta))  # finite: so is every value (no separate pass over them)
            if averaged and not math.isfinite(norm) and not all(all_finite(d) for d in delta):  # e.g. all weights 0
                log.warning(f"stage round {r}: the average is not finite; applying this peer's own update")
                contribute(delta)
                averaged = False
                norm = math.sqrt(squared_norm(delta))
            self.progress.round_ok = group_ok and (averaged or outcome == "alone")
            if mode.outer_rounds and not self.background:  # the round ends here (a gradient round ends after the
                with self.averager.state_writing():  # inner step: end_sync_round); no download reads meanwhile
                    mode.apply(delta)
                    # a peer done training keeps its clock at the run's end: it only pulls late groupmates forward
                    self.trainer.clock = clock if self.training else max(self.trainer.clock, clock)
                    self._advance(r + 1)  # on the compute thread with the step: a state snapshot (also taken
                    # there) never pairs the new weights with the old round and hash
            elif mode.outer_rounds:  # overlapped: the outer step on the global copy (it reaches the local weights at
                with self.averager.state_writing():  # `land`), with the new round and hash: a download never pairs
                    mode.apply(delta)  # them wrongly. Inner steps trained since the round began count towards the next
                    with self._counts:
                        self._advance(r + 1, carried=(self.progress.round_steps - began_steps,
                                                      self.progress.round_samples - began_samples))
            else:  # sync: the gradients
                mode.apply(delta)
            return norm

        def apply_locked() -> float:
            # an executor thread waits for the averager's lock (held while a timed-out attempt still runs in the
            # averager process and may write the buffers), never the compute thread: training and serving go on
            with self.averager.get_tensors() as tensors:
                if self.background:  # the outer step here, off the compute thread (it touches no local weight)
                    return apply(tensors)
                return self.compute.call(STEP, lambda: apply(tensors))

        t_apply = time.monotonic()
        if self.background:  # the seqlock is taken only once the averager's lock is ours: a donor declines while
            self.applying = True  # it is held, and that lock may wait for a timed-out attempt
            try:
                norm = await loop.run_in_executor(None, apply_locked)
            finally:
                self.applying = False
        else:
            norm = await loop.run_in_executor(None, apply_locked)
        phases["apply_s"] = time.monotonic() - t_apply
        after = list(self.averager.traffic)
        metrics = {"round": r, "group_size": len(gathered) if averaged else 1, "outcome": outcome, "clock": clock,
                   "ok": self.progress.round_ok, "samples": samples,
                   "pseudo_grad_norm" if mode.outer_rounds else "grad_norm": norm,
                   "bytes_sent": after[SENT] - before[SENT], "bytes_received": after[RECEIVED] - before[RECEIVED],
                   "unaveraged_values": after[FAILED_VALUES] - before[FAILED_VALUES],
                   "seconds": time.monotonic() - t0, **{k: phases.get(k) for k in ROUND_PHASES}}
        if mode.outer_rounds:  # gradient rounds: the hash is taken after the AdamW step (end_sync_round)
            self._record(metrics)
            await publish()
        return metrics

    def _advance(self, next_round: int, carried: tuple[int, int] = (0, 0)) -> None:
        self.progress.global_hash = self.strategy.state_hash()
        self.progress.round, (self.progress.round_steps, self.progress.round_samples) = next_round, carried
        self.progress.syncing = False  # (an overlapped round still has to land: the stepper knows)
        self.note_agreed()

    def note_agreed(self) -> None:
        """Remember the round this peer now holds, if agreed (its record's `recent`: downloads of it stay checkable
        after this peer moves on)."""
        if self.progress.round_ok:
            pair = (self.progress.round, self.progress.global_hash)
            self.agreed_rounds = (*[p for p in self.agreed_rounds if p[0] != pair[0]], pair)[-RECENT_ROUNDS:]

    def _record(self, metrics: dict) -> None:
        metrics["weights_hash"] = self.progress.global_hash
        self.rounds.append(metrics)

    async def end_sync_round(self, metrics: dict, publish) -> None:
        """sync mode, after the AdamW step on the averaged gradient: the new weights define the next round."""
        def finish():
            self._advance(metrics["round"] + 1)
            self._record(metrics)
        await self.compute.run(STEP, finish)
        await self._publish(publish, soon=self.group is not None and bool(self.group.members))

    async def _publish(self, publish, soon: bool) -> None:
        """Publish this peer's record: now, or (soon: a standing group's round, which waits for nobody's reading of
        it) in the background, in order (one DHT store is ~20 ms here, a standing-group round ~50)."""
        previous = self._publishing
        async def in_order():
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            await publish()
        self._publishing = asyncio.ensure_future(in_order())
        if not soon:
            await self._publishing

    def shutdown(self) -> None:
        if self.averager is not None and self.averager.is_alive():
            self.averager.shutdown()
