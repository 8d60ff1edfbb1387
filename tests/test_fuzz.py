"""Hostile input: the stream parser and the request checks either accept a well-formed request or reject it with
their own error type; nothing else escapes, nothing is accepted that a stage could not use. Thousands of generated
cases (derandomized, so CI sees the same ones)."""
import asyncio
import math

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm_peer.transport import STATS, Limits, ProtocolError, _receive
from swarm_peer.validation import RequestShape, validate_hidden_request, validate_token_request
from hivemind.proto import runtime_pb2

SHAPE = RequestShape(samples=2, seq_len=4, hidden=3, vocab=11)
FUZZ = settings(max_examples=700, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
COUNTS = {"accepted": 0, "rejected": 0}

dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                          torch.int8, torch.uint8, torch.bool])
dims = st.sampled_from([0, 1, 2, 3, 4, 5, 11, 12])
shapes = st.one_of(st.lists(dims, min_size=0, max_size=4), st.sampled_from([[2, 4, 3], [1, 4, 3], [2, 4], [1, 4]]))
specials = st.sampled_from([0.0, 1.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e30, 10.0, 11.0, -3.0])


@st.composite
def tensors(draw):
    dtype, shape = draw(dtypes), draw(shapes)
    numel = math.prod(shape)
    values = draw(st.lists(specials, min_size=numel, max_size=numel)) if numel <= 64 else [0.0] * numel
    t = torch.tensor(values, dtype=torch.float64).reshape(shape)
    if not dtype.is_floating_point:
        t = torch.nan_to_num(t, nan=0, posinf=100, neginf=-100).clamp(-100, 100)
    return t.to(dtype)


@st.composite
def near_valid(draw, token_ids: bool):
    """A well-formed request, then maybe one thing broken: a dtype, a value (NaN, inf, out of range), a dimension."""
    n = draw(st.integers(1, 2))
    first = torch.randint(0, 11, (n, 4)) if token_ids else torch.randn(n, 4, 3)
    labels = torch.randint(0, 11, (n, 4))
    flaw = draw(st.sampled_from(["none", "none", "dtype", "value", "dim", "labels"]))
    if flaw == "dtype":
        first = first.to(draw(dtypes))
    elif flaw == "value":
        first = first.double()
        first.view(-1)[draw(st.integers(0, first.numel() - 1))] = draw(specials)
        first = first.to(torch.int64 if token_ids else torch.float32) if draw(st.booleans()) else first
    elif flaw == "dim":
        first = first[..., :-1] if draw(st.booleans()) else first.unsqueeze(0)
    elif flaw == "labels":
        labels = labels + draw(st.sampled_from([-12, 11, 0]))
    return [first, labels.to(draw(st.sampled_from([torch.int64, torch.int32, torch.uint8])))]


metas = st.one_of(
    st.none(), st.integers(), st.text(max_size=5),
    st.fixed_dictionaries({"mb": st.one_of(st.text(max_size=70), st.integers(), st.none())},
                          optional={"eval": st.one_of(st.booleans(), st.integers()),
                                    "sample": st.one_of(st.integers(-2, 6), st.text(max_size=2)),
                                    "n": st.integers(),
                                    "clock": st.one_of(st.integers(-3, 2**31 + 2), st.floats(), st.text(max_size=2))}))


def _check(fn, meta, parts):
    try:
        out = fn(meta, parts, SHAPE)
    except ValueError:
        COUNTS["rejected"] += 1
        return None
    COUNTS["accepted"] += 1
    return out


@FUZZ
@given(st.one_of(metas, st.just({"mb": "x"})), st.one_of(st.lists(tensors(), max_size=3), near_valid(False)))
def test_fuzz_hidden_request_checks(meta, parts):
    out = _check(validate_hidden_request, meta, parts)
    if out is not None:  # what a stage > 0 then uses: float32 finite [n, T, H], labels in the vocabulary
        n, hidden, labels = out
        assert hidden.dtype == torch.float32 and tuple(hidden.shape) == (n, 4, 3) and torch.isfinite(hidden).all()
        assert labels.dtype == torch.int64 and tuple(labels.shape) == (n, 4)
        assert labels.numel() == 0 or (labels.min() >= 0 and labels.max() < 11)
        assert "clock" not in meta or (type(meta["clock"]) is int and 0 <= meta["clock"] <= 2**31)


@FUZZ
@given(st.one_of(metas, st.just({"mb": "x", "eval": True})), st.one_of(st.lists(tensors(), max_size=3),
                                                                      near_valid(True)))
def test_fuzz_token_request_checks(meta, parts):
    out = _check(validate_token_request, meta, parts)
    if out is not None:
        ids, labels = out
        assert ids.dtype == labels.dtype == torch.int64 and ids.shape == labels.shape and ids.shape[1] == 4
        assert 1 <= ids.shape[0] <= 2 and ids.min() >= 0 and ids.max() < 11


compressions = st.sampled_from([runtime_pb2.NONE, runtime_pb2.FLOAT16, runtime_pb2.UNIFORM_8BIT,
                                runtime_pb2.QUANTILE_8BIT, runtime_pb2.MEANSTD_16BIT, 77])
parts = st.builds(lambda dtype, size, comp, buf, chunks: runtime_pb2.Tensor(
    dtype=dtype, size=size, compression=comp, buffer=buf, chunks=chunks),
    st.sampled_from(["float32", "float16", "int64", "bfloat16", "bfloat16>float32", "", "complex64", "x" * 50]),
    st.lists(st.integers(0, 10**6), max_size=4), compressions, st.binary(max_size=96), st.integers(-3, 4))
envelopes = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda n, m: msgpack.packb({"n": n, "m": m}), st.integers(-2, 70),
              st.dictionaries(st.text(max_size=3), st.integers(-2**31, 2**31), max_size=3)),
    st.builds(lambda x: msgpack.packb(x), st.one_of(st.integers(-2**31, 2**31),
                                                    st.lists(st.integers(-2**31, 2**31), max_size=3))))


@FUZZ
@given(st.lists(st.tuples(envelopes, st.lists(parts, max_size=3)), max_size=4))
def test_fuzz_stream_parser(messages):
    async def stream():
        for metadata, tensor_parts in messages:
            yield runtime_pb2.ExpertRequest(metadata=metadata, tensors=tensor_parts)

    try:
        metadata, out = asyncio.run(_receive(stream(), Limits(max_bytes=1 << 20, max_tensors=8), STATS))
    except ProtocolError:
        COUNTS["rejected"] += 1
        return
    COUNTS["accepted"] += 1
    assert isinstance(metadata, dict) and all(isinstance(t, torch.Tensor) for t in out)


small_ints = st.integers(-2**31, 2**31)
lane_parts = st.lists(st.tuples(parts, st.integers(-1, 200)), max_size=4)
lane_headers = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda m, ps: msgpack.packb({"m": m, "t": [[p.SerializeToString(), n] for p, n in ps]}),
              st.one_of(st.dictionaries(st.text(max_size=3), small_ints, max_size=3), small_ints), lane_parts),
    st.builds(lambda t: msgpack.packb({"m": {}, "t": t}), st.lists(st.one_of(small_ints, st.binary(max_size=8),
                                                                               st.lists(small_ints, max_size=3)),
                                                                     max_size=3)))


@FUZZ
@given(lane_headers, st.binary(max_size=300), st.sampled_from([None, 0, 1, 4, 1 << 30]))
def test_fuzz_lane_frames(header, payload, length):
    """The direct lane's frame parser (lanes.py): a frame is parsed, or refused with its own error (caps before
    allocation), or the connection ends; nothing else escapes."""
    import socket

    from swarm_peer.lanes import LaneProtocolError, _read_head, _read_tensors

    prefix = (len(header) if length is None else length).to_bytes(4, "big")
    ours, theirs = socket.socketpair()
    theirs.sendall(prefix + header + payload)
    theirs.close()

    async def parse():
        ours.setblocking(False)
        metadata, headers = await _read_head(ours, Limits(max_bytes=1 << 20, max_tensors=8))
        return metadata, await _read_tensors(ours, headers)

    try:
        metadata, out = asyncio.run(parse())
    except (LaneProtocolError, ConnectionError):
        COUNTS["rejected"] += 1
        return
    finally:
        ours.close()
    COUNTS["accepted"] += 1
    assert isinstance(metadata, dict) and all(isinstance(t, torch.Tensor) for t in out)


def test_fuzz_totals():
    """Runs after the fuzzers in this file: prints the figures and checks enough cases ran."""
    total = COUNTS["accepted"] + COUNTS["rejected"]
    print(f"fuzz cases: {total} ({COUNTS['rejected']} rejected with a clear error, {COUNTS['accepted']} well-formed)")
    assert total >= 2000 and COUNTS["rejected"] >= 1000 and COUNTS["accepted"] >= 30


def test_values_are_checked_after_conversion_to_the_compute_dtype():
    """float64 1e300 is finite but inf in fp32; float32 3e38 is finite but makes LayerNorm return NaN: both refused,
    as is anything beyond ±MAX_MAGNITUDE; ordinary values (outlier features of a few thousand) pass."""
    from swarm_peer.model import build_stage
    from swarm_peer.config import load_config
    from tests.swarm_harness import FAST

    labels = torch.zeros(1, 4, dtype=torch.int64)
    for value, dtype in ((1e300, torch.float64), (3e38, torch.float32), (2e6, torch.float32)):
        hidden = torch.zeros(1, 4, 3, dtype=dtype)
        hidden[0, 0, 0] = value
        with pytest.raises(ValueError, match="non-finite|beyond"):
            validate_hidden_request({"mb": "x"}, [hidden, labels], SHAPE)
    ok = torch.zeros(1, 4, 3, dtype=torch.float64)
    ok[0, 0, 0] = 3000.0
    assert validate_hidden_request({"mb": "x"}, [ok, labels], SHAPE)[1].dtype == torch.float32
    # what the guard protects: a float32 value of 3e38 through a real stage's LayerNorm is NaN
    cfg = load_config(None, [*FAST, "swarm.num_stages=2"])
    stage = build_stage(cfg, 1)
    x = torch.zeros(1, 32, 64)
    x[0, 0, 0] = 3e38
    with torch.no_grad():
        assert not torch.isfinite(stage(x)).all()
