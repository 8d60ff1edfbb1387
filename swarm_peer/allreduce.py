"""hivemind's butterfly all-reduce, changed in what a reducer returns and where the results go.

- **Values, not deltas.** hivemind's AllReduceRunner hands back *deltas* (average − my input), each compressed on
  its way back, so every peer ends with its own input + its own rounding of the delta: replicas differ by
  compression error, and under DiLoCo they drift apart as a random walk. Here a reducer returns the *value* of its
  averaged part, compressed once with the stage's codec; every groupmate, the reducer included, decodes those same
  bytes, so a completed round leaves identical averages everywhere.
- **In place.** hivemind keeps every averaged part until a whole tensor has arrived and then concatenates it: two
  extra copies of the stage's buffers in the averager process at peak (0.7 GB at GPT-2 small's shape). Each part
  here is written into the averaged buffer the moment it arrives: our own part for that slice has already been sent
  and reduced by then, so nothing still needs it.
- **Checked inputs.** Shape, finiteness and weight are checked before a part touches an accumulator; a sender of a
  malformed one is reported (`on_malformed`) and the round fails. A reducer that fails leaves its parts at the peer's
  own values (hivemind's behaviour); they are counted, and the caller fails the round.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
from typing import AsyncIterator, Callable

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartContainer
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import aiter_with_timeout

from swarm_peer.validation import all_finite

log = logging.getLogger("swarm_peer")
# one message of the all-reduce or of a state download (hivemind's default). Measured at GPT-2-small size
# (scripts/averaging_memory.py): 1 MiB parts make an isolated round ~18 % faster but leave 0.4-0.5x the buffers more
# in one averager's heap (glibc keeps the freed 1 MiB blocks), so the smaller part stays
PART_BYTES = 1 << 19
SENT, RECEIVED, FAILED_VALUES = 0, 1, 2  # indices of the traffic counters
_REGISTERED = torch.empty(0)  # what the part container keeps of a part once it is written in place


class InPlaceParts(TensorPartContainer):
    """hivemind's part container, with each averaged part written straight into its slice of the local tensors."""

    def register_processed_part(self, peer_index: int, part_index: int, part: torch.Tensor):
        if self.finished.is_set():
            return  # the all-reduce already ended (failed or cancelled): nothing reads results any more
        view = self._input_parts_by_peer[peer_index][part_index][0]  # a view of the shared buffer
        if part is not view:  # (a failed reducer's parts are our own values: already there)
            view.copy_(part)
        super().register_processed_part(peer_index, part_index, _REGISTERED)

    async def iterate_output_tensors(self):
        """Yields the local tensors themselves, once every part of every peer has been written into them."""
        assert not self._outputs_consumed, "output tensors are already iterated and no longer available."
        self._outputs_consumed = True
        for peer_index in range(self.group_size):
            self._output_parts_by_peer[peer_index].clear()
            while self._outputs_registered_by_peer[peer_index] < self.num_parts_by_peer[peer_index]:
                self._output_part_available[peer_index].clear()
                await self._output_part_available[peer_index].wait()
                if self.finished.is_set():
                    raise AllreduceException("All-reduce was terminated during iteration")
                self._output_parts_by_peer[peer_index].clear()
        for tensor in self.local_tensors:
            yield tensor


class ValueAllReduceRunner(AllReduceRunner):
    """Butterfly all-reduce whose reducers return averaged values (see the module docstring)."""

    def __init__(self, *, traffic=None, on_malformed: Callable[[PeerID], None] = lambda peer: None,
                 max_weight: float = math.inf, **kwargs):
        super().__init__(**kwargs)
        self._on_malformed = on_malformed
        self._max_weight = max_weight  # no honest groupmate can claim more samples than this
        container = self.tensor_part_container
        container.__class__ = InPlaceParts  # (same state; see its docstring)
        container.return_deltas = False  # a failed reducer's parts keep our own values (counted as failed)
        own = self.ordered_peer_ids.index(self.peer_id)
        self._own_infos = [info for _, info in container._input_parts_by_peer[own]]
        self._results: dict[int, tuple[runtime_pb2.Tensor, int]] = {}  # part -> (the bytes every groupmate gets,
        self._results_lock = threading.Lock()  # how many have taken them): dropped once every sender has
        self._traffic = traffic

    def _count(self, index: int, nbytes: int) -> None:
        if self._traffic is not None:
            with self._traffic.get_lock():
                self._traffic[index] += nbytes

    def _result(self, part_index: int, averaged: torch.Tensor) -> runtime_pb2.Tensor:
        """Compress an averaged part once; every sender of this part (us included) gets these same bytes, and then
        they are dropped: kept for the whole round they were half a stage's buffers."""
        with self._results_lock:  # executor threads
            if part_index not in self._results:
                compression = self.tensor_part_container.compression
                self._results[part_index] = (compression.compress(averaged, self._own_infos[part_index]), 0)
            message, taken = self._results[part_index]
            if taken + 1 >= self.tensor_part_reducer.num_senders:
                del self._results[part_index]
            else:
                self._results[part_index] = (message, taken + 1)
        return message

    def _check_part(self, part: torch.Tensor, shape: torch.Size, who: str, peer: PeerID) -> None:
        if part.shape != shape or not part.is_floating_point() or not all_finite(part):
            self._on_malformed(peer)
            raise AllreduceException(f"{who} sent a malformed part {tuple(part.shape)} {part.dtype} (expected {tuple(shape)})")

    async def _communicate_with_peer(self, peer_id: PeerID):
        peer_index = self.ordered_peer_ids.index(peer_id)
        container = self.tensor_part_container
        loop = asyncio.get_running_loop()
        if peer_id == self.peer_id:  # we reduce our own share too
            sender_index = self.sender_peer_ids.index(peer_id)
            for part_index, part in enumerate(self.parts_for_local_averaging):
                averaged = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part, weight=self.weight)
                message = await loop.run_in_executor(None, self._result, part_index, averaged)
                container.register_processed_part(peer_index, part_index, deserialize_torch_tensor(message))
            return
        shapes, part_index = [part.shape for part, _ in container._input_parts_by_peer[peer_index]], 0
        try:
            done_sending = asyncio.Event()

            async def inputs():
                async for message in self._generate_input_for_peer(peer_index):
                    self._count(SENT, len(message.tensor_part.buffer))
                    yield message
                done_sending.set()

            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs())
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()
            async for message in aiter_with_timeout(stream, self.reducer_timeout):
                if message.code != averaging_pb2.AVERAGED_PART:
                    raise AllreduceException(f"{peer_id} sent {averaging_pb2.MessageCode.Name(message.code)}")
                if part_index >= len(shapes):
                    raise AllreduceException(f"{peer_id} sent more parts than expected")
                self._count(RECEIVED, len(message.tensor_part.buffer))
                part = await loop.run_in_executor(None, deserialize_torch_tensor, message.tensor_part)
                self._check_part(part, shapes[part_index], f"reducer {peer_id}", peer_id)
                container.register_processed_part(peer_index, part_index, part)
                part_index += 1
            if part_index != container.num_parts_by_peer[peer_index]:
                raise AllreduceException(f"reducer {peer_id} sent {part_index} of {len(shapes)} parts")
        except BaseException as e:
            if isinstance(e, Exception):
                log.warning(f"averaging: reducer {str(peer_id)[-8:]} failed after {part_index} of {len(shapes)} parts: {e!r}")
            container.register_failed_reducer(peer_index)
            raise

    async def _accumulate_parts_streaming(self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int):
        loop = asyncio.get_running_loop()
        part_index = 0
        try:
            async for message in stream:
                if part_index >= self.tensor_part_reducer.num_parts:
                    raise AllreduceException("sender sent more parts than expected")
                self._count(RECEIVED, len(message.tensor_part.buffer))
                part = await loop.run_in_executor(None, deserialize_torch_tensor, message.tensor_part)
                sender = self.sender_peer_ids[sender_index]
                self._check_part(part, self.parts_for_local_averaging[part_index].shape, f"sender {sender_index}", sender)
                if not (math.isfinite(message.weight) and 0 <= message.weight <= self._max_weight):
                    self._on_malformed(sender)
                    raise AllreduceException(f"sender {sender_index} sent weight {message.weight}")
                try:
                    averaged = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, part, weight=message.weight)
                except BannedException:
                    break
                result = await loop.run_in_executor(None, self._result, part_index, averaged)
                part_index += 1
                self._count(SENT, len(result.buffer))
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=result)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                log.warning(f"averaging: sender {sender_index} stopped after {part_index} of "
                            f"{self.tensor_part_reducer.num_parts} parts")
                await self._ban_sender(self.sender_peer_ids[sender_index])
