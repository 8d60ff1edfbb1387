"""swarm_peer.compression: codec round trips, error bounds, wire sizes, and the numpy >= 2.4 fix for 8-bit codecs."""
import importlib

import numpy as np
import pytest
import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.compression.quantization import Quantization
from hivemind.proto import runtime_pb2

from swarm_peer import compression as C

CT = runtime_pb2.CompressionType
pytestmark = [  # expected warnings from hivemind's codecs (hivemind filters some itself; pytest re-enables them)
    pytest.mark.filterwarnings("ignore:The given NumPy array is not writable"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0"),  # the original, called on purpose
]
REL_ERROR = {"none": 0.0, "fp32": 0.0, "fp16": 1e-3, "bf16": 1e-2, "8bit": 0.03}
BYTES_PER_VALUE = {"none": 4, "fp32": 4, "fp16": 2, "bf16": 2, "8bit": 1}


def _rel(y, x):
    return ((y.double() - x.double()).norm() / x.double().norm()).item()


@pytest.fixture
def activations():
    torch.manual_seed(0)
    return torch.randn(4, 128, 192)


def test_compression_type_mapping():
    assert C.compression_type("none") == C.compression_type("fp32") == CT.NONE
    assert C.compression_type("bf16") == CT.NONE  # bf16 is a cast + NONE
    assert C.compression_type("fp16") == CT.FLOAT16
    assert C.compression_type("8bit") == CT.UNIFORM_8BIT
    assert set(C.WIRE_CODECS) | set(C.AVERAGING_CODECS) == {"none", "fp32", "fp16", "bf16", "8bit"}
    assert C.compression_strategy("8bit").compression_type == CT.UNIFORM_8BIT
    assert C.compression_strategy("fp32").compression_type == CT.NONE
    with pytest.raises(ValueError, match="unknown codec"):
        C.compression_type("int4")


@pytest.mark.parametrize("codec", ["none", "fp32", "fp16", "bf16", "8bit"])
def test_round_trip_error_and_size(activations, codec):
    message = C.serialize(activations, codec)
    restored = C.deserialize(message)
    assert restored.dtype == torch.float32 and restored.shape == activations.shape
    assert _rel(restored, activations) <= REL_ERROR[codec]
    if codec in ("none", "fp32"):
        assert torch.equal(restored, activations)
    per_value = len(message.buffer) / activations.numel()
    assert BYTES_PER_VALUE[codec] <= per_value <= BYTES_PER_VALUE[codec] * 1.02  # 8-bit: +1 KiB codebook
    assert message.ByteSize() <= len(message.buffer) + 64
    restored.add_(1)  # the result is writable (no read-only buffer behind it)


@pytest.mark.parametrize("codec", C.WIRE_CODECS)
@pytest.mark.parametrize("tensor", [torch.randint(-2**40, 2**40, (64, 33)), torch.randint(0, 50000, (3000,)),
                                    torch.randint(-5, 5, (2000,), dtype=torch.int32), torch.rand(1500) > 0.5,
                                    torch.randint(0, 255, (1200,), dtype=torch.uint8)],
                         ids=["int64-wide", "int64-tokens", "int32", "bool", "uint8"])
def test_integer_tensors_are_exact(codec, tensor):
    message = C.serialize(tensor, codec)
    assert message.compression == CT.NONE
    restored = C.deserialize(message)
    assert restored.dtype == tensor.dtype and torch.equal(restored, tensor)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("codec", C.WIRE_CODECS)
def test_original_dtype_restored(codec, dtype):
    x = torch.randn(2048, dtype=torch.float32).to(dtype)
    message = C.serialize(x, codec)
    restored = C.deserialize(message)
    assert restored.dtype == dtype and restored.shape == x.shape
    assert _rel(restored, x) <= REL_ERROR[codec] * 1.5 + 1e-12
    if dtype != torch.float64 and codec in ("none", "fp16", "bf16"):
        assert torch.equal(restored, x) and len(message.buffer) == 2 * x.numel()  # 2-byte input sent as is


def test_bf16_travels_as_two_bytes_and_hivemind_can_read_it():
    x = torch.randn(1000)
    cast = C.serialize(x, "bf16")
    assert cast.compression == CT.NONE and len(cast.buffer) == 2 * x.numel()
    assert torch.equal(C.deserialize(cast), x.bfloat16().float())
    native = C.serialize(x.bfloat16(), "none")  # hivemind's NoCompression would widen this to fp32
    assert native.dtype == "bfloat16" and len(native.buffer) == 2 * x.numel()
    assert torch.equal(deserialize_torch_tensor(native), x.bfloat16())  # stock hivemind decodes it


@pytest.mark.parametrize("codec", ["none", "fp16", "8bit"])
def test_stock_hivemind_decodes_our_messages(activations, codec):
    assert torch.equal(deserialize_torch_tensor(C.serialize(activations, codec)),
                       C.deserialize(C.serialize(activations, codec)))


def test_edge_shapes_and_layouts():
    for codec in C.WIRE_CODECS:
        for x in (torch.zeros(0), torch.zeros(3, 0, 2), torch.tensor(2.5), torch.full((5000,), 3.0)):
            assert torch.equal(C.deserialize(C.serialize(x, codec)), x), (codec, x.shape)
        small = torch.randn(100)  # < 1024 values: 8-bit's codebook would cost more than the data
        assert C.serialize(small, "8bit").compression == CT.NONE
        t = torch.randn(64, 48).t()  # non-contiguous
        assert _rel(C.deserialize(C.serialize(t, codec)), t) <= REL_ERROR[codec]


def test_fp16_saturates_instead_of_overflowing():
    y = C.deserialize(C.serialize(torch.tensor([1e6, -1e6, 1.0]), "fp16"))
    assert y.tolist() == [65504.0, -65504.0, 1.0]


def test_malformed_messages_raise():
    good = C.serialize(torch.randn(10), "none")
    with pytest.raises(ValueError, match="does not match"):
        C.decode(good, good.buffer[:-1])
    with pytest.raises(ValueError, match="unsupported dtype"):
        C.deserialize(runtime_pb2.Tensor(buffer=b"abcd", size=[1], dtype="object"))
    with pytest.raises(ValueError, match="unsupported compression"):
        C.deserialize(runtime_pb2.Tensor(buffer=b"abcd", size=[1], dtype="float32", compression=CT.BLOCKWISE_8BIT))
    with pytest.raises(Exception):
        C.deserialize(runtime_pb2.Tensor(buffer=b"\x05" + b"\x00" * 7, size=[4], dtype="float32",
                                         compression=CT.UNIFORM_8BIT))
    assert C.decoded_nbytes(runtime_pb2.Tensor(size=[1 << 20, 1 << 12], dtype="float32")) == 16 << 30
    assert C.decoded_nbytes(C.serialize(torch.randn(7, 3), "bf16")) == 7 * 3 * 4


def test_decode_uses_a_writable_bytearray_in_place():
    x = torch.arange(6, dtype=torch.float32)
    header, payload = C.encode(x, "none")
    buffer = bytearray(payload)
    y = C.decode(header, buffer)
    buffer[0:4] = np.float32(42).tobytes()
    assert y[0].item() == 42.0  # shares the buffer: no copy


# ------------------------------------------------------------------------------------- numpy >= 2.4 fix
class _StrictArray(np.ndarray):
    """numpy >= 2.4 semantics: converting an array with ndim > 0 to a Python scalar is a TypeError."""

    def __int__(self):
        if self.ndim > 0:
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        return int(self.view(np.ndarray)[()])

    __index__ = __int__


def _strict_frombuffer(original):
    return lambda *args, **kwargs: original(*args, **kwargs).view(_StrictArray)


@pytest.mark.parametrize("ctype", [CT.UNIFORM_8BIT, CT.QUANTILE_8BIT], ids=["uniform", "quantile"])
def test_8bit_extract_patch(ctype, activations, monkeypatch):
    from hivemind.compression.serialization import _BASE_COMPRESSION_TYPES

    codec = _BASE_COMPRESSION_TYPES[CT.Name(ctype)]
    message = runtime_pb2.Tensor()
    message.CopyFrom(codec.compress(activations, None))
    assert Quantization.extract.__name__ == "_extract_8bit"  # installed for both 8-bit codecs (they inherit extract)
    assert torch.equal(C._original_extract_8bit(codec, message), C._extract_8bit(codec, message))  # numpy < 2.4
    monkeypatch.setattr(np, "frombuffer", _strict_frombuffer(np.frombuffer))  # emulate numpy >= 2.4
    with pytest.raises(TypeError, match="0-dimensional"):
        C._original_extract_8bit(codec, message)  # what fails under numpy 2.4
    patched = deserialize_torch_tensor(message)  # hivemind's own path (also used by DecentralizedAverager)
    monkeypatch.undo()
    assert torch.equal(patched, C._original_extract_8bit(codec, message))


def test_8bit_patch_is_idempotent():
    original = C._original_extract_8bit
    reloaded = importlib.reload(C)
    assert Quantization._original_extract is original and reloaded._original_extract_8bit is original
    assert Quantization.extract.__name__ == "_extract_8bit" and Quantization.extract is not original
    assert original.__module__ == "hivemind.compression.quantization"


@pytest.mark.parametrize("codec", C.WIRE_CODECS)
@pytest.mark.parametrize("numel, dtype", [(100, torch.float32), (5000, torch.float32), (5000, torch.bfloat16)])
def test_wire_nbytes_is_what_encode_sends(codec, numel, dtype):
    _, payload = C.encode(torch.randn(numel).to(dtype), codec)
    assert C.wire_nbytes(numel, codec, dtype.itemsize) == len(payload)


def test_wire_per_step_counts_each_boundary_both_ways():
    from swarm_peer.config import load_config
    sets = ["swarm.num_stages=3", "data.batch_size=8", "data.microbatch_size=2", "data.seq_len=16",
            "model.hidden_size=64", "model.num_heads=4", "swarm.compression.forward=fp16", "swarm.compression.backward=8bit"]
    cfg = load_config(None, sets)
    numel = 2 * 16 * 64  # one microbatch's boundary hidden states
    per_boundary = 4 * (numel * 2 + numel + 8 + 1024)  # 4 microbatches: fp16 out, 8-bit back
    assert C.wire_per_step(cfg, 0) == (per_boundary, 4 * 2 * numel * 4)
    assert C.wire_per_step(cfg, 1) == (2 * per_boundary, 2 * 4 * 2 * numel * 4)  # a middle stage has two
    assert C.wire_per_step(load_config(None, ["swarm.num_stages=1"]), 0) is None
