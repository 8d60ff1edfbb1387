"""The end of a peer's run: a later stage serves until its previous stage is done (pure decisions on what that
stage's records and traffic show, below); a peer done training stays in its stage's rounds until its mates are done
and lingers for laggards, so all of a stage end on one model (`StageRunEnd`, mixed into StageWorker).

A stage record is a claim anyone can publish under its own key: an outsider's record saying "stage 0, online" for
ever must not keep the next stage serving for ever. Real upstream peers prove they are alive with microbatches, so
once one of them has ended, claims of being online that send nothing are believed for a bounded grace only.
"""
from __future__ import annotations

import asyncio
import logging
import time

from swarm_peer.records import StageRecord

log = logging.getLogger("swarm_peer")


def unbacked_grace(upstream_timeout: float) -> float:
    """How long online claims that send nothing are believed once an upstream peer has ended."""
    return min(60.0, upstream_timeout)


def upstream_done(online: int, ended_at: float | None, heard_at: float | None, now: float, grace: float) -> bool:
    """The previous stage is done when none of its (believed) records says online, or, once one of its peers has
    ended (`ended_at`: when this peer first saw a finished/idle/offline upstream record), when no training microbatch
    has come from upstream (`heard_at`: the last one) for `grace` seconds: what still says online then is a stalled
    or a lying peer, and neither needs this stage to stay."""
    if online == 0:
        return True
    if ended_at is None:
        return False  # nobody upstream has ended: a pause (a round, a download) is waited for by upstream_timeout
    return now - max(ended_at, heard_at if heard_at is not None else ended_at) > grace


class StageRunEnd:
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
