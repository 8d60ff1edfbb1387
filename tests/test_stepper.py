"""stepper.next_action, the stepper's decision after each inner step, and its phase clock (pure logic; the stepper
itself runs in every multi-process test)."""
import itertools

import pytest

from swarm_peer.stepper import Action, AfterStep, Phase, Stepper, next_action


def _facts(mode="diloco", **kw) -> AfterStep:
    base = dict(outer_rounds=mode == "diloco", round_due=False, round_asked=False, stopping=False, behind=False, disagrees=False,
                checkpoint_due=False)
    return AfterStep(**{**base, **kw})


def _plan(round_finds_behind=False, **kw) -> list[Action]:
    """The actions one step takes, the facts held fixed except what the actions themselves settle (and, with
    `round_finds_behind`, what the outer round finds out)."""
    done, plan = set(), []
    while (action := next_action(_facts(**kw, done=frozenset(done)))) is not Action.REOPEN:
        assert action not in done and len(plan) < 5, plan
        done.add(action)
        plan.append(action)
        if action is Action.LAND:  # the overlapped round is over once landed
            kw.update(round_running=False, round_landed=False)
        if action is Action.OUTER_ROUND and round_finds_behind:
            kw.update(behind=True)
        if action is Action.RECOVER:
            kw.update(behind=False, disagrees=False)
    return plan


def test_nothing_due_reopens_at_once():
    assert _plan() == []
    assert _plan(mode="sync", round_due=True) == [] and _plan(mode="none", round_asked=True) == []


def test_diloco_round_then_recovery_then_checkpoint_each_once():
    assert _plan(round_due=True) == [Action.OUTER_ROUND]
    assert _plan(round_asked=True) == [Action.OUTER_ROUND]  # the end of training asks for the last merge
    assert _plan(round_due=True, round_finds_behind=True, checkpoint_due=True) == [
        Action.OUTER_ROUND, Action.RECOVER, Action.CHECKPOINT]
    assert _plan(disagrees=True) == [Action.RECOVER]
    # known before the round: recovered first (a round from other weights than the mates' would not vote)
    assert _plan(round_due=True, disagrees=True) == [Action.RECOVER, Action.OUTER_ROUND]
    assert _plan(round_due=True, behind=True) == [Action.RECOVER, Action.OUTER_ROUND]
    assert _plan(mode="sync", behind=True) == [Action.RECOVER]  # sync mode's round failed before the step


def test_a_stopping_peer_starts_no_round_but_still_recovers_and_checkpoints():
    assert _plan(round_due=True, stopping=True, disagrees=True, checkpoint_due=True) == [
        Action.RECOVER, Action.CHECKPOINT]


def test_an_overlapped_round_lands_at_a_step_and_is_waited_for_only_when_needed():
    assert _plan(round_running=True) == []  # still running: training goes on
    assert _plan(round_running=True, round_due=True) == []  # never a second round while one runs
    assert _plan(round_running=True, round_landed=True) == [Action.LAND]
    assert _plan(round_running=True, round_landed=True, round_due=True) == [Action.LAND, Action.OUTER_ROUND]
    # the end of training, a recovery, a checkpoint: the stage state must be settled first
    assert _plan(round_running=True, callers_wait=True, round_asked=True) == [Action.LAND, Action.OUTER_ROUND]
    assert _plan(round_running=True, checkpoint_due=True) == [Action.LAND, Action.CHECKPOINT]
    assert _plan(round_running=True, behind=True) == [Action.LAND, Action.RECOVER]
    # landed on a failed side, the next round overdue (rounds back to back): the recovery comes between them
    assert _plan(round_running=True, round_landed=True, round_due=True, disagrees=True) == [
        Action.LAND, Action.RECOVER, Action.OUTER_ROUND]
    assert _plan(round_running=True, round_overdue=True, round_due=True, behind=True) == [
        Action.LAND, Action.RECOVER, Action.OUTER_ROUND]
    # H inner steps since it began and still out: waited for, so an update is never more than one round late
    assert _plan(round_running=True, round_overdue=True, round_due=True) == [Action.LAND, Action.OUTER_ROUND]


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=9)))
def test_every_combination_ends_in_reopen_in_order(flags):
    round_due, round_asked, stopping, behind, disagrees, checkpoint_due, running, landed, overdue = flags
    landed, overdue = running and landed, running and overdue
    for mode in ("diloco", "sync", "none"):
        plan = _plan(mode=mode, round_due=round_due, round_asked=round_asked, stopping=stopping, behind=behind,
                     disagrees=disagrees, checkpoint_due=checkpoint_due, round_running=running, round_landed=landed,
                     callers_wait=round_asked, round_overdue=overdue)
        order = [Action.LAND, Action.RECOVER, Action.OUTER_ROUND, Action.CHECKPOINT]
        assert plan == sorted(plan, key=order.index)
        settles = landed or running and (overdue or round_asked or behind or disagrees or checkpoint_due)
        assert (Action.LAND in plan) == settles
        assert (Action.OUTER_ROUND in plan) == (mode == "diloco" and not stopping and (round_due or round_asked) and (
            settles or not running))
        assert (Action.RECOVER in plan) == (behind or disagrees)
        assert (Action.CHECKPOINT in plan) == checkpoint_due


def test_phase_clock_accounts_every_second_once(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("swarm_peer.stepper.time.monotonic", lambda: now[0])
    stepper = Stepper.__new__(Stepper)  # only the phase clock: no model, no swarm
    stepper.phase_seconds = {p.value: 0.0 for p in Phase}
    stepper.begin()
    now[0] = 110.0
    stepper.enter(Phase.DRAINING, at=107.0)  # the window closed at 107, seen drained at 110
    stepper.enter(Phase.STEPPING)
    now[0] = 111.0
    stepper.enter(Phase.AVERAGING)
    now[0] = 115.0
    stepper.enter(Phase.TRAINING)
    now[0] = 116.0
    stepper.enter(Phase.DRAINING, at=90.0)  # closed before TRAINING began (the window was closed again at once)
    now[0] = 117.0
    report = stepper.phase_report()
    assert report["training"] == 7.0 and report["draining"] == 3.0 + 2.0 and report["stepping"] == 1.0
    assert report["averaging"] == 4.0 and sum(report.values()) == 17.0
    # what same-stage sync kept the peer from serving: DRAINING + AVERAGING, not STEPPING or TRAINING
    assert Stepper.sync_blocked_share(report, 17.0) == (5.0 + 4.0) / 17.0
