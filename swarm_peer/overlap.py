"""Overlapped outer rounds (DiLoCo, `swarm.overlap_rounds`): a part of StageSync (sync.py). `begin_round` fixes what
the round averages (a snapshot of the local weights), the round runs while the peer trains and serves, and `land`
hands its update to the local weights at a later inner step (sync_modes.DiLoCo.land). `overdue`: a round still out
when the next would be due is waited for, so an update lands at most one round late."""
from __future__ import annotations

from swarm_peer.compute import STEP


class OverlappedRounds:
    """Mixed into StageSync: uses its cfg, strategy, compute, trainer, progress, training, background, _began,
    _since_began."""
    @property
    def overlaps(self) -> bool:
        """Outer rounds run while inner training goes on (`swarm.overlap_rounds`; DiLoCo only)."""
        return self.cfg.swarm.overlap_rounds and self.strategy.outer_rounds

    def overdue(self) -> bool:
        """An overlapped round still out when the next would be due: this peer has trained H inner steps since it
        began (with `sync_samples`: as many samples as it put into it). The stepper then waits for it, so an outer
        update lands at most one round late and rounds keep their cadence of H inner steps."""
        if not self.background:
            return False
        steps, samples = self._since_began
        if self.cfg.swarm.sync_samples:
            return samples >= max(1, self._began[1])
        return steps >= self.cfg.swarm.sync_every

    async def begin_round(self, overlap: bool) -> None:
        """An outer round begins (the stepper, with the window drained): what it averages is fixed now. Overlapped,
        the peer reopens its window right after and runs the round in the background (`run_round`, then `land`)."""
        def begin():
            self.strategy.begin_round(overlap)
            self._began = (self.progress.round_steps, self.progress.round_samples, self.trainer.clock)
            self._since_began = (0, 0)
        await self.compute.run(STEP, begin)
        self.background = overlap

    async def land(self, metrics: dict | None) -> None:
        """An overlapped round has ended (the stepper, with the window drained): the outer update reaches the local
        weights, and the run clock moves by the group's alignment (the inner steps since the round began stay)."""
        def land():
            if metrics is not None:
                metrics["overlapped_steps"] = self._since_began[0]  # inner steps trained while it ran
                self.strategy.land()
                aligned = self.trainer.clock + metrics["clock"] - self._began[2]
                clock = aligned if self.training else max(self.trainer.clock, metrics["clock"])
                self.trainer.clock = min(max(clock, 0.0), float(self.cfg.run.max_steps))
            else:
                self.strategy.overlapping = False  # behind or failed: a recovery replaces the weights
        await self.compute.run(STEP, land)
        self.background = self.progress.syncing = False
