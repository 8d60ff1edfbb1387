"""Pure end-of-run decisions: when a later stage is done (swarm_peer/run_end.py), which step stage 0 evaluates
(swarm_peer/evaluation.py)."""
from swarm_peer.run_end import unbacked_grace, upstream_done


def test_upstream_is_done_when_no_record_says_online():
    assert upstream_done(0, None, None, now=5.0, grace=60)
    assert upstream_done(0, 1.0, 2.0, now=5.0, grace=60)


def test_online_claims_are_waited_for_while_no_upstream_peer_has_ended():
    # a pause upstream (a round, a download) is upstream_timeout's business, however long nothing comes
    assert not upstream_done(1, None, None, now=1e6, grace=60)
    assert not upstream_done(2, None, 10.0, now=1e6, grace=60)


def test_after_an_upstream_peer_ended_silent_online_claims_are_believed_for_the_grace_only():
    # an outsider's own record saying "online" for ever, sending nothing: believed for `grace` after the end
    assert not upstream_done(1, ended_at=100.0, heard_at=None, now=159.0, grace=60)
    assert upstream_done(1, ended_at=100.0, heard_at=None, now=161.0, grace=60)
    # the grace counts from the last microbatch that came, if later: a live upstream peer keeps the stage serving
    assert not upstream_done(1, ended_at=100.0, heard_at=150.0, now=200.0, grace=60)
    assert upstream_done(1, ended_at=100.0, heard_at=150.0, now=211.0, grace=60)
    assert upstream_done(1, ended_at=100.0, heard_at=20.0, now=161.0, grace=60)  # older traffic does not extend it


def test_grace_is_bounded_by_the_upstream_timeout():
    assert unbacked_grace(300.0) == 60.0 and unbacked_grace(20.0) == 20.0


def test_evaluation_steps_of_a_run():
    from swarm_peer.evaluation import due_eval_step

    assert due_eval_step(0, None, 10, 40) == 0  # a fresh run: the untrained model first
    assert due_eval_step(0, None, 0, 40) == 0  # ... also with eval_interval 0 (only at the end otherwise)
    assert due_eval_step(17, None, 10, 40) is None  # a joiner: not the state it downloaded
    assert due_eval_step(9, 8, 10, 40) is None and due_eval_step(12, 9, 10, 40) == 10  # the interval crossed
    assert due_eval_step(25, 0, 0, 40) is None and due_eval_step(40, 39, 0, 40) == 40  # interval 0: the last step
    assert due_eval_step(40, 40, 10, 40) is None  # not twice
