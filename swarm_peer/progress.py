"""How progress reads on a console: durations, counts and the ETA (peers, the baseline and the end-of-run table)."""
from __future__ import annotations


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def count(n: float) -> str:
    """12.3k, 4.56M, 1.20G."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.{1 if suffix == 'k' else 2}f}{suffix}"
    return f"{n:.0f}"


def eta(done: float, total: float, per_second: float) -> str:
    """'ETA 4m10s' at the recent speed; 'ETA -' before there is one."""
    return f"ETA {duration((total - done) / per_second)}" if per_second > 0 and done < total else "ETA -"
