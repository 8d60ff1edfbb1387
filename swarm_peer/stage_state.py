"""A stage's shared state: what a donor serves (a consistent snapshot taken on the compute thread), and how a joining
or recovering peer downloads it from several donors, checks it (sound, and what the stage's records agree on) and
applies it. A part of StageSync (sync.py), which holds the attributes used here."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import torch

from swarm_peer.compute import STEP
from swarm_peer.sync_rules import (Progress, choose_donors, end_fallback, group_clock, state_problem, vouched,
                                   vouched_recently)

log = logging.getLogger("swarm_peer")


class StageState:
    """Mixed into StageSync: uses its cfg, mode, me, training, compute, trainer, strategy, averager, progress, trust,
    others, agreed, recoveries, rounds, note_agreed()."""
    # ---- what this peer's state is, and what a downloader gets
    def _state_tensors(self) -> tuple[dict, list[torch.Tensor]]:
        meta = {"round": self.progress.round, "hash": self.progress.global_hash, "mode": self.mode,
                "inner_step": self.trainer.inner_step, "clock": self.trainer.clock}
        return self.strategy.state_tensors(meta)

    def _state_for_download(self):
        # runs in hivemind's state-sharing thread; the compute thread makes the snapshot consistent
        if not self.progress.round_ok and self.fallback() != (self.progress.round, self.progress.global_hash):
            return {"round": -1}, []  # never share a state the stage has not agreed on (or ends on: end_fallback)
        return self.compute.call(STEP, self._state_tensors, timeout=60)

    @torch.no_grad()
    def _apply_state(self, meta: dict, tensors: list[torch.Tensor], clock: float) -> None:
        with self.averager.state_writing():  # no download reads the served state meanwhile
            self.strategy.load_state(meta, tensors)
        self.trainer.discard_gradients()
        self.trainer.clock = clock
        self.clock_pending = True  # the stage trains on while this peer starts up: catch up at its first step
        self.progress = Progress(global_hash=self.strategy.state_hash(), round=int(meta["round"]))
        self.note_agreed()

    # ---- recovery and joining
    def donors(self) -> list[str]:
        if self.mode == "none" or self.progress.syncing:
            return []
        fallback = self.fallback()
        donors = choose_donors(self.me, self.progress, self.others, fallback)
        if fallback is not None and fallback != self._fallback_told:  # once per (round, hash)
            self._fallback_told = fallback
            log.warning(f"no stage peer holds an agreed state at the run's end; the stage ends on round {fallback[0]} "
                        f"weights {fallback[1]} (the most held, ties to the smallest peer id): "
                        f"{'downloading them' if donors else 'this peer holds them'}")
        return donors

    def fallback(self) -> tuple[int, str] | None:
        """The (round, hash) the stage ends on when nobody holds an agreed state (sync_rules.end_fallback)."""
        return end_fallback(self.me, self.progress, list(self.others), idle=not self.training)

    def top_peers(self) -> list[str]:
        """The voting peers at the newest round (donors when this peer knows it is behind)."""
        voters = [o for o in self.others if o.round_ok]
        top = max((o.round for o in voters), default=-1)
        return [o.peer_id for o in voters if o.round == top]

    async def join(self, refresh) -> None:
        """Before serving: adopt the stage's current state from its peers; the first peer keeps the seeded init."""
        loop = asyncio.get_running_loop()
        view = await loop.run_in_executor(None, refresh)
        for _ in range(5):  # a failed read is no proof that this peer is the stage's first
            if not view.unreadable:
                break
            await asyncio.sleep(1.0)
            view = await loop.run_in_executor(None, refresh)
        if self.mode == "none" or not view.others:
            log.info("no stage peers online; starting from the seeded init")
            return
        self.progress.round_ok = False  # not a voter until it holds the stage's state
        # mates that exist but of which none votes (each failed its last round, which leaves it out of the vote
        # until its next one agrees) hold no agreed state to download, and the seeded init is not the stage's
        # either: wait for a vote. Taking "no donor" for "mine is the stage's" once restarted a stage from scratch
        wait_until = time.monotonic() + max(10.0, self.cfg.swarm.averaging_timeout)
        tries = 0
        while tries < 10:
            donors = self.donors()
            voting = any(o.round_ok for o in self.others)
            if donors:
                tries += 1
                if await self.recover(donors, "joining the stage", refresh):
                    self.progress.round_ok = True
                    return
            elif voting or not self.others:  # what the voters hold is mine (the stage's first round), or all left
                self.progress.round_ok = True
                return
            elif time.monotonic() > wait_until:
                log.warning(f"no stage peer has voted for {max(10.0, self.cfg.swarm.averaging_timeout):.0f}s (their "
                            f"rounds keep failing)")
                break
            await asyncio.sleep(1.0)
            await loop.run_in_executor(None, refresh)
        log.warning("could not download the stage state; starting from the seeded init")
        self.progress.round_ok = True

    def _believed(self, meta: dict) -> bool:
        """Is a downloaded (round, hash) what the stage agreed on (now or recently), or what it ends on?"""
        return (vouched(meta, self.others) or vouched_recently(meta, self.agreed)
                or self.fallback() == (meta.get("round"), meta.get("hash")))

    async def recover(self, donors: list[str], reason: str, refresh=None) -> bool:
        """Download the stage state from `donors` and apply it if it is sound and what the stage's records agree on
        (`refresh`: blocking re-read of the records, for when they lag the state)."""
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        timeout = max(30.0, self.cfg.swarm.averaging_timeout)
        result = await loop.run_in_executor(None, self.averager.download_state, donors, self.strategy.num_state_tensors(),
                                            timeout)
        for donor in self.averager.last_unserved:  # its record claims a state, no averager of its answers: a record
            self.trust.distrust(donor, "runs no averager")  # with nothing behind it is not believed for a while
        # a round ahead of ours that its peer will not serve is a claim nobody backs; a mate at our round that
        # declines is merely not sharing
        self.trust.count_declines([o.peer_id for o in self.others if o.peer_id in donors and o.round > self.progress.round],
                                  self.averager.last_declined)
        if result is None:
            log.warning(f"could not download the stage state from {len(donors)} donor(s); will retry")
            return False
        meta, tensors = result
        problem = state_problem(meta, tensors, [p.shape for p in self.trainer.params], self.mode)
        for _ in range(3 if problem is None and refresh is not None else 0):
            if self._believed(meta):
                break
            await asyncio.sleep(self.cfg.swarm.announce_period)  # the donors' records may lag their state
            await loop.run_in_executor(None, refresh)
        else:
            if problem is None and not self._believed(meta):
                problem = f"round {meta['round']} weights {meta['hash']} are not what the stage's records agree on"
        if problem:
            log.warning(f"downloaded stage state refused ({problem}); discarded")
            return False
        # the run clock: the donors' published ones and the one served, by median (one donor cannot set it alone)
        claims = {o.peer_id: {"clock": o.clock} for o in self.others if o.peer_id in donors}
        clock = group_clock({**claims, "served": {"clock": meta.get("clock")}}, self.trainer.clock, self.cfg.run.max_steps)
        await self.compute.run(STEP, lambda: self._apply_state(meta, tensors, clock))
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        event = {"reason": reason, "round": meta["round"], "hash": meta["hash"], "clock": clock, "donors": len(donors),
                 "bytes": nbytes, "seconds": time.monotonic() - t0}
        self.recoveries.append(event)
        log.warning(f"stage state recovered ({reason}): round {meta['round']}, run step {clock:g}, weights {meta['hash']}, "
                    f"{nbytes / 2**20:.1f} MiB from {len(donors)} donor(s) in {event['seconds']:.1f}s")
        return True

    # ---- checkpoints and the summary
    def state_dict(self) -> dict:
        return {"mode": self.mode, "outer": self.strategy.state_dict(),
                "progress": dataclasses.asdict(self.progress)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"checkpoint was taken in sync_mode {state.get('mode')}, this peer runs {self.mode}")
        self.strategy.load_state_dict(state.get("outer"))
        self.progress = Progress(**{**state["progress"], "syncing": False})
        self.note_agreed()

    def summary(self) -> dict:
        if self.mode == "none":  # no rounds: the replica's own current weights
            self.progress.global_hash = self.strategy.state_hash()
        group = self.group.stats.snapshot() if self.group is not None else None
        return {"mode": self.mode, "round": self.progress.round, "global_hash": self.progress.global_hash,
                "rounds": self.rounds, "recoveries": self.recoveries, **({"standing_group": group} if group else {})}
