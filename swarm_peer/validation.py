"""Checks on what a stage peer receives, before any of it is used: pure functions, fuzzed in tests/test_fuzz.py.

A request that fails raises ValueError with a one-line reason (the servicer turns it into an error reply); nothing
has been admitted, computed or stored by then.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class RequestShape:
    """What this stage accepts: microbatches of at most `samples` sequences of `seq_len` tokens."""
    samples: int
    seq_len: int
    hidden: int
    vocab: int


MAX_CLOCK = 2**31
# |activation| and |gradient| bound, checked in fp32 (the compute dtype): far above real ones (GPT-2/Llama outlier
# features reach ~1e3-1e4), far below where LayerNorm's variance overflows fp32 (~1e19 per value)
MAX_MAGNITUDE = 1e6


def valid_clock(x, limit: float = MAX_CLOCK) -> bool:
    """A run clock (compute.py): a finite number of run steps in [0, limit]."""
    return type(x) in (int, float) and math.isfinite(x) and 0 <= x <= limit


def _check_meta(meta) -> None:
    if not isinstance(meta, dict) or not isinstance(meta.get("mb"), str) or len(meta["mb"]) > 64:
        raise ValueError("metadata needs a microbatch id 'mb' (str, <= 64 chars)")
    if "clock" in meta and not valid_clock(meta["clock"]):
        raise ValueError(f"'clock' (the run step of the microbatch) must be a number in [0, {MAX_CLOCK}]")


def _check_labels(labels, rows: tuple[int, int], vocab: int, name: str = "labels") -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in INT_DTYPES or tuple(labels.shape) != rows:
        raise ValueError(f"{name} must be integer {rows}, got {getattr(labels, 'dtype', None)} "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= vocab):
        raise ValueError(f"{name} out of vocabulary range")


def validate_hidden_request(meta, tensors, shape: RequestShape) -> tuple[int, torch.Tensor, torch.Tensor]:
    """A training or eval/sample request to a stage > 0: [hidden float [n, T, H], labels int [n, T]]."""
    _check_meta(meta)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2:
        raise ValueError(f"expected [hidden, labels], got {len(tensors) if isinstance(tensors, (list, tuple)) else 0} tensors")
    hidden, labels = tensors
    n, seq, hid = shape.samples, shape.seq_len, shape.hidden
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in FLOAT_DTYPES or hidden.ndim != 3 \
            or not 1 <= hidden.shape[0] <= n or tuple(hidden.shape[1:]) != (seq, hid):
        raise ValueError(f"hidden must be float [<= {n}, {seq}, {hid}], got {getattr(hidden, 'dtype', None)} "
                         f"{tuple(getattr(hidden, 'shape', ()))}")
    _check_labels(labels, tuple(hidden.shape[:2]), shape.vocab)
    hidden = checked_values(hidden, "activations")
    return hidden.shape[0], hidden, labels.long()


def value_range(t: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a float tensor in one pass with no temporary (NaN propagates into both, an inf is one of them);
    torch.isfinite(t).all() allocates a bool copy and is ~5-10x slower (a fifth of an all-reduce at GPT-2 size)."""
    if t.numel() == 0:
        return 0.0, 0.0
    low, high = torch.aminmax(t)
    return float(low), float(high)


def all_finite(t: torch.Tensor) -> bool:
    low, high = value_range(t)
    return math.isfinite(low) and math.isfinite(high)


def checked_values(t: torch.Tensor, what: str) -> torch.Tensor:
    """`t` as fp32 (the compute dtype), finite and within ±MAX_MAGNITUDE there: checked after the conversion, since
    float64 1e300 becomes inf and float32 3e38 makes the next LayerNorm return NaN."""
    t = t.float()
    low, high = value_range(t)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"non-finite {what} (in fp32)")
    if max(-low, high) > MAX_MAGNITUDE:
        raise ValueError(f"{what} beyond ±{MAX_MAGNITUDE:g}")
    return t


def validate_token_request(meta, tensors, shape: RequestShape) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval/sample request to stage 0: [token ids int [n, T], labels int [n, T]]."""
    _check_meta(meta)
    if not (meta.get("eval") is True or "sample" in meta):
        raise ValueError("stage 0 takes only eval/sample requests: metadata {'mb': str, 'eval': true | 'sample': pos}")
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2:
        raise ValueError("expected [token ids, labels]")
    ids, labels = tensors
    rows = tuple(ids.shape) if isinstance(ids, torch.Tensor) else ()
    if len(rows) != 2 or not 1 <= rows[0] <= shape.samples or rows[1] != shape.seq_len:
        raise ValueError(f"token ids must be integer [<= {shape.samples}, {shape.seq_len}], got {rows}")
    _check_labels(ids, rows, shape.vocab, "token ids")
    _check_labels(labels, rows, shape.vocab)
    return ids.long(), labels.long()


def validate_sample_position(meta, seq_len: int) -> None:
    if "sample" in meta:
        pos = meta["sample"]
        if type(pos) is not int or not 0 <= pos < seq_len:
            raise ValueError(f"sample position must be an int in [0, {seq_len})")
