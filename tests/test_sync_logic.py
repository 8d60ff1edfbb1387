"""The pure decisions of sync.py: when a round is due, which hash is the stage's, whom to download from."""
from swarm_peer.records import StageRecord
from swarm_peer.routing import Candidate, Router
from swarm_peer.sync_rules import Progress, choose_donors, end_fallback, group_hash, majority_hash, mismatched_mates, round_bits, round_due, stage_peers

H1, H2, H3 = "1111111111111111", "2222222222222222", "3333333333333333"


def rec(peer_id, round=0, steps=0, samples=0, syncing=False, hash=H1, ok=True, state="online", fp="0123456789abcdef",
        mates="0123456789abcdef"):
    return StageRecord(peer_id=peer_id, stage=1, fingerprint=fp, mates_fingerprint=mates, config_summary="t", state=state, client_mode=False,
                       queue=0, inflight=0, max_inflight=4, throughput=1.0, inner_step=0, samples=0, clock=0.0, round=round,
                       round_steps=steps, round_samples=samples, syncing=syncing, global_hash=hash, round_ok=ok,
                       address="")


def test_round_is_due_on_the_stage_average_not_on_one_peer():
    me = Progress(global_hash=H1, round=2, round_steps=12, round_samples=12 * 8)
    slow = [rec("b", round=2, steps=4)]
    assert not round_due(me, slow, every=10, samples_target=None)  # (12 + 4) / 2 < 10: keep going
    assert round_due(me, [rec("b", round=2, steps=8)], every=10, samples_target=None)  # (12 + 8) / 2 = 10
    # peers in other rounds don't count (they are recovering or about to publish)
    assert round_due(me, [rec("b", round=1, steps=0)], every=10, samples_target=None)
    # someone already averaging this round: join now, whatever the counts
    assert round_due(Progress(global_hash=H1, round=2, round_steps=1), [rec("b", round=2, steps=1, syncing=True)],
                     every=10, samples_target=None)
    # an explicit sample target for the whole stage
    assert not round_due(me, slow, every=10, samples_target=200)
    assert round_due(me, [rec("b", round=2, samples=104)], every=10, samples_target=200)
    # lookahead: one more step each and it is due
    assert round_due(Progress(global_hash=H1, round=0, round_steps=9), [rec("b", steps=9)], 10, None, lookahead=1)
    assert not round_due(Progress(global_hash=H1, round=0, round_steps=8), [rec("b", steps=9)], 10, None, lookahead=1)


def test_majority_and_ties():
    assert majority_hash([(H1, "c"), (H2, "a"), (H1, "b")]) == H1
    assert majority_hash([(H1, "c"), (H2, "a")]) == H2  # tie: the smallest peer id's hash, the same for everyone
    assert majority_hash([(H3, "z")]) == H3


def test_group_hash_counts_members_that_held_the_stage_model():
    # a member whose end of the previous all-reduce failed joins with other weights: it neither outvotes nor ties
    assert group_hash({"a": {"hash": H2, "ok": False}, "b": {"hash": H1, "ok": True}}) == H1
    assert group_hash({"a": {"hash": H2, "ok": False}, "b": {"hash": H1}}) == H1  # no "ok": counted as holding it
    assert group_hash({"a": {"hash": H2, "ok": False}, "b": {"hash": H1, "ok": False}}) == H2  # nobody: all count
    assert group_hash({"a": {"hash": H1}, "b": {"hash": H2}, "c": {"hash": H2}}) == H2
    assert group_hash({"a": "garbage"}) is None and group_hash({}) is None


def test_choose_donors():
    me = Progress(global_hash=H2, round=5)
    # outvoted at the same round: download from the majority holders
    assert choose_donors("m", me, [rec("a", round=5, hash=H1), rec("b", round=5, hash=H1)]) == ["a", "b"]
    # agreeing: nothing to do
    assert choose_donors("m", Progress(global_hash=H1, round=5), [rec("a", round=5, hash=H1)]) == []
    # behind the stage: download even if the hash once matched
    assert choose_donors("m", Progress(global_hash=H1, round=4), [rec("a", round=5, hash=H1)]) == ["a"]
    # ahead of everyone: they catch up from me
    assert choose_donors("m", Progress(global_hash=H1, round=6), [rec("a", round=5, hash=H2)]) == []
    # a failed round does not vote: my result loses to a completed one even 1 vs 1
    failed = Progress(global_hash=H2, round=5, round_ok=False)
    assert choose_donors("a", failed, [rec("z", round=5, hash=H1)]) == ["z"]
    # peers that failed their round are no donors and no voters
    assert choose_donors("m", me, [rec("a", round=5, hash=H1, ok=False)]) == []
    # 1 vs 1, both completed: the deterministic tie-break decides, and both sides agree on it
    assert choose_donors("b", Progress(global_hash=H2, round=5), [rec("a", round=5, hash=H1)]) == ["a"]
    assert choose_donors("a", Progress(global_hash=H1, round=5), [rec("b", round=5, hash=H2)]) == []


def test_stage_peers_filters_self_offline_and_other_configs():
    recs = [rec("me"), rec("a"), rec("b", state="finished"), rec("c", fp="ffffffffffffffff", mates="ffffffffffffffff"),
            rec("d", mates="eeeeeeeeeeeeeeee")]  # d: the same model, other training settings (e.g. sync mode)
    assert [r.peer_id for r in stage_peers("me", recs, "0123456789abcdef")] == ["a"]
    assert [r.peer_id for r in mismatched_mates("me", recs, "0123456789abcdef", "0123456789abcdef")] == ["d"]
    assert round_bits(3) == "0000000000000011" and round_bits(65536 + 3) == round_bits(3)


def test_router_avoids_paused_peers_unless_all_are():
    router = Router(4)
    router.update([Candidate("a", throughput=10, paused=True), Candidate("b", throughput=1)])
    assert {router.choose() for _ in range(50)} == {"b"}
    router.update([Candidate("a", throughput=10, paused=True)])
    assert router.choose() == "a"


def test_stage_mates_must_share_sync_mode_optimizer_batch_seed_data_and_codec():
    from swarm_peer.config import load_config
    from swarm_peer.model import mates_fingerprint, stage_fingerprint

    base = load_config(None, [])
    for change in ["swarm.sync_mode=sync", "optim.inner.lr=1e-2", "optim.outer.momentum=0.5", "data.batch_size=32",
                   "run.seed=7", "data.source=/tmp/other.txt", "swarm.compression.averaging=8bit", "swarm.sync_every=3"]:
        other = load_config(None, [change])
        assert mates_fingerprint(other, 1) != mates_fingerprint(base, 1), change
        assert stage_fingerprint(other, 1) == stage_fingerprint(base, 1), change  # neighbours still pipeline
    assert mates_fingerprint(load_config(None, ["run.device=cpu"]), 1) == mates_fingerprint(base, 1)


def test_group_clock_is_the_median_of_valid_claims():
    from swarm_peer.sync_rules import group_clock

    assert group_clock({"a": {"clock": 10}, "b": {"clock": 12}, "c": {"clock": 11}}, 0, 100) == 11
    assert group_clock({"a": {"clock": 10}, "b": {"clock": 12}}, 0, 100) == 11  # even: the middle two's mean
    assert group_clock({"a": {"clock": 10}, "b": {"clock": 11.0}}, 0, 100) == 10.5  # ... exactly: no step gained or lost
    # invalid or out-of-range claims are ignored; none valid: one's own
    assert group_clock({"a": {"clock": 2**40}, "b": {"clock": -3}, "c": {"clock": float("nan")}, "d": "x",
                        "e": {"clock": True}, "f": {"clock": "5"}}, 7, 100) == 7
    # peers past the run's end count as at its end: a late peer in a group of finished ones is pulled to the end
    assert group_clock({"late": {"clock": 8.5}, "b": {"clock": 30.5}, "c": {"clock": 31}}, 0, 30) == 30
    assert group_clock({"a": {"clock": 5}, "evil": {"clock": 100}, "c": {"clock": 6}}, 0, 100) == 6


def test_a_downloaded_state_must_be_sound_and_what_the_stage_agreed_on():
    import torch

    from swarm_peer.diloco import tensors_hash
    from swarm_peer.sync_rules import state_problem, vouched

    shapes = [torch.Size([3, 2]), torch.Size([2])]
    weights = [torch.ones(3, 2), torch.zeros(2)]
    good = tensors_hash(weights)
    diloco = [*weights, torch.zeros(3, 2), torch.zeros(2)]  # global weights + momentum
    meta = {"mode": "diloco", "round": 4, "hash": good}
    assert state_problem(meta, diloco, shapes, "diloco") is None
    assert "non-finite" in state_problem(meta, [*weights, torch.full((3, 2), float("nan")), torch.zeros(2)], shapes,
                                         "diloco")
    assert "hash" in state_problem({**meta, "hash": H2}, diloco, shapes, "diloco")
    assert "shape" in state_problem(meta, diloco[:3], shapes, "diloco")
    assert "shape" in state_problem(meta, [*diloco[:3], torch.zeros(3)], shapes, "diloco")
    assert "mode" in state_problem({**meta, "mode": "sync"}, diloco, shapes, "diloco")
    assert "round" in state_problem({**meta, "round": -1}, diloco, shapes, "diloco")
    sync = [*weights, torch.zeros(3, 2), torch.zeros(2), torch.ones(3, 2), torch.ones(2)]  # + AdamW moments
    smeta = {"mode": "sync", "round": 4, "hash": good, "adam_steps": 7, "inner_step": 7}
    assert state_problem(smeta, sync, shapes, "sync") is None
    assert "inner_step" in state_problem({**smeta, "inner_step": -3}, sync, shapes, "sync")  # a negative lr
    assert "adam_steps" in state_problem({**smeta, "adam_steps": 2.5}, sync, shapes, "sync")
    assert "second moments" in state_problem(smeta, [*sync[:4], -torch.ones(3, 2), torch.ones(2)], shapes, "sync")
    # what the stage agreed on: the majority of its believed records at that round, not the donor's own word
    stage = [rec("d1", round=4, hash=good), rec("d2", round=4, hash=good), rec("liar", round=4, hash=H2)]
    assert vouched(meta, stage) and not vouched({**meta, "hash": H2}, stage)
    assert not vouched({**meta, "round": 9}, stage)  # nobody's record is at that round (yet: the caller re-reads)
    assert not vouched(meta, [rec("d1", round=4, hash=good, ok=False)])  # a record that does not vote


def test_a_download_is_vouched_by_a_majority_seen_in_the_last_looks():
    """A lone fast peer runs rounds faster than records travel: the state it served (round 2) may be gone from the
    records by the time the download is checked (they now say round 4), yet they agreed on it a moment ago."""
    from swarm_peer.sync_rules import remember_agreements, vouched, vouched_recently

    history = {}
    remember_agreements(history, [rec("a", round=2, hash=H1)], now=100.0, keep_s=30.0)
    remember_agreements(history, [rec("a", round=4, hash=H2)], now=101.0, keep_s=30.0)
    served = {"round": 2, "hash": H1}
    assert not vouched(served, [rec("a", round=4, hash=H2)]) and vouched_recently(served, history)
    assert not vouched_recently({"round": 2, "hash": H2}, history)  # a hash nobody agreed on at that round
    remember_agreements(history, [rec("b", round=2, hash=H2, ok=False)], now=102.0, keep_s=30.0)  # no vote: not ok
    assert not vouched_recently({"round": 2, "hash": H2}, history)
    remember_agreements(history, [], now=131.5, keep_s=30.0)  # forgotten after keep_s
    assert not vouched_recently(served, history) and history == {}


def test_a_download_is_vouched_by_the_recent_rounds_records_carry():
    """Records carry their last agreed rounds: a state of round 2 is checkable against records that moved on to
    round 6 even if no earlier look saw round 2 (a stage running rounds back to back, faster than it is read)."""
    from swarm_peer.records import RECENT_ROUNDS
    from swarm_peer.sync_rules import vouched

    def moved_on(peer_id, history, **kw):
        r = rec(peer_id, round=6, hash=H3, **kw)
        return r.copy(update={"recent": history})

    served = {"round": 2, "hash": H1}
    assert vouched(served, [moved_on("a", [(1, H2), (2, H1), (6, H3)])])
    assert not vouched(served, [moved_on("a", [(1, H2), (6, H3)])])  # no record agreed at round 2
    # one vote per peer, and the majority counts: two mates' history outvotes a liar's
    stage = [moved_on("a", [(2, H1)]), moved_on("b", [(2, H1)]), moved_on("liar", [(2, H2)])]
    assert vouched(served, stage) and not vouched({"round": 2, "hash": H2}, stage)
    # a record at that very round votes by its current fields (and not at all when that round failed for it)
    assert not vouched(served, [rec("a", round=2, hash=H1, ok=False).copy(update={"recent": [(2, H1)]})])
    try:
        rec("a").__class__(**{**rec("a").dict(), "recent": [(i, H1) for i in range(RECENT_ROUNDS + 1)]})
    except Exception as e:  # a record is bounded: at most RECENT_ROUNDS of them
        assert "recent rounds" in str(e)
    else:
        raise AssertionError("an oversized history was accepted")


def test_a_stage_where_nobody_agreed_at_the_end_ends_on_one_model():
    me = Progress(global_hash=H2, round=7, round_ok=False)
    idle = [rec("a", round=7, hash=H1, ok=False, state="idle"), rec("c", round=7, hash=H3, ok=False, state="idle")]
    fallback = end_fallback("b", me, idle, idle=True)
    assert fallback == (7, H1)  # three hashes: a tie, to the smallest peer id
    assert choose_donors("b", me, idle, fallback) == ["a"]
    assert choose_donors("a", Progress(global_hash=H1, round=7, round_ok=False),
                         [rec("b", round=7, hash=H2, ok=False, state="idle")], fallback) == []  # a holds it
    # the most held hash wins; a peer behind the newest round downloads it too
    two = [rec("a", round=7, hash=H1, ok=False, state="idle"), rec("c", round=7, hash=H3, ok=False, state="idle"),
           rec("d", round=7, hash=H3, ok=False, state="idle")]
    assert end_fallback("b", Progress(global_hash=H2, round=6, round_ok=False), two, idle=True) == (7, H3)
    # not while anyone trains, is in a round, or holds an agreed state: the rules above settle it then
    assert end_fallback("b", me, idle, idle=False) is None
    assert end_fallback("b", me, [*idle, rec("d", round=7, hash=H3, ok=False, state="online")], idle=True) is None
    assert end_fallback("b", me, [*idle, rec("d", round=7, hash=H3, ok=False, state="idle", syncing=True)], True) is None
    assert end_fallback("b", me, [*idle, rec("d", round=5, hash=H3, ok=True, state="idle")], idle=True) is None
    assert end_fallback("b", Progress(global_hash=H2, round=7), idle, idle=True) is None
    assert end_fallback("b", me, [], idle=True) == (7, H2)  # alone: its own
