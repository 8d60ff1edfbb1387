"""The state a donor streams to a downloader, tensor by tensor: read consistently against the state's seqlock
version, and received straight into shared memory (used by averaging.StageAverager)."""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.proto import runtime_pb2


def stream_consistent(tensors: list, wanted: list[int], version: Callable[[], int], expected: int,
                      serialize: Callable) -> Iterator:
    """Serialize `tensors[i]` for i in `wanted` while the state's version stays `expected` (even): a change while
    one was read means it may be torn, so the stream ends there (the downloader's short reply fails its download;
    its retries ask again). Each tensor is checked after it was copied out, as a seqlock reader does."""
    if expected % 2 or version() != expected:
        return
    for index in wanted:
        if not 0 <= index < len(tensors):
            return
        serialized = serialize(tensors[index])
        if version() != expected:
            return
        yield serialized


def shared(serialized: runtime_pb2.Tensor) -> torch.Tensor:
    """A downloaded tensor, moved to shared memory at once: handing the state to the host process then passes file
    descriptors instead of copying every tensor into shared memory while all of them are held (2x the state)."""
    return deserialize_torch_tensor(serialized).share_memory_()


def serialize_state(compression, tensor: torch.Tensor) -> runtime_pb2.Tensor:
    return compression.compress(tensor, CompressionInfo.from_tensor(tensor), allow_inplace=False)
