"""A stage peer that is behind its stage or disagrees with its majority downloads the stage's state, retrying with
backoff; after giving up it goes on with its own state, not voting, and tries again rounds later; mixed into
StageWorker (the decisions on donors and soundness are in sync.py and sync_rules.py)."""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("swarm_peer")
RECOVERY_TRIES = 5  # state downloads before a peer goes on with its own state (backoff 1, 2, 4, 8 s between)


class StageRecovery:
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
