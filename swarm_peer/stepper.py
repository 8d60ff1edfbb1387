"""The inner step and what follows it: whenever the gradient window is closed and drained,

    [sync mode: average the gradients] -> inner AdamW step -> [diloco: outer round when due or asked for]
    -> [recover the stage's state if ours is behind or disagrees] -> [periodic checkpoint] -> reopen the window

and the end of a peer's training: stay in the stage's rounds until no stage peer trains any more, so every peer of a
stage ends on the same global model. The rules themselves (when a round is due, who may donate) are pure functions
in sync_rules.py; the rounds in sync.py.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from enum import Enum
from typing import Awaitable, Callable

from swarm_peer.compute import STEP, ComputeThread, StageTrainer
from swarm_peer.config import Config
from swarm_peer.memory import release_freed_memory
from swarm_peer.records import StageRecord
from swarm_peer.sync import StageSync
from swarm_peer.sync_rules import StageView, format_round
from swarm_peer.window import GradientWindow

log = logging.getLogger("swarm_peer")
RECOVERY_TRIES = 5  # state downloads before a peer goes on with its own state (backoff 1, 2, 4, 8 s between)


class Phase(str, Enum):
    """Where a peer's stepper is; the summary says how long it spent in each (`phase_seconds`)."""
    TRAINING = "training"  # microbatches are admitted, or (the window full) finish their backward
    DRAINING = "draining"  # closed early (a round is due): the admitted microbatches finish, nothing new is admitted
    STEPPING = "stepping"  # sealing the window and the inner step, on the compute thread
    AVERAGING = "averaging"  # a same-stage round: sync mode's gradients before the step, DiLoCo's outer round after
    RECOVERING = "recovering"  # downloading the stage's state (behind the stage, or our weights disagree)
    CHECKPOINTING = "checkpointing"
    IDLE = "idle"  # done training: in the stage's rounds until no stage peer trains any more
    FINISHED = "finished"


class Action(Enum):
    LAND = "land"  # an overlapped round's update reaches the local weights (waiting for the round when it must)
    OUTER_ROUND = "outer round"
    RECOVER = "recover"
    CHECKPOINT = "checkpoint"
    REOPEN = "reopen"  # nothing more: open the window for the next inner step


@dataclass(frozen=True)
class AfterStep:
    """What decides what follows an inner step (a snapshot taken before each decision)."""
    outer_rounds: bool  # the sync mode has rounds after inner steps (diloco)
    round_due: bool  # sync_rules.round_due for this peer and its stage
    round_asked: bool  # a caller waits for a round (end of training) and this peer has unmerged work
    stopping: bool
    behind: bool  # a round found the stage ahead of this peer
    disagrees: bool  # our weights differ from the stage majority's, and a retry is due
    checkpoint_due: bool
    done: frozenset = frozenset()  # the actions already taken after this step
    round_running: bool = False  # an overlapped round is running in the background
    round_landed: bool = False  # ... and has ended: its update waits for this step
    round_overdue: bool = False  # ... and the next round would be due (sync.overdue): it must land now
    callers_wait: bool = False  # a caller waits for a round (end of training)


def next_action(f: AfterStep) -> Action:
    """One action at a time, each at most once per step, in this order: landing an overlapped round (waited for when
    the next round would be due, or a caller, a recovery or a checkpoint needs the stage state settled), the recovery
    when this peer already knows it is behind or disagrees (a round from other weights than its mates' would not
    vote: overlapped rounds back to back once never recovered), the outer round, the recovery when that round found
    this peer behind, the checkpoint (of what the others left), then reopening."""
    if Action.LAND not in f.done and (f.round_landed or f.round_running and (
            f.round_overdue or f.callers_wait or f.behind or f.disagrees or f.checkpoint_due)):
        return Action.LAND
    if (f.behind or f.disagrees) and Action.RECOVER not in f.done:
        return Action.RECOVER
    if f.outer_rounds and not f.stopping and not f.round_running and (f.round_due or f.round_asked) and \
            Action.OUTER_ROUND not in f.done:
        return Action.OUTER_ROUND
    if (f.behind or f.disagrees) and Action.RECOVER not in f.done:
        return Action.RECOVER
    if f.checkpoint_due and Action.CHECKPOINT not in f.done:
        return Action.CHECKPOINT
    return Action.REOPEN


class Stepper:
    def __init__(self, cfg: Config, stage: int, trainer: StageTrainer, compute: ComputeThread,
                 window: GradientWindow, sync: StageSync, refresh: Callable[[], StageView],
                 publish: Callable[[], Awaitable[None]], checkpoint_due: Callable[[], bool],
                 checkpoint: Callable[[], Awaitable[None]], stopping: Callable[[], bool]):
        self.cfg, self.stage, self.trainer, self.compute, self.window, self.sync = cfg, stage, trainer, compute, window, sync
        self._refresh, self._publish, self._stopping = refresh, publish, stopping
        self._checkpoint_due, self._checkpoint = checkpoint_due, checkpoint
        self.phase, self._phase_since = Phase.TRAINING, time.monotonic()
        self.phase_seconds = {p.value: 0.0 for p in Phase}
        self.idle = False  # done training (finish_with_stage): the window reopens into IDLE, not TRAINING
        self._round_waiters: list[asyncio.Future] = []  # callers waiting for a round run by the stepper
        self._recover_wanted = False  # a round found this peer behind its stage
        self._retry_recovery_at, self._recovery_backoff = 0, 1  # after giving up: try again 1, 2, 4 ... 16 rounds later
        self._recovering = asyncio.Lock()
        self._overlapped: asyncio.Task | None = None  # an overlapped outer round (sync.run_round) in the background
        self.loss_curve: list[list[float]] = []  # [inner step, mean loss of the microbatches of that step]
        self._step_losses: list[float] = []

    def add_loss(self, loss: float) -> None:
        self._step_losses.append(loss)

    def begin(self) -> None:
        """The peer starts serving: phases are timed from now (not from before its join)."""
        self.phase, self._phase_since = Phase.TRAINING, time.monotonic()

    def enter(self, phase: Phase, at: float | None = None) -> None:
        """Account the time since the last change to the phase we leave; `at`: when it really changed (the
        window's closing, seen only once it has drained)."""
        now = time.monotonic()
        at = min(max(self._phase_since, now if at is None else at), now)
        self.phase_seconds[self.phase.value] += at - self._phase_since
        self.phase, self._phase_since = phase, at

    def phase_report(self) -> dict[str, float]:
        """Seconds per phase so far, the current one included (FINISHED is where the clock stops)."""
        report = dict(self.phase_seconds)
        if self.phase is not Phase.FINISHED:
            report[self.phase.value] += time.monotonic() - self._phase_since
        return report

    @staticmethod
    def sync_blocked_share(phases: dict[str, float], wall: float) -> float:
        """The share of wall time in which the peer admitted no training request because of same-stage sync
        (DRAINING + AVERAGING; an overlapped round's time is TRAINING)."""
        return (phases.get(Phase.DRAINING.value, 0.0) + phases.get(Phase.AVERAGING.value, 0.0)) / max(wall, 1e-9)

    def _after_step(self, waiters: list, done: set) -> AfterStep:
        outer = self.sync.strategy.outer_rounds
        running = self._overlapped is not None
        return AfterStep(outer_rounds=outer, round_due=outer and self.sync.due(),
                         round_asked=bool(waiters) and outer and self.sync.unmerged_work(),
                         stopping=self._stopping(), behind=self._recover_wanted, disagrees=self.disagrees(),
                         checkpoint_due=self._checkpoint_due(), done=frozenset(done), round_running=running,
                         round_landed=running and self._overlapped.done(), callers_wait=bool(waiters),
                         round_overdue=running and self.sync.overdue())

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            await self._settle_at_exit()

    async def _run(self) -> None:
        while True:
            await self.window.wait_full()
            if self.phase in (Phase.TRAINING, Phase.IDLE) and self.window.closed_early_at is not None:
                self.enter(Phase.DRAINING, at=self.window.closed_early_at)  # a full window's drain is training
            self.enter(Phase.STEPPING)
            completed = await self.compute.run(STEP, self.trainer.seal)  # exactly the samples in p.grad
            if self.sync.clock_pending:  # joined (or recovered) meanwhile: step at the stage's run clock of now
                await self._in_thread(self._refresh)
                self.sync.catch_up_clock()
            averaged = None
            if self.sync.strategy.averages_gradients and self.sync.training and (completed > 0 or self.sync.others):
                self.window.close()  # queued requests get "busy" now instead of timing out during the round
                self.enter(Phase.AVERAGING)
                averaged = await self.sync.run_round(completed, self._refresh, self._publish)
                self._recover_wanted |= averaged is None
                self.enter(Phase.STEPPING)
            if averaged is not None or not self._recover_wanted:
                try:
                    await self.compute.run(STEP, lambda: self.trainer.step(
                        grads_are_mean=averaged is not None, clock=averaged["clock"] if averaged else None))
                except ValueError as e:
                    log.warning(f"stage {self.stage}: {e}")
                if completed > 0:
                    self.sync.stepped(completed)
            if averaged is not None:
                await self.sync.end_sync_round(averaged, self._publish)
            if self._step_losses:
                self.loss_curve.append([self.trainer.inner_step, sum(self._step_losses) / len(self._step_losses)])
                self._step_losses = []
            if completed > 0 and self.sync.due(lookahead=1):  # nearly due: tell the stage, look again
                await self._publish()
                await self._in_thread(self._refresh)
            waiters, self._round_waiters = self._round_waiters, []
            done: set[Action] = set()
            while (action := next_action(self._after_step(waiters, done))) is not Action.REOPEN:
                done.add(action)
                if action is Action.LAND:
                    await self._land()
                elif action is Action.OUTER_ROUND:
                    await self._round(overlap=self.sync.overlaps and not waiters and not self.idle)
                elif action is Action.RECOVER:
                    self.enter(Phase.RECOVERING)
                    await self.recover(behind=self._recover_wanted)
                    self._recover_wanted = False
                else:
                    self.enter(Phase.CHECKPOINTING)
                    await self._checkpoint()
            for future in waiters:
                if not future.done():
                    future.set_result(None)
            self.window.reopen()
            self.enter(Phase.IDLE if self.idle else Phase.TRAINING)
            await self._in_thread(release_freed_memory)  # the step's gradients, a round's temporaries
            if self._round_waiters:  # asked for during this iteration: close again (nothing admitted: no step)
                self.window.close()

    async def watch(self, running: Callable[[], bool]) -> None:
        """Close the window when a round is due (someone started it) or this peer's weights must be recovered; the
        stepper acts once in-flight microbatches drain."""
        while running():
            await self._in_thread(self._refresh)
            # an overlapped round needs no early close: it starts at the next step (an idle or empty window has none)
            early = not self.sync.overlaps or self.idle or self.window.admitted == 0
            if not self.sync.progress.syncing and (self.sync.due() and early or self.disagrees()):
                self.window.close()
            await asyncio.sleep(max(0.5, self.cfg.swarm.announce_period / 2))

    async def _round(self, overlap: bool) -> None:
        """Overlapped: fix what the round averages, start it in the background and reopen (it lands at a later step).
        Otherwise the window stays closed for the whole round."""
        await self.sync.begin_round(overlap)
        if overlap:
            self._overlapped = asyncio.create_task(self.sync.run_round(0, self._refresh, self._publish))
            return
        self.enter(Phase.AVERAGING)
        self.window.close()  # queued requests get "busy" now instead of timing out during the round
        self._report(await self.sync.run_round(0, self._refresh, self._publish))

    async def _settle_at_exit(self) -> None:
        """Stopped (a signal, the end of the run) with an overlapped round out: the state a checkpoint, the summary and
        the saved weights read at exit must be one state. A round still averaging is cancelled (the global copy stays
        the round's start, the local weights what they trained: a consistent pair); one applying its outer step is
        waited for (bounded) and, like one that ended, landed."""
        task, self._overlapped = self._overlapped, None
        if task is None:
            return
        if not task.done() and not self.sync.applying:
            task.cancel()
        try:
            metrics = await asyncio.wait_for(asyncio.shield(task), 30)
        except BaseException:  # cancelled, failed or stuck: nothing reached the global copy, or we cannot tell
            metrics = None
        if metrics is not None:
            await self.sync.land(metrics)
        else:
            self.sync.background = self.sync.progress.syncing = False

    async def _land(self) -> None:
        """The overlapped round's update reaches the local weights; waited for (training paused) when it is still
        running and something needs the stage's state settled."""
        if not self._overlapped.done():
            self.enter(Phase.AVERAGING)
        try:  # shielded: a stop while we wait leaves the round to _settle_at_exit (never cut inside its outer step)
            metrics = await asyncio.shield(self._overlapped)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the round's own failures are outcomes; this is a fault: recover the stage's state
            log.warning(f"stage {self.stage}: the outer round failed: {e}")
            metrics = None
        self._overlapped = None
        await self.sync.land(metrics)
        self._report(metrics)
        if metrics is not None and not metrics["ok"]:  # look at the stage as it is now: the next round is often
            await self._in_thread(self._refresh)  # due at once, and the recovery must come before it (next_action)

    def _report(self, metrics: dict | None) -> None:
        if metrics is None:
            self._recover_wanted = True
        else:
            print(f"[stage {self.stage}] {format_round(metrics)}", flush=True)

    async def request_round(self) -> None:
        """Ask the stepper for a round now (end of run) and wait until it has run it."""
        future = asyncio.get_running_loop().create_future()
        self._round_waiters.append(future)
        self.window.close()
        await future

    # ---------------------------------------------------------------------------------------- end of training
    async def finish_with_stage(self) -> None:
        """Done training (the caller has said so in its record): stay in the stage's rounds (idle) until none of its
        peers trains any more, then run a final round if any work is unmerged (DiLoCo)."""
        self.idle = True
        if self.phase is Phase.TRAINING:
            self.enter(Phase.IDLE)
        deadline = time.monotonic() + self.cfg.swarm.finish_timeout
        while time.monotonic() < deadline and not self._stopping():
            await self._in_thread(self._refresh)
            if not any(o.state == "online" for o in self.sync.others):
                # gradient rounds: every step had its round (a mate's partial last window it stepped alone: we
                # recover it)
                settled = self._overlapped is None  # else: request_round lands it first
                if settled and (self.sync.strategy.averages_gradients or not self.sync.unmerged_work()):
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
        while time.monotonic() < deadline and not self._stopping():
            if self.disagrees():
                await self.recover(behind=False)
            if not any(self._waits_for(o) for o in self.sync.others):
                return
            await asyncio.sleep(0.5)
            await self._in_thread(self._refresh)

    def _waits_for(self, other: StageRecord) -> bool:
        mine = self.sync.progress
        if mine.round_ok:  # we can serve the stage's model: laggards recover from us
            return other.round < mine.round or (other.round == mine.round and not other.round_ok)
        if self.sync.fallback() == (mine.round, mine.global_hash):  # nobody agreed; the stage ends on our weights
            return other.round < mine.round or (other.round == mine.round and other.global_hash != mine.global_hash)
        # it may complete the round we failed (then we recover), or still be in its last round: if that fails too,
        # nobody holds an agreed state and the stage settles on one (sync_rules.end_fallback) once all are idle
        return (other.round < mine.round and other.round_ok) or other.syncing

    # ---------------------------------------------------------------------------------------------- recovery
    def disagrees(self) -> bool:
        """Our weights differ from the stage majority's and it is time to try recovering (not soon after giving up)."""
        return bool(self.sync.donors()) and self.sync.progress.round >= self._retry_recovery_at

    async def recover(self, behind: bool) -> bool:
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
            if donors and await self.sync.recover(donors, reason, self._refresh):
                self._recovery_backoff = 1
                return True
            if self._stopping():
                return False
            await asyncio.sleep(min(2.0 ** attempt, 8.0))
            await self._in_thread(self._refresh)
        log.warning(f"stage {self.stage}: no stage peer could serve the stage state ({reason}) after "
                    f"{RECOVERY_TRIES} tries; continuing on this peer's own weights, not voting until a round agrees")
        top = max((o.round for o in self.sync.others if o.round_ok), default=self.sync.progress.round)
        self.sync.progress.round = max(self.sync.progress.round, top)  # take part in the stage's rounds again
        self.sync.progress.round_ok = False
        # next try: some rounds later (each try costs its backoff), not at every step
        self._retry_recovery_at = self.sync.progress.round + self._recovery_backoff
        self._recovery_backoff = min(2 * self._recovery_backoff, 16)
        await self._publish()
        return False
