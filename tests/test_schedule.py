"""Learning-rate schedules follow the run, not each peer: a joiner continues at its stage's learning rate, and a later
stage that takes more inner steps than stage 0 (two stage-0 peers feed one stage-1 peer) follows stage 0's schedule
instead of ending its cosine early.

Stage 0: peer a from the start, peer j joins after the warmup. Stage 1: one peer c. Each peer's summary ledger says,
for each of its last inner steps, the lr it used and when (wall time: all peers run on this machine)."""
import bisect
import re
import time

import pytest

pytestmark = pytest.mark.slow
MAX_STEPS, WARMUP = 80, 8


def _lrs_around(ledger: list[dict], t: float, before: int, after: int) -> list[float]:
    """The lrs of the steps a peer took around wall time t: `before` steps back from the last one done by t, `after`
    steps on (the step in progress at t is the first of those)."""
    times = [e["t"] for e in ledger]
    k = bisect.bisect_right(times, t) - 1
    return [e["lr"] for e in ledger[max(0, k - before):k + after + 1]]


def _end_of(ledger: list[dict], steps: int) -> list[float]:
    """The lrs of a peer's last `steps` steps, and of one step after its last: the run's last step may be its stage
    mate's (overlapped rounds align the clocks when a round lands, after the step in progress: the mate that took it
    is half a step on), and a later stage steps at the clock of what it summed."""
    lrs = [e["lr"] for e in ledger[-steps:]]
    return [*lrs, lrs[-1] - (lrs[-2] - lrs[-1])]


def _within(lr: float, allowed: list[float]) -> bool:
    return min(allowed) * (1 - 1e-9) <= lr <= max(allowed) * (1 + 1e-9)


def test_joiner_and_later_stages_follow_the_stage_schedule(swarm_factory):
    swarm = swarm_factory("schedule", ["swarm.num_stages=2", "swarm.sync_every=4", f"run.max_steps={MAX_STEPS}",
                                       f"optim.inner.warmup_steps={WARMUP}", "optim.inner.min_lr_ratio=0.1",
                                       "run.eval_interval=1000"])
    swarm.start("c", 1, faults="slow=0.1")  # slow enough that j joins mid-run
    swarm.wait_ready("c")
    swarm.start("a", 0, "--data-shard", "0/2")
    deadline = time.monotonic() + 240
    while not re.search(r"\| inner step (1[4-9]|[2-9]\d)\b", swarm.log("a")):  # past the warmup
        assert time.monotonic() < deadline and swarm.procs["a"].poll() is None, swarm.log("a")[-3000:]
        time.sleep(0.2)
    swarm.start("j", 0, "--data-shard", "1/2")
    for name in ("a", "j", "c"):
        assert swarm.wait_exit(name, 300) == 0, swarm.log(name)[-3000:]
    a, j, c = (swarm.summary(n)["ledger"] for n in ("a", "j", "c"))
    # the stage mate ran the whole schedule (a few steps more or less than MAX_STEPS: rounds align its clock with j's)
    assert a[0]["clock"] == 0 and MAX_STEPS - 1.5 <= a[-1]["clock"] < MAX_STEPS and abs(len(a) - MAX_STEPS) <= 10, \
        (len(a), a[-1])

    # the joiner's first step uses its stage's lr, give or take a step (not a warmup from zero)
    first = j[0]
    around = _lrs_around(a, first["t"], 1, 2)
    assert _within(first["lr"], around), (f"joiner's first lr {first['lr']:.3e} (its step 1); stage mate's lrs "
                                          f"around then {[f'{x:.3e}' for x in around]}")
    # ... and it ends with its stage's run, not MAX_STEPS of its own later
    joined_at = bisect.bisect_right([e["t"] for e in a], first["t"])  # stage mate's steps done by then
    assert joined_at < MAX_STEPS - 10, f"joined too late to tell ({joined_at})"
    # (rounds align the two clocks at their mean, so the faster of the two takes a few more of the remaining steps:
    # CI once saw the joiner take 53 of 98 after joining at 31; running MAX_STEPS of its own would be 80)
    assert len(j) <= MAX_STEPS - joined_at + 6, f"joiner took {len(j)} steps after joining at step {joined_at}"
    assert _within(j[-1]["lr"], _end_of(a, 2)), (j[-1]["lr"], a[-2:])

    # stage 1 takes more steps than stage 0's peers (it serves both), on stage 0's schedule
    assert len(c) > MAX_STEPS + 5, len(c)
    # (it follows the clocks of what it sums, from both stage-0 peers: CI once saw a pause 3 s while the joiner ran 3
    # steps ahead, and stage 1 with it; its clock never goes back, the joiner's was pulled back by the next round)
    def stage0_lrs(t):
        return _lrs_around(a, t, 1, 2) + (_lrs_around(j, t, 1, 2) if t > j[0]["t"] else [])

    off = [e for e in c if a[1]["t"] < e["t"] < a[-2]["t"] and not _within(e["lr"], stage0_lrs(e["t"]))]
    assert not off, f"{len(off)} of stage 1's {len(c)} steps off stage 0's schedule, e.g. {off[:3]}"
    assert _within(c[-1]["lr"], _end_of(a, 3)), (c[-1]["lr"], [e["lr"] for e in a[-3:]])
    print(f"\njoiner's first lr {first['lr']:.3e} (stage mate around then: {around[0]:.3e}..{around[-1]:.3e}); "
          f"joiner {len(j)} steps, stage 0 peer {len(a)}, stage 1 {len(c)} steps ending at lr {c[-1]['lr']:.3e}")
