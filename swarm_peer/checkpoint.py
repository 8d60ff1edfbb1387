"""Checkpoints of one stage peer: periodic, atomic, verified.

File `{dir}/stage{i}.ckpt` = MAGIC + sha256(payload) + payload, payload = torch.save of the peer's state: local
weights, inner AdamW + run clock (the lr schedule's position), outer optimizer (global weights, momentum), round progress, data position, RNG.
Written to a temporary file in the same directory, fsynced, then renamed over the old one (and the directory
fsynced), so a crash leaves either the old or the new checkpoint, never half of one. A file whose hash does not match
(corrupt or truncated) raises CheckpointError: it is reported, never loaded silently.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from pathlib import Path

import torch

MAGIC = b"SWARMPEER-CKPT-1\n"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted (corrupt, truncated, from another stage or config)."""


def checkpoint_path(directory: str | os.PathLike, stage: int) -> Path:
    return Path(directory) / f"stage{stage}.ckpt"


def write_atomic(path: Path, state: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(MAGIC + hashlib.sha256(payload).digest() + payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return len(payload)


def read_verified(path: Path) -> dict:
    data = path.read_bytes()
    head = len(MAGIC) + 32
    if len(data) < head or not data.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {path} is not a swarm_peer checkpoint or is truncated")
    payload = data[head:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC):head]:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (sha256 mismatch); move it away to start fresh")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be read: {e}") from e


def capture(worker) -> dict:
    """The peer's state (run on its compute thread, between steps, so it is consistent)."""
    t, sync = worker.trainer, worker.sync
    return {
        "stage": worker.stage, "fingerprint": worker.fingerprint, "mode": sync.mode,
        "model": {k: v.detach().cpu().clone() for k, v in t.model.state_dict().items()},
        "inner_opt": t.opt.state_dict(), "clock": t.clock, "inner_step": t.inner_step,
        "samples_stepped": t.samples_stepped, "outer": sync.outer.state_dict() if sync.outer else None,
        "progress": dataclasses.asdict(sync.progress),
        "sampler": worker.sampler.state() if worker.sampler is not None else None,
        "rng": torch.get_rng_state(),
    }


def restore(worker, state: dict) -> None:
    """Load a captured state into a freshly built peer (before it serves)."""
    from swarm_peer.sync_rules import Progress

    if state.get("stage") != worker.stage or state.get("fingerprint") != worker.fingerprint:
        raise CheckpointError(f"checkpoint is of stage {state.get('stage')} / config {state.get('fingerprint')}, "
                              f"this peer is stage {worker.stage} / config {worker.fingerprint}")
    if state.get("mode") != worker.sync.mode:
        raise CheckpointError(f"checkpoint was taken in sync_mode {state.get('mode')}, this peer runs {worker.sync.mode}")
    t = worker.trainer
    t.model.load_state_dict(state["model"])
    t.opt.load_state_dict(state["inner_opt"])
    t.inner_step, t.samples_stepped = int(state["inner_step"]), int(state["samples_stepped"])
    t.clock = float(state.get("clock", t.inner_step))  # checkpoints before the run clock: the peer's own steps
    if worker.sync.outer is not None and state.get("outer") is not None:
        worker.sync.outer.load_state_dict(state["outer"])
    worker.sync.progress = Progress(**{**state["progress"], "syncing": False})
    if worker.sampler is not None and state.get("sampler") is not None:
        worker.sampler.load_state(state["sampler"])
    torch.set_rng_state(state["rng"])
