"""The monitor's aggregation (pure): one window at a time, only fresh records, only training peers alive."""
import math

from swarm_peer.monitor import Seen, aggregate, format_header, format_row
from swarm_peer.records import MetricRecord
from swarm_peer.status import stage_report

H1, H2 = "1111111111111111", "2222222222222222"


def rec(peer, stage, window, loss_sum=0.0, count=0, state="online", rnd=3, h=H1, samples=0, tps=0.0, evals=(),
        delivered=None, received=None):
    return MetricRecord(peer_id=peer, stage=stage, state=state, window=window, period=10.0, round=rnd, inner_step=5,
                        samples=samples, tokens=samples * 128, loss_sum=loss_sum, loss_count=count,
                        evals=list(evals), tokens_per_s=tps, queue=0, inflight=0, sync_seconds=1.5,
                        bytes_sent=10, bytes_received=10, global_hash=h, round_ok=True,
                        delivered=delivered or {}, received=received or {})


def test_only_work_both_sides_report_counts():
    now, seen = 1000.0, Seen()
    records = [
        (rec("a", 0, 7, delivered={"d": 4, "e": 1}), now + 20),
        (rec("b", 0, 7, delivered={"d": 2, "x": 10**6}), now + 20),  # b really tried x (x never served it)
        (rec("d", 1, 7, loss_sum=15.0, count=5, received={"a": 4, "b": 2}), now + 20),  # 6 confirmed: counts its 5
        (rec("e", 1, 7, loss_sum=6.0, count=3, received={"a": 3}), now + 20),  # a handed it 1: mean 2.0, weight 1
        (rec("x", 1, 7, loss_sum=1.0, count=10**6, rnd=10**6), now + 20),  # an outsider: no work it served
        (rec("w", 1, 7, loss_sum=1.0, count=10**6, received={"a": 10**6}), now + 20),  # says a sent it all: a does not
        (rec("y", 1, 7, loss_sum=1.0, count=10**6, received={"y": 10**6}), now + 20),  # vouching for itself ...
        (rec("y", 0, 7, delivered={"y": 10**6}), now + 20),  # ... from another stage: an identity in two stages
        # counts in neither
        (rec("z", 0, 7, tps=1e9, samples=10**9, delivered={"d": 10**6}), now + 20),  # d never said z sent it any
    ]
    row = aggregate(records, window=7, num_stages=2, now=now, seen=seen)
    assert math.isclose(row["loss"], (15.0 + 2.0) / 6) and row["loss_microbatches"] == 6
    assert seen.confirmed == {"a", "b", "d", "e"}
    assert row["alive/stage0"] == 2 and row["alive/stage1"] == 2 and row["round/stage1"] == 3  # none of the liars
    assert row["tokens_per_s"] == 0.0 and row["samples"] == 0  # z's made-up throughput is not added
    later = aggregate([(rec("a", 0, 8), now + 20), (rec("x", 1, 8), now + 20)], window=8, num_stages=2, now=now,
                      seen=seen)
    assert later["alive/stage0"] == 1 and later["alive/stage1"] == 0  # a: confirmed in an earlier window
    evals = [(rec(p, 0, 9, evals=[(10, v)]), now + 20) for p, v in (("a", 2.0), ("b", 2.1), ("e", 0.0))]
    assert aggregate(evals, window=9, num_stages=2, now=now, seen=seen)["eval_loss"] == 2.0  # one low figure does not
    # drag it down
    one_stage = [(rec("a", 0, 7, loss_sum=3.0, count=1), now + 20)]  # a single stage: its own data, nobody to back it
    assert math.isclose(aggregate(one_stage, window=7, num_stages=1, now=now)["loss"], 3.0)


def test_global_loss_and_alive_counts_use_one_window_and_fresh_records():
    now = 1000.0
    records = [
        (rec("a", 0, 7, samples=100, tps=50.0, evals=[(10, 2.0)], delivered={"d": 3, "e": 2, "g": 1}), now + 20),
        (rec("b", 0, 7, samples=60, tps=30.0, evals=[(10, 3.0)], delivered={"d": 1, "f": 1, "h": 1}), now + 20),
        (rec("c", 0, 6, samples=999, tps=999.0), now + 20),  # an older window: not mixed in
        (rec("d", 1, 7, loss_sum=12.0, count=4, received={"a": 3, "b": 1}), now + 20),  # loss 3.0 x 4 microbatches
        (rec("e", 1, 7, loss_sum=4.0, count=2, h=H2, received={"a": 2}), now + 20),  # loss 2.0 x 2, another hash
        (rec("f", 1, 7, loss_sum=5.0, count=1, rnd=4, received={"b": 1}), now + 20),  # a newer round: the top
        (rec("g", 1, 7, loss_sum=100.0, count=1, received={"a": 1}), now - 1),  # expired: neither loss nor alive
        (rec("h", 1, 7, loss_sum=1.0, count=1, state="idle", received={"b": 1}), now + 20),  # done training: loss
        # counts, not alive
        (rec("i", 1, 8, loss_sum=50.0, count=5), now + 20),  # the next window
    ]
    row = aggregate(records, window=7, num_stages=2, now=now)
    assert math.isclose(row["loss"], (12.0 + 4.0 + 5.0 + 1.0) / (4 + 2 + 1 + 1))
    assert row["loss_microbatches"] == 8
    assert row["alive/stage0"] == 2 and row["alive/stage1"] == 3 and row["alive"] == 5
    assert row["tokens_per_s"] == 80.0 and row["samples"] == 160
    assert row["round/stage1"] == 4 and math.isclose(row["hash_agreement/stage1"], 1 / 4)
    assert row["round/stage0"] == 3 and row["hash_agreement/stage0"] == 1.0
    assert math.isclose(row["eval_loss"], 2.5) and math.isclose(row["eval_perplexity"], math.exp(2.5))
    line, header = format_row(row, 2, 3), format_header(2)
    assert line.split()[1:4] == ["3", f"{row['loss']:.4f}", "2.5000"] and "stage1 alive/round/agree" in header
    assert line.split()[-1] == "25%" and len(line) <= len(header) + 2  # columns line up under the header
    # a window with no last-stage report has no loss (rather than a made-up one)
    assert "loss" not in aggregate(records, window=6, num_stages=2, now=now)


def test_status_report_warns_about_empty_lone_and_drifting():
    from swarm_peer.records import PeerInfo
    from tests.test_sync_logic import rec as stage_rec

    peers = [PeerInfo(stage_rec("a", round=3, hash=H1), 120.0), PeerInfo(stage_rec("b", round=3, hash=H1), 120.0),
             PeerInfo(stage_rec("c", round=3, hash=H2), 120.0)]
    report, warnings = stage_report(1, peers, ttl=20.0, now=110.0)
    assert [p["hash_agrees"] for p in report["peers"]] == [True, True, False]
    assert report["live"] == 3 and report["peers"][0]["last_seen_s"] == 10.0
    assert len(warnings) == 1 and "drifting" in warnings[0] and "c"[-8:] in warnings[0]
    _, warnings = stage_report(0, [], ttl=20.0, now=0.0)
    assert "no live peer" in warnings[0]
    _, warnings = stage_report(0, peers[:1], ttl=20.0, now=110.0)
    assert "lone peer" in warnings[0]


def test_an_evaluation_is_logged_once_not_again_in_later_windows():
    now, seen = 1000.0, Seen(confirmed={"a", "b"})
    first = aggregate([(rec("a", 0, 7, evals=[(10, 2.0)]), now + 20)], 7, 2, now, seen)
    assert first["eval_loss"] == 2.0 and first["eval_step"] == 10
    again = aggregate([(rec("a", 0, 8, evals=[(10, 2.0)]), now + 20)], 8, 2, now, seen)
    assert "eval_loss" not in again  # the same evaluation, still carried by the peer's record
    newer = aggregate([(rec("a", 0, 9, evals=[(10, 2.0), (20, 1.5)]), now + 20),
                       (rec("b", 0, 9, evals=[(10, 2.1), (20, 2.5)]), now + 20)], 9, 2, now, seen)
    assert newer["eval_loss"] == 2.0 and newer["eval_step"] == 20


def test_a_step_that_stage_mates_report_in_different_windows_is_one_row():
    """Seen in CI: two stage-0 peers evaluated step 10 a window apart, and each got its own row (10, 10, 20, 20)."""
    now, seen = 1000.0, Seen(confirmed={"a", "b"})
    early = aggregate([(rec("a", 0, 7, evals=[(10, 2.0)]), now + 20), (rec("b", 0, 7), now + 20)], 7, 2, now, seen)
    assert "eval_loss" not in early  # b has not evaluated step 10 yet: wait a window for it
    row = aggregate([(rec("a", 0, 8, evals=[(10, 2.0)]), now + 20), (rec("b", 0, 8, evals=[(10, 3.0)]), now + 20)],
                    8, 2, now, seen)
    assert row["eval_step"] == 10 and row["eval_loss"] == 2.5
    seen.confirmed.add("c")
    late = aggregate([(rec("c", 0, 9, evals=[(10, 9.0)]), now + 20)], 9, 2, now, seen)
    assert "eval_loss" not in late  # a straggler's report of a logged step adds no second row
    alone = aggregate([(rec("a", 0, 10, evals=[(10, 2.0), (20, 1.0)]), now + 20), (rec("b", 0, 10), now + 20)],
                      10, 2, now, seen)
    assert "eval_loss" not in alone
    nobody = aggregate([], 11, 2, now, seen)  # b never evaluates 20 (it left): logged a window later all the same
    assert nobody["eval_step"] == 20 and nobody["eval_loss"] == 1.0


def test_a_monitor_that_starts_late_still_logs_every_evaluation_in_order():
    """Seen in CI: the monitor's first counted window came after step 10's evaluation, so step 0 was never logged."""
    now, seen = 1000.0, Seen(confirmed={"a"})
    logged = []
    for window in range(7, 11):
        row = aggregate([(rec("a", 0, window, evals=[(0, 5.5), (10, 4.0), (20, 3.6)]), now + 20)], window, 2, now, seen)
        logged += [(row["eval_step"], row["eval_loss"])] if "eval_loss" in row else []
    assert logged == [(0, 5.5), (10, 4.0), (20, 3.6)]


def test_a_record_carries_a_bounded_evaluation_history():
    import pydantic.v1 as pydantic
    import pytest

    from swarm_peer.records import EVAL_HISTORY

    with pytest.raises(pydantic.ValidationError):
        rec("a", 0, 7, evals=[(i, 1.0) for i in range(EVAL_HISTORY + 1)])
