"""The state a donor streams to a downloader, tensor by tensor: read chunk by chunk from the live tensors,
consistently against the state's seqlock version, and received chunk by chunk straight into shared memory (used by
averaging.StageAverager)."""
from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming

from swarm_peer.allreduce import PART_BYTES

MAX_STATE_TENSOR_BYTES = 1 << 33  # 8 GiB: a donor claiming a bigger tensor is refused before anything is allocated
RAW_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}
_DTYPE_NAMES = {dtype: name for name, dtype in RAW_DTYPES.items()}
CHUNK_BYTES = PART_BYTES  # a streamed chunk of a state tensor (the all-reduce's part size)


def stream_consistent(tensors: list, wanted: list[int], version: Callable[[], int], expected: int,
                      chunks: Callable[[torch.Tensor], Iterator[runtime_pb2.Tensor]]) -> Iterator[runtime_pb2.Tensor]:
    """The chunks of `tensors[i]` for i in `wanted`, while the state's version stays `expected` (even). Each tensor's
    last chunk is held back until all of it has been read and the version checked again, as a seqlock reader does: a
    change meanwhile means it may be torn, so the stream ends there, that tensor short (the downloader refuses it;
    its retries ask again)."""
    for index in wanted:
        if expected % 2 or version() != expected or not 0 <= index < len(tensors):
            return
        pieces = chunks(tensors[index])
        held = next(pieces)
        for piece in pieces:
            yield held
            held = piece
        if version() != expected:
            return
        yield held


def raw_chunks(tensor: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> Iterator[runtime_pb2.Tensor]:
    """An uncompressed tensor as hivemind's streamed chunks, read straight from its memory (a live shared tensor):
    one chunk's copy at a time, never a serialized copy of the whole tensor."""
    data = tensor.detach().contiguous()
    raw = data.view(-1).view(torch.uint8).numpy()
    count = max(1, math.ceil(len(raw) / chunk_bytes))
    for k in range(count):
        piece = raw[k * chunk_bytes:(k + 1) * chunk_bytes].tobytes()
        if k == 0:
            yield runtime_pb2.Tensor(compression=runtime_pb2.CompressionType.NONE, buffer=piece, chunks=count,
                                     size=data.shape, dtype=_DTYPE_NAMES[data.dtype], requires_grad=False)
        else:
            yield runtime_pb2.Tensor(buffer=piece)


def shared(serialized: runtime_pb2.Tensor) -> torch.Tensor:
    """A downloaded tensor, moved to shared memory at once: handing the state to the host process then passes file
    descriptors instead of copying every tensor into shared memory while all of them are held (2x the state)."""
    return deserialize_torch_tensor(serialized).share_memory_()


class TensorReceiver:
    """One downloaded tensor, its chunks written straight into a shared-memory tensor as they arrive: no list of
    chunks, no joined copy, no copy into shared memory afterwards (three copies of the largest tensor at peak before,
    one now). The size the first chunk claims is capped before the allocation, and the bytes must fill it exactly.
    Compressed tensors take hivemind's way (join the chunks, decode, then share)."""

    def __init__(self, first: runtime_pb2.Tensor):
        self.out, self.parts, self.filled = None, [first], 0
        dtype = RAW_DTYPES.get(first.dtype)
        if first.compression == runtime_pb2.CompressionType.NONE and dtype is not None:
            shape = tuple(first.size)
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if any(d < 0 for d in shape) or nbytes > MAX_STATE_TENSOR_BYTES:
                raise ValueError(f"a state tensor of shape {shape} {first.dtype} is refused")
            self.out = torch.empty(shape, dtype=dtype).share_memory_()
            self._bytes = self.out.view(-1).view(torch.uint8).numpy()  # the shared buffer itself
            self.parts = []
            self.add(first.buffer)

    def add(self, buffer: bytes) -> None:
        if self.out is None:
            self.parts.append(runtime_pb2.Tensor(buffer=buffer))
            return
        end = self.filled + len(buffer)
        if end > len(self._bytes):
            raise ValueError(f"a state tensor sent more than its {len(self._bytes)} bytes")
        self._bytes[self.filled:end] = np.frombuffer(buffer, dtype=np.uint8)
        self.filled = end

    def result(self) -> torch.Tensor:
        if self.out is None:
            return shared(combine_from_streaming(self.parts))
        if self.filled != len(self._bytes):
            raise ValueError(f"a state tensor ended after {self.filled} of its {len(self._bytes)} bytes")
        return self.out


def serialize_state(compression, tensor: torch.Tensor) -> runtime_pb2.Tensor:
    return compression.compress(tensor, CompressionInfo.from_tensor(tensor), allow_inplace=False)
