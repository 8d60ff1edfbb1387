"""Which stage peers' state claims a peer believes: a record claiming a state that its peer then cannot or will not
serve is ignored for a while (an unproven claim must not steer rounds or recoveries). Pure bookkeeping with an
injectable clock (StageSync holds one)."""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

log = logging.getLogger("swarm_peer")
UNBACKED_CLAIM_S = 120.0  # a stage peer that could not serve the state its record claims is ignored this long
DECLINES_TO_DISTRUST = 3  # ... or declined to serve it this many times in a row, over 2 announce periods at least


class DonorTrust:
    def __init__(self, announce_period: float, clock: Callable[[], float] = time.monotonic):
        self.announce_period, self.clock = announce_period, clock
        self.distrusted: dict[str, float] = {}  # peer id -> until when its records are ignored
        self.declines: dict[str, tuple[int, float]] = {}  # donor -> (refusals in a row, time of the first)

    def trusts(self, peer_id: str) -> bool:
        return self.distrusted.get(peer_id, 0.0) <= self.clock()

    def distrust(self, donor: str, why: str) -> None:
        if self.trusts(donor):
            log.warning(f"stage peer {donor[-8:]} claims a state but {why}; ignoring its records for "
                        f"{UNBACKED_CLAIM_S:g}s")
        self.distrusted[donor] = self.clock() + UNBACKED_CLAIM_S

    def count_declines(self, ahead: Iterable[str], declined: Iterable[str]) -> None:
        """After a download from donors `ahead` of us (their records claim a later round), of which `declined`
        answered without the state. An honest donor ahead declines only while its record lags a failed round (an
        announce period); one whose record goes on claiming an agreed later state it keeps declining to serve is
        not believed."""
        now, declined = self.clock(), set(declined)
        for donor in ahead:
            if donor not in declined:
                self.declines.pop(donor, None)
                continue
            count, since = self.declines.get(donor, (0, now))
            self.declines[donor] = (count + 1, since)
            if count + 1 >= DECLINES_TO_DISTRUST and now - since >= 2 * self.announce_period:
                self.distrust(donor, f"declined to serve it {count + 1} times in a row")
                del self.declines[donor]
