"""When a non-first stage's work is over: pure decisions on what the previous stage's records and traffic show.

A stage record is a claim anyone can publish under its own key: an outsider's record saying "stage 0, online" for
ever must not keep the next stage serving for ever. Real upstream peers prove they are alive with microbatches, so
once one of them has ended, claims of being online that send nothing are believed for a bounded grace only.
"""
from __future__ import annotations


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
