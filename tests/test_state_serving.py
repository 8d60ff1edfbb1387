"""What a DiLoCo donor serves to joiners and recovering peers (real hivemind DHTs and averager processes): the live
global weights and momentum from shared memory, not a copy per request (at GPT-2 small's shape a copy is 0.66 GB
per request), and never a state an outer step is writing meanwhile."""

import torch
from hivemind import DHT

from swarm_peer.state_transfer import stream_consistent
from swarm_peer.compute import ComputeThread, StageTrainer
from swarm_peer.config import load_config
from swarm_peer.model import stage_fingerprint, stage_param_shapes
from swarm_peer.sync import StageSync
from tests.swarm_harness import FAST


def _peer(cfg, dht):
    compute = ComputeThread()
    sync = StageSync(cfg, 0, dht, "serve", stage_param_shapes(cfg, 0), compute, stage_fingerprint(cfg, 0))
    sync.attach(StageTrainer(cfg, 0, torch.device("cpu")))
    return sync


def test_a_donor_serves_its_live_outer_state_and_never_one_being_written():
    cfg = load_config(None, [*FAST, "swarm.num_stages=2"])
    first = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs())
    donor, joiner = _peer(cfg, first), _peer(cfg, second)
    try:
        with torch.no_grad():
            for b in donor.outer.buffers:
                b.normal_()  # momentum that differs from the joiner's zeros
        live = [*donor.outer.global_params, *donor.outer.buffers]
        meta, served = donor._state_for_download()
        assert all(s.data_ptr() == t.data_ptr() for s, t in zip(served, live))  # no copy on the donor's side ...
        assert all(t.is_shared() for t in live)  # ... nor when it crosses to the averager process
        n = len(live)
        got = joiner.averager.download_state([str(first.peer_id)], n, timeout=30)
        assert got is not None and got[0]["hash"] == donor.progress.global_hash
        assert all(torch.equal(a, b) for a, b in zip(got[1], live))
        with donor.averager.state_writing():  # an outer step or a state load in progress: nothing is served
            assert joiner.averager.download_state([str(first.peer_id)], n, timeout=30) is None
        assert joiner.averager.last_declined == [str(first.peer_id)]
        assert joiner.averager.download_state([str(first.peer_id)], n, timeout=30) is not None  # and after it, again
    finally:
        for sync in (donor, joiner):
            sync.shutdown()
            sync.compute.stop()
        second.shutdown()
        first.shutdown()


def test_a_stream_stops_when_the_state_changes_under_it():
    from hivemind.compression import deserialize_torch_tensor
    from hivemind.utils.streaming import combine_from_streaming

    from swarm_peer.state_transfer import raw_chunks

    version = [2]
    tensors = [torch.zeros(300), torch.ones(300), torch.full((300,), 2.0)]

    def chunks(t):  # 400-byte chunks: three per tensor
        for k, chunk in enumerate(raw_chunks(t, 400)):
            if t[0] == 1.0 and k == 1:
                version[0] += 1  # an outer step began while the second tensor was being read
            yield chunk
    out = list(stream_consistent(tensors, [0, 1, 2], lambda: version[0], 2, chunks))
    # the first tensor whole; of the second only the chunks before its held-back last one: the downloader sees a
    # short tensor and refuses it
    assert len(out) == 3 + 2 and torch.equal(deserialize_torch_tensor(combine_from_streaming(out[:3])), tensors[0])
    assert out[3].dtype and not out[4].dtype
    whole = list(stream_consistent(tensors, [2, 0], lambda: 2, 2, raw_chunks))
    assert [torch.equal(deserialize_torch_tensor(combine_from_streaming([c])), t)
            for c, t in zip(whole, (tensors[2], tensors[0]))] == [True, True]  # one chunk each at the default size
    assert not list(stream_consistent(tensors, [0], lambda: 3, 3, raw_chunks))  # odd: being written
    assert not list(stream_consistent(tensors, [5], lambda: 2, 2, raw_chunks))  # not a tensor of this state


def test_a_downloaded_tensor_is_received_straight_into_shared_memory_and_checked():
    import pytest
    from hivemind.compression import NoCompression
    from hivemind.utils.streaming import split_for_streaming

    from swarm_peer.compression import compression_strategy
    from swarm_peer.state_transfer import TensorReceiver, serialize_state

    tensor = torch.randn(300, 77)

    def receive(serialized, chunk=4096):
        chunks = list(split_for_streaming(serialized, chunk))
        receiver = TensorReceiver(chunks[0])
        for c in chunks[1:]:
            receiver.add(c.buffer)
        return receiver.result()

    got = receive(serialize_state(NoCompression(), tensor))
    assert torch.equal(got, tensor) and got.is_shared() and got.dtype == torch.float32
    half = receive(serialize_state(compression_strategy("fp16"), tensor))  # compressed: hivemind's way
    assert half.is_shared() and torch.allclose(half, tensor, atol=2e-3)

    first, *rest = split_for_streaming(serialize_state(NoCompression(), tensor), 4096)
    short = TensorReceiver(first)
    with pytest.raises(ValueError, match="ended after"):
        short.result()  # a donor that stopped mid-tensor
    extra = TensorReceiver(first)
    for c in rest:
        extra.add(c.buffer)
    with pytest.raises(ValueError, match="more than"):
        extra.add(b"\0" * 4)
    huge = serialize_state(NoCompression(), torch.zeros(2))
    huge.size[:] = [1 << 20, 1 << 20]  # a claim of 4 TiB: refused before anything is allocated
    with pytest.raises(ValueError, match="refused"):
        TensorReceiver(huge)
