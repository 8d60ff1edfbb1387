"""Sync mode's standing group (standing_group.py): its chunking, and a reducer's checks and decisions, alone; its
rounds between real peers are in test_diloco_swarm's sync-mode run."""
import asyncio

import pytest
import torch

from swarm_peer.standing_group import CHUNK_VALUES, INCOMPLETE, StandingGroup, chunk_bounds, sees_only, segments


class Peer:
    def __init__(self, peer_id):
        self.peer_id = peer_id

    def __str__(self):
        return self.peer_id


def test_chunks_cover_the_buffer_once_at_least_one_per_member():
    for total, members in [(10, 2), (10, 3), (CHUNK_VALUES * 3 + 5, 2), (1, 1)]:
        bounds = chunk_bounds(total, members)
        assert len(bounds) >= members and bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(a < b or total < members for a, b in bounds) and all(b1 == a2 for (_, b1), (a2, _) in zip(bounds, bounds[1:]))
        assert max(b - a for a, b in bounds) <= max(CHUNK_VALUES, -(-total // members))
    assert segments([3, 4, 5], 2, 9) == [(0, 2, 3), (1, 0, 4), (2, 0, 2)]
    assert segments([3, 4, 5], 3, 7) == [(1, 0, 4)]


def test_a_group_stands_only_while_every_member_sees_just_its_groupmates():
    pair = {"a": {"fast": True, "mates": 1}, "b": {"fast": True, "mates": 1}}
    assert sees_only(pair)
    assert not sees_only({**pair, "b": {"fast": True, "mates": 2}})  # b sees a joiner: matchmake again
    assert not sees_only({**pair, "b": {"mates": 1}})  # b runs no standing group
    assert not sees_only({"a": {"fast": True, "mates": 0}}) and not sees_only({"a": "junk", "b": {"fast": True}})


def _group(me="b", members=("a", "b")):
    group = StandingGroup(me, [6, 4], lanes=None, wait_s=0.3, weight_cap=lambda n: 100.0)
    group.form(members, 5)
    return group


def _meta(of, **changes):
    return {"group": of.gid, "round": 5, "chunk": 1, "weight": 2.0, "gather": {"round": 5}, **changes}


def test_a_reducer_refuses_what_no_member_sends():
    group = _group()  # b reduces chunk 1 of 2 (values 5..10)
    good = [torch.ones(5)]
    cases = [
        (_meta(group, group="other"), good, Peer("a"), INCOMPLETE),  # another group id
        (_meta(group), good, Peer("z"), INCOMPLETE),  # not a member
        (_meta(group, chunk=0), good, Peer("a"), "bad round or chunk"),  # a chunk it does not reduce
        (_meta(group, chunk=7), good, Peer("a"), "bad round or chunk"),
        (_meta(group, weight=1e9), good, Peer("a"), "weight"),
        (_meta(group, weight=float("nan")), good, Peer("a"), "weight"),
        (_meta(group), [torch.ones(4)], Peer("a"), "malformed"),
        (_meta(group), [torch.full((5,), float("inf"))], Peer("a"), "malformed"),
        (_meta(group), [torch.ones(5, dtype=torch.float64)], Peer("a"), "malformed"),
        (_meta(group, round=50), good, Peer("a"), INCOMPLETE),  # far from this peer's round
    ]
    group.current = 5
    for meta, tensors, sender, expected in cases:
        with pytest.raises((ValueError, RuntimeError), match=expected):
            asyncio.run(group.handle(meta, tensors, sender))
    assert not any(c.got for c in group._chunks.values())  # nothing was added


def test_a_chunk_is_averaged_once_everyone_is_in_or_failed_for_everyone():
    async def both():
        group = _group()
        group.current = 4  # b has not begun round 5 yet: a's part waits for b's
        remote = asyncio.ensure_future(group.handle(_meta(group, weight=1.0), [torch.full((5,), 3.0)], Peer("a")))
        await asyncio.sleep(0.05)
        chunk = group._chunk(5, 1)
        await group._add(chunk, "b", 3.0, {"round": 5, "me": True}, torch.full((5,), 7.0))
        reply, (average,) = await remote
        assert torch.equal(average, torch.full((5,), (1 * 3.0 + 3 * 7.0) / 4))
        assert set(reply["gathered"]) == {"a", "b"}
        # a member that never comes: the chunk fails for everyone, and stays failed
        group.current = 6
        with pytest.raises(RuntimeError, match=INCOMPLETE):
            await group.handle(_meta(group, round=6), [torch.ones(5)], Peer("a"))
        late = group._chunk(6, 1)
        await group._add(late, "b", 1.0, {}, torch.ones(5))
        assert late.failed and late.result is None
    asyncio.run(both())


@pytest.mark.slow
def test_a_standing_group_takes_a_joiner_loses_a_killed_member_and_stays_one_model(swarm_factory):
    """Real peers, one stage in sync mode: a and b begin together; after their first hivemind round their rounds go
    over the standing group. c joins: a and b see it outside their group, so their next round matchmakes and takes it in, then a standing group
    of three. b is killed
    (kill -9): the group's next round never completes anywhere (b's chunks get no average), so it is retried
    through hivemind, and a and c go on as a standing pair. Every agreed round leaves one hash; a and c end on one
    model."""
    from hivemind import DHT

    from swarm_peer.records import make_validators

    swarm = swarm_factory("standing", ["swarm.num_stages=1", "swarm.sync_mode=sync", "run.eval_interval=1000"])
    boot = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=make_validators("standing", 1))
    try:
        _standing_group_run(swarm, boot)
    finally:
        boot.shutdown()


def _standing_group_run(swarm, boot) -> None:
    import time

    swarm.bootstrap = str(boot.get_visible_maddrs()[0])
    steps = 400
    go = swarm.tmp / "go"
    for name in ("a", "b"):
        swarm.start(name, 0, "--max-steps", str(steps), faults=f"hold_until={go},slow=0.03")
    swarm.begin_together(("a", "b"), go)

    def wait_for(name, pattern, timeout=120):
        deadline = time.monotonic() + timeout
        while pattern not in swarm.log(name):
            assert time.monotonic() < deadline and swarm.procs[name].poll() is None, swarm.log(name)[-3000:]
            time.sleep(0.2)

    def standing(name, size, timeout=180):
        """Wait until the peer's group has been `size` for 2 s (a member whose side of the forming round failed
        stays out, and the others' first round over the group then falls back: CI)."""
        deadline, since = time.monotonic() + timeout, None
        while True:
            lines = [line for line in swarm.log(name).splitlines() if "standing group" in line]
            ok = bool(lines) and f"standing group of {size} " in lines[-1]
            since = (since or time.monotonic()) if ok else None
            if since is not None and time.monotonic() - since > 2:
                return
            assert time.monotonic() < deadline and swarm.procs[name].poll() is None, swarm.log(name)[-3000:]
            time.sleep(0.2)

    wait_for("a", "standing group of 2")
    swarm.start("c", 0, "--max-steps", str(steps), faults="slow=0.03")
    standing("a", 3)  # rounds of three (a and b saw c outside their group: the next round matchmade)
    swarm.kill("b")
    wait_for("a", "the standing group's all-reduce did not complete")
    wait_for("a", "standing group of 2", timeout=180)  # (the log's first one was before c came)
    for name in ("a", "c"):
        assert swarm.wait_exit(name, 400) == 0, swarm.log(name)[-3000:]
    a, c = swarm.summary("a"), swarm.summary("c")
    assert a["sync"]["global_hash"] == c["sync"]["global_hash"]
    hashes: dict[int, set] = {}
    for s in (a, c):
        for r in s["sync"]["rounds"]:
            if r["ok"]:
                hashes.setdefault(r["round"], set()).add(r["weights_hash"])
    assert all(len(h) == 1 for h in hashes.values()), {k: v for k, v in hashes.items() if len(v) > 1}
    fast = [r for r in a["sync"]["rounds"] if r["outcome"] == "averaged over the standing group"]
    sizes = [r["group_size"] for r in fast]
    assert 2 in sizes and 3 in sizes and sizes.index(3) < len(sizes) - 1 - sizes[::-1].index(2), sizes
    assert len(fast) >= 0.7 * len(a["sync"]["rounds"]), [(r["round"], r["group_size"], r["outcome"][:30])
                                                         for r in a["sync"]["rounds"]]
