"""Checkpoint files: atomic, verified; a corrupt or truncated one is reported, never loaded."""
import pytest
import torch

from swarm_peer.checkpoint import CheckpointError, read_verified, write_atomic


def test_round_trip_is_atomic_and_verified(tmp_path):
    path = tmp_path / "ck" / "stage1.ckpt"
    state = {"w": torch.randn(50, 20), "step": 7, "nested": {"m": [torch.ones(3)]}}
    write_atomic(path, state)
    write_atomic(path, {**state, "step": 8})  # replaces the old one in one rename
    got = read_verified(path)
    assert got["step"] == 8 and torch.equal(got["w"], state["w"]) and torch.equal(got["nested"]["m"][0], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["stage1.ckpt"]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_checkpoints_are_refused(tmp_path, damage):
    path = tmp_path / "stage0.ckpt"
    write_atomic(path, {"w": torch.randn(100)})
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-10] ^= 0xFF
    elif damage == "garbage":
        data = bytearray(b"not a checkpoint at all" * 10)
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checkpoint"):
        read_verified(path)


def test_a_checkpoint_holds_the_state_of_the_moment_it_was_taken(tmp_path):
    """The state is written where it was captured (on the compute thread, between steps): steps that follow cannot
    leak into it (before, the inner AdamW state was captured by reference and written by another thread while
    training went on: a checkpoint could pair step k's weights with step k+1's moments)."""
    from swarm_peer.checkpoint import commit, write_payload
    from swarm_peer.compute import StageTrainer
    from swarm_peer.config import load_config
    from tests.swarm_harness import FAST

    cfg = load_config(None, [*FAST, "swarm.num_stages=2"])
    t = StageTrainer(cfg, 0, torch.device("cpu"))
    t.opt.zero_grad()
    for p in t.params:
        p.grad = torch.ones_like(p)
    t.opt.step()
    in_order = [p for group in t.opt.param_groups for p in group["params"]]  # the state_dict's numbering
    before = [t.opt.state[p]["exp_avg"].clone() for p in in_order]
    path = tmp_path / "stage0.ckpt"
    tmp, nbytes = write_payload(path, t.state_dict())  # the trainer's part of a peer's state_dict, by reference
    t.opt.step()  # training goes on while the file is fsynced and renamed elsewhere
    commit(tmp, path)
    got = read_verified(path)
    assert nbytes > 0 and all(torch.equal(got["inner_opt"]["state"][i]["exp_avg"], b) for i, b in enumerate(before))
