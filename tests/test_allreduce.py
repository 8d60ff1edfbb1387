"""allreduce.InPlaceParts: averaged parts land in the local tensors themselves, nothing full-size is held (at GPT-2
small's shape hivemind's stock container held ~2 copies of the stage's buffers: scripts/averaging_memory.py)."""
import asyncio

import torch

from swarm_peer.allreduce import InPlaceParts


def _container(tensors, fractions=(0.5, 0.5)):
    return InPlaceParts(tensors, fractions, part_size_bytes=400, return_deltas=False)  # 100 values per part


def test_averaged_parts_are_written_into_the_local_tensors_and_not_kept():
    tensors = [torch.arange(1000, dtype=torch.float32), torch.ones(10, 20)]
    originals = [t.clone() for t in tensors]
    container = _container(tensors)
    assert sum(container.num_parts_by_peer) == 10 + 2

    async def run():
        outputs = []

        async def consume():
            async for t in container.iterate_output_tensors():
                outputs.append(t)
        consumer = asyncio.create_task(consume())
        for peer in (1, 0):  # any order of peers
            for i, (part, _) in enumerate(list(container._input_parts_by_peer[peer])):
                container.register_processed_part(peer, i, part * 2 + 1)  # a fresh tensor, as decoded off the wire
                assert sum(p.numel() for q in container._output_parts_by_peer for p in q) == 0
        await asyncio.wait_for(consumer, 5)
        return outputs

    outputs = asyncio.run(run())
    assert [o is t for o, t in zip(outputs, tensors)] == [True, True]  # the tensors themselves, no concatenated copy
    for t, o in zip(tensors, originals):
        assert torch.equal(t, o * 2 + 1)


def test_a_failed_reducer_leaves_our_own_values_and_is_counted():
    tensors = [torch.arange(600, dtype=torch.float32)]
    container = _container(tensors)

    async def run():
        async def consume():
            return [t async for t in container.iterate_output_tensors()]
        consumer = asyncio.create_task(consume())
        for i, (part, _) in enumerate(list(container._input_parts_by_peer[0])):
            container.register_processed_part(0, i, torch.zeros_like(part))
        container.register_processed_part(1, 0, torch.full((100,), -1.0))  # peer 1 sends one part, then fails
        container.register_failed_reducer(1)
        return await asyncio.wait_for(consumer, 5)

    (out,) = asyncio.run(run())
    assert torch.equal(out[:300], torch.zeros(300)) and torch.equal(out[300:400], torch.full((100,), -1.0))
    assert torch.equal(out[400:], torch.arange(400, 600, dtype=torch.float32))  # unaveraged: our own values
    assert container.failed_size == 200


def test_results_after_the_end_of_a_round_change_nothing():
    tensors = [torch.zeros(200)]
    container = _container(tensors)
    container.finalize()  # a failed or cancelled round
    container.register_processed_part(0, 0, torch.ones(100))
    assert torch.equal(tensors[0], torch.zeros(200))


# hivemind internals that allreduce.py and averaging.py override or lean on, with the sha256 (first 12 hex digits)
# of their source in the pinned hivemind 1.1.12. Any change underneath (another version, a patched install) must be
# read before it is trusted: our subclasses copy these methods' logic and touch these attributes.
PINNED_HIVEMIND = "1.1.12"
PINNED_SOURCES = {
    "partition.TensorPartContainer.__init__": "b652a9b72673",
    "partition.TensorPartContainer.register_processed_part": "ff5ebad6141c",
    "partition.TensorPartContainer.register_failed_reducer": "89b41b9d7f22",
    "partition.TensorPartContainer.iterate_output_tensors": "3bc3c7e743c4",
    "partition.TensorPartContainer.finalize": "519239d6747c",
    "allreduce.AllReduceRunner.__init__": "597a0c8dbbea",
    "allreduce.AllReduceRunner.run": "d145a0e368a5",
    "allreduce.AllReduceRunner._communicate_with_peer": "d910885e9727",
    "allreduce.AllReduceRunner._accumulate_parts_streaming": "6c5a3c726606",
    "allreduce.AllReduceRunner._generate_input_for_peer": "c91d3343d3e6",
    "allreduce.AllReduceRunner.rpc_aggregate_part": "c66765f4ad58",
    "averager.DecentralizedAverager._run_allreduce_inplace_": "914d57cffc7d",
    "averager.DecentralizedAverager._step": "dfbb4416e9eb",
    "averager.DecentralizedAverager.rpc_join_group": "a0c1dec1f516",
    "averager.DecentralizedAverager.rpc_download_state": "fd2f6f19e7d2",
    "averager.DecentralizedAverager._get_current_state_from_host_process": "ea407a807936",
    "averager.DecentralizedAverager.step": "0bccfba139de",
    "matchmaking.Matchmaking._request_join_group": "df823040a94d",
    "key_manager.GroupKeyManager.update_key_on_group_assembled": "aa20396d475c",
}


def test_the_hivemind_internals_we_override_are_the_pinned_ones():
    import hashlib
    import importlib
    import inspect

    import hivemind

    assert hivemind.__version__ == PINNED_HIVEMIND
    changed = []
    for name, digest in PINNED_SOURCES.items():
        module, cls, method = name.split(".")
        obj = getattr(getattr(importlib.import_module(f"hivemind.averaging.{module}"), cls), method)
        if hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:12] != digest:
            changed.append(name)
    assert not changed, f"hivemind changed under swarm_peer/allreduce.py and averaging.py: {changed}"


def test_finite_check_catches_nan_and_both_infinities_in_every_float_dtype():
    from swarm_peer.validation import all_finite as finite
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        part = torch.randn(1000).to(dtype)
        assert finite(part) and finite(part[:0])
        for bad in (float("nan"), float("inf"), float("-inf")):
            spoiled = part.clone()
            spoiled[537] = bad
            assert not finite(spoiled), (dtype, bad)
