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
