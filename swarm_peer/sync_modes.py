"""The sync modes as strategies: what a stage's rounds average, what the stage's shared state is (hashed, served to
joiners, downloaded), and how an average is applied. StageSync (sync.py) runs every mode's rounds the same way; the
stepper asks the mode where its rounds sit around the inner step:

    none     inner step                                  (replicas train independently: an experiment's control)
    sync     gradient round -> inner step on the average (SWARM's data parallelism: replicas stay identical)
    diloco   inner step ... H steps ... -> outer round   (outer Nesterov on the averaged pseudo-gradient)
             overlapped (swarm.overlap_rounds): begin_round -> inner steps go on while it runs -> land at a later step
"""
from __future__ import annotations

import torch

from swarm_peer.compute import StageTrainer
from swarm_peer.config import Config
from swarm_peer.diloco import CHUNK, OuterOptimizer, tensors_hash


class Independent:
    """`none`: no rounds. The state is the replica's weights and its AdamW moments."""
    name = "none"
    averages_gradients = False  # a round before every inner step, on the gradients (sync)
    outer_rounds = False  # rounds after inner steps, when due, on the weights (diloco)
    outer: OuterOptimizer | None = None
    overlapping = False  # an overlapped round is running: its contribution is from `begin_round`'s snapshot

    def __init__(self, cfg: Config, trainer: StageTrainer):
        self.cfg, self.trainer = cfg, trainer

    def state_hash(self) -> str:
        return tensors_hash([p.detach().cpu() for p in self.trainer.params])

    def state_tensors(self, meta: dict) -> tuple[dict, list[torch.Tensor]]:
        """(meta, tensors) a joiner downloads; called on the compute thread, so the snapshot is consistent."""
        adam_steps, moments = self.trainer.inner_state_tensors()
        return {**meta, "adam_steps": adam_steps}, [p.detach().cpu().clone() for p in self.trainer.params] + moments

    def num_state_tensors(self) -> int:
        return 3 * len(self.trainer.params)

    @torch.no_grad()
    def load_state(self, meta: dict, tensors: list[torch.Tensor]) -> None:
        n = len(self.trainer.params)
        for p, t in zip(self.trainer.params, tensors[:n]):
            p.copy_(t.to(p.device, p.dtype))
        self.trainer.load_inner_state(int(meta.get("adam_steps", 0)), tensors[n:], int(meta.get("inner_step", 0)))

    def round_samples(self, round_samples: int, completed: int) -> int:
        """The samples this peer's contribution stands for (its weight in the average)."""
        return completed

    def contribute(self, out: list[torch.Tensor], completed: int) -> None:
        """Write this peer's contribution into `out` (the averager's buffers)."""
        raise NotImplementedError(f"sync_mode {self.name} has no rounds")

    def apply(self, delta: list[torch.Tensor]) -> None:
        """Apply the round's result (the average, or this peer's own contribution when it averaged with nobody)."""
        raise NotImplementedError(f"sync_mode {self.name} has no rounds")

    def begin_round(self, overlap: bool) -> None:
        """At a round's start, on the compute thread with the window drained."""

    def land(self) -> None:
        """An overlapped round's result reaches the local weights (compute thread, window drained)."""

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass


class GradientSync(Independent):
    """`sync`: before every inner step the stage's peers average their batch-mean gradients (weighted by samples);
    the step then uses the average, so replicas with one init, one AdamW state and one average stay identical."""
    name = "sync"
    averages_gradients = True

    def contribute(self, out: list[torch.Tensor], completed: int) -> None:
        self.trainer.mean_gradients(completed, out)  # p.grad is unchanged during a round (the window is closed)

    def apply(self, delta: list[torch.Tensor]) -> None:
        self.trainer.set_gradients(delta)  # the stepper's inner step follows (grads_are_mean)


class DiLoCo(Independent):
    """`diloco`: inner AdamW steps on the local weights; a round averages θ_global − θ_local (weighted by the
    round's samples) and applies the outer SGD-Nesterov step to the global copy, which the local weights then take.
    The state is the global copy and the outer momentum (AdamW's moments stay each peer's own)."""
    name = "diloco"
    outer_rounds = True

    def __init__(self, cfg: Config, trainer: StageTrainer):
        super().__init__(cfg, trainer)
        self.outer = OuterOptimizer(trainer.params, cfg.optim.outer)
        self.snapshot: list[torch.Tensor] | None = None  # θ_local when an overlapped round began

    def state_hash(self) -> str:
        return self.outer.global_hash()

    def state_tensors(self, meta: dict) -> tuple[dict, list[torch.Tensor]]:
        return meta, self.outer.state_tensors()

    def num_state_tensors(self) -> int:
        return 2 * len(self.trainer.params)

    def load_state(self, meta: dict, tensors: list[torch.Tensor]) -> None:
        self.outer.load_state_tensors(tensors)
        self.outer.load_into(self.trainer.params)

    def round_samples(self, round_samples: int, completed: int) -> int:
        return round_samples  # all inner steps since the last outer step

    @torch.no_grad()
    def begin_round(self, overlap: bool) -> None:
        """Overlapped (`swarm.overlap_rounds`): keep θ_local as it is now. The round averages Δ = θ_global − snapshot
        (every attempt writes it afresh from there) while inner training moves the local weights on."""
        self.overlapping = overlap
        if overlap:
            if self.snapshot is None:  # 4 B per parameter, on the CPU (memory.py counts it)
                self.snapshot = [torch.empty_like(g) for g in self.outer.global_params]
            for s, p in zip(self.snapshot, self.trainer.params):
                s.copy_(p.detach())

    def contribute(self, out: list[torch.Tensor], completed: int) -> None:
        # blocking rounds: the local weights do not move during the round (the window is closed)
        self.outer.pseudo_gradient(self.snapshot if self.overlapping else self.trainer.params, out=out)

    def apply(self, delta: list[torch.Tensor]) -> None:
        self.outer.step(delta)
        if not self.overlapping:
            self.outer.load_into(self.trainer.params)

    @torch.no_grad()
    def land(self) -> None:
        """θ_local ← θ_global + (θ_local − snapshot): the new global weights plus what inner training did since the
        round began, so no inner step is lost and none is counted twice (the next round's Δ holds it). With no inner
        step between, exactly θ_global (x − x is 0)."""
        if not self.overlapping:
            return
        self.overlapping = False
        for p, g, s in zip(self.trainer.params, self.outer.global_params, self.snapshot):
            for p_, g_, s_ in zip(p.detach().view(-1).split(CHUNK), g.view(-1).split(CHUNK), s.view(-1).split(CHUNK)):
                p_.copy_(torch.add(g_, p_.to("cpu", torch.float32) - s_))

    def state_dict(self) -> dict:
        return self.outer.state_dict(copy=False)

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None:
            self.outer.load_state_dict(state)


MODES = {m.name: m for m in (DiLoCo, GradientSync, Independent)}


def make_mode(cfg: Config, trainer: StageTrainer) -> Independent:
    return MODES[cfg.swarm.sync_mode](cfg, trainer)
