"""A peer's gradient window: admission control for one inner step's worth of samples.

Microbatches are admitted until `data.batch_size` samples are in; then nothing more until every admitted one has
finished its backward (or been abandoned) and the stepper reopens the window after the step (compute.py's module
docstring: why this makes every gradient exact). A same-stage round closes it early; senders of refused requests
see `busy` and route around it.
"""
from __future__ import annotations

import asyncio
import time

from swarm_peer.transport import Busy


class GradientWindow:
    """Admission control for one inner step's worth of samples (see the module docstring)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.admitted = self.pending = 0
        self.waiting = 0  # microbatches blocked in admit(): the peer's queue
        self.closed_early_at: float | None = None  # when close() shut it before it was full (a round is due)
        self._open = asyncio.Event()
        self._open.set()
        self._drained = asyncio.Event()
        self._reject = asyncio.Event()

    async def admit(self, samples: int, rejectable: bool = False) -> None:
        """Wait for the window to open; a `rejectable` caller (a remote request) gets a busy error instead when the
        window closes for a same-stage sync, which can take seconds (its sender reroutes or retries)."""
        self.waiting += 1
        try:
            while not self._open.is_set():
                if rejectable and self._reject.is_set():
                    raise Busy("synchronizing with stage peers")
                waits = [asyncio.ensure_future(self._open.wait())]
                if rejectable:
                    waits.append(asyncio.ensure_future(self._reject.wait()))
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
        finally:
            self.waiting -= 1
        self.admitted += samples
        self.pending += 1
        if self.admitted >= self.batch_size:
            self._open.clear()

    def finish(self) -> None:
        self.pending -= 1
        if self.pending == 0 and not self._open.is_set():
            self._drained.set()

    async def wait_full(self) -> None:
        """Wait until the window is closed and drained (what was computed is counted by the trainer)."""
        await self._drained.wait()

    def close(self, reject_waiting: bool = True) -> None:
        """Close now, whatever is admitted (a sync is due): wait_full() returns once in-flight work drains."""
        if self._open.is_set():
            self.closed_early_at = time.monotonic()
        self._open.clear()
        if reject_waiting:
            self._reject.set()
        if self.pending == 0:
            self._drained.set()

    def close_partial(self) -> bool:
        """At the end of a run: close a partly filled window so it gets stepped. False if there is nothing."""
        if self.admitted == 0:
            return False
        self._open.clear()
        if self.pending == 0:
            self._drained.set()
        return True

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def reopen(self) -> None:
        self.admitted = self.pending = 0
        self.closed_early_at = None
        self._drained.clear()
        self._reject.clear()
        self._open.set()
