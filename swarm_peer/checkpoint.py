"""Checkpoints of one stage peer: periodic, atomic, verified.

File `{dir}/stage{i}.ckpt` = MAGIC + sha256(payload) + payload, payload = torch.save of the peer's state: local
weights, inner AdamW + run clock (the lr schedule's position), outer optimizer (global weights, momentum), round progress, data position, RNG.
Written to a temporary file in the same directory, fsynced, then renamed over the old one (and the directory
fsynced), so a crash leaves either the old or the new checkpoint, never half of one. A file whose hash does not match
(corrupt or truncated) raises CheckpointError: it is reported, never loaded silently.

The state is captured by reference and serialized straight into the file on the compute thread (between steps: it
cannot change meanwhile, and no in-memory copy of a multi-GB state is made); only the fsync and rename run elsewhere.
Reading streams the hash check and loads from the file.
"""
from __future__ import annotations

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


CHUNK = 16 << 20


class _HashingWriter:
    """A file object torch.save streams into: every byte also goes into the sha256."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class _Payload(io.RawIOBase):
    """The payload part of an open checkpoint file, seekable, as torch.load wants it (no copy in memory)."""

    def __init__(self, f, start: int):
        self.f, self.start = f, start

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.f.seek(offset + self.start if whence == io.SEEK_SET else offset, whence) - self.start

    def tell(self) -> int:
        return self.f.tell() - self.start

    def readinto(self, buffer) -> int:
        return self.f.readinto(buffer)


def write_payload(path: Path, state: dict) -> tuple[Path, int]:
    """Serialize `state` into a temporary file beside `path` (call where the state cannot change); returns it and
    the payload's size. `commit` makes it the checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(MAGIC + bytes(32))  # the hash goes here once the payload is written
        writer = _HashingWriter(f)
        torch.save(state, writer)
        size = f.tell() - len(MAGIC) - 32
        f.seek(len(MAGIC))
        f.write(writer.sha.digest())
    return tmp, size


def commit(tmp: Path, path: Path) -> None:
    """fsync the written file, rename it over the old checkpoint, fsync the directory."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_atomic(path: Path, state: dict) -> int:
    tmp, size = write_payload(path, state)
    commit(tmp, path)
    return size


def read_verified(path: Path) -> dict:
    head = len(MAGIC) + 32
    with open(path, "rb") as f:
        start = f.read(head)
        if len(start) < head or not start.startswith(MAGIC):
            raise CheckpointError(f"checkpoint {path} is not a swarm_peer checkpoint or is truncated")
        sha = hashlib.sha256()
        while chunk := f.read(CHUNK):
            sha.update(chunk)
        if sha.digest() != start[len(MAGIC):]:
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated (sha256 mismatch); move it away to "
                                  f"start fresh")
        f.seek(head)
        try:
            return torch.load(io.BufferedReader(_Payload(f, head), CHUNK), map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} could not be read: {e}") from e
