"""What a peer's stage needs in memory, known before anything is allocated, and whether this machine has it.

The state a mode needs, in fp32 (4 bytes a value) per stage parameter: weights + gradients + AdamW's two moments
(16 B); DiLoCo adds the global copy and the outer momentum (8 B, on the CPU; 12 B with overlapped rounds, whose
contribution is taken from a snapshot of the local weights); both sync modes the averager's
shared input buffer (4 B; 2 B under DiLoCo with the fp16 averaging codec, sync_rules.averaging_buffer_dtype).
Activations: what autograd
keeps per microbatch in flight, measured at GPT-2 small's shape (CPU, fp32, SDPA attention): ~36 fp32 values per
token and hidden unit per block (no seq² term: attention scores are not kept), plus the logits and their log-softmax
on the last stage (`scripts/bench.py` part g checks the estimate against a running peer's PSS). A later stage's
split backward (`swarm.split_backward`) holds, for up to `max_inflight` microbatches (`2 max_inflight - 1` on a middle
stage), each matmul's input and output gradient until their weight gradient is computed (split_backward.py).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from swarm_peer.config import Config, ConfigError
from swarm_peer.model import _block_params, _embedding_params, _head_params, _new_block, hf_config, stage_layer_ranges
from swarm_peer.sync_rules import averaging_buffer_dtype

GB = 1e9
RUNTIME_BYTES = int(0.7 * GB)  # torch, transformers, hivemind, the DHT and averager processes, p2pd, buffers of I/O
BLOCK_ACTIVATION_VALUES = 36  # kept per token x hidden unit per block (measured, see the module docstring)


def stage_parameter_count(cfg: Config, stage: int) -> int:
    """Parameters of `stage` from the model's shape alone (nothing allocated)."""
    hf = hf_config(cfg.model)
    start, end = stage_layer_ranges(cfg, hf)[stage]
    last = stage == cfg.swarm.num_stages - 1
    return (end - start) * _block_params(hf) + (_embedding_params(hf) if stage == 0 else 0) + (
        _head_params(hf) if last else 0)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    inner_optimizer: int
    outer_state: int  # DiLoCo's global copy + momentum (+ overlapped rounds' snapshot), always on the CPU
    averaging_buffers: int  # the averager's input buffers (CPU)
    activations: int  # `swarm.max_inflight` microbatches
    runtime: int = RUNTIME_BYTES

    @property
    def on_accelerator(self) -> int:
        return self.weights + self.gradients + self.inner_optimizer + self.activations

    @property
    def on_host(self) -> int:
        return self.outer_state + self.averaging_buffers + self.runtime

    @property
    def total(self) -> int:
        return self.on_accelerator + self.on_host

    def describe(self) -> str:
        parts = [("weights", self.weights), ("grads", self.gradients), ("AdamW", self.inner_optimizer),
                 ("outer state", self.outer_state), ("averaging buffers", self.averaging_buffers),
                 ("activations", self.activations), ("runtime", self.runtime)]
        return ", ".join(f"{name} {n / GB:.2f}" for name, n in parts if n) + f" = {self.total / GB:.2f} GB"


def _block_matmul_values(hf) -> int:
    """Per token: the inputs plus outputs of one block's matmuls (what a deferred weight gradient keeps)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        block = _new_block(hf, 0)
    return sum(sum(m.weight.shape) for m in block.modules() if isinstance(m, (nn.Linear, Conv1D)))


def estimate(cfg: Config, stage: int) -> MemoryEstimate:
    n = stage_parameter_count(cfg, stage)
    d, hf = cfg.data, hf_config(cfg.model)
    start, end = stage_layer_ranges(cfg, hf)[stage]
    tokens = d.microbatch_size * d.seq_len
    per_microbatch = BLOCK_ACTIVATION_VALUES * 4 * tokens * hf.hidden_size * (end - start)
    last = stage == cfg.swarm.num_stages - 1
    if last:
        per_microbatch += 2 * 4 * tokens * hf.vocab_size  # logits and their log-softmax
    if cfg.swarm.split_backward and stage > 0:
        deferred = 4 * tokens * (_block_matmul_values(hf) * (end - start) + (
            hf.hidden_size + hf.vocab_size if last else 0))
    else:
        deferred = 0
    mode = cfg.swarm.sync_mode
    return MemoryEstimate(weights=4 * n, gradients=4 * n, inner_optimizer=8 * n,
                          # + the local snapshot an overlapped round contributes from
                          outer_state=(12 if cfg.swarm.overlap_rounds else 8) * n if mode == "diloco" else 0,
                          averaging_buffers=0 if mode == "none" else n * averaging_buffer_dtype(
                              mode, cfg.swarm.compression.averaging).itemsize
                          # + sync mode's standing group: the sums of the chunks it reduces (a pair: half the buffer)
                          + (2 * n if mode == "sync" and cfg.swarm.direct_lanes else 0),
                          # + the weight-gradient work microbatches leave behind (split_backward.py's bound)
                          activations=cfg.swarm.max_inflight * per_microbatch + deferred * (
                              cfg.swarm.max_inflight if last else 2 * cfg.swarm.max_inflight - 1))


def available_bytes(device: torch.device) -> tuple[int, int | None]:
    """(host memory available now, free memory of the accelerator or None on the CPU)."""
    import psutil

    host = psutil.virtual_memory().available
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return host, int(free)
    return host, None


def fit_problem(est: MemoryEstimate, host: int, accelerator: int | None) -> str | None:
    """Why this machine cannot hold the stage (None when it can)."""
    if accelerator is None:
        if est.total > host:
            return f"needs ~{est.total / GB:.1f} GB but {host / GB:.1f} GB of memory is available"
        return None
    if est.on_accelerator > accelerator:
        return f"needs ~{est.on_accelerator / GB:.1f} GB on the GPU but {accelerator / GB:.1f} GB is free there"
    if est.on_host > host:
        return f"needs ~{est.on_host / GB:.1f} GB of host memory but {host / GB:.1f} GB is available"
    return None


def check_fits(cfg: Config, stage: int, device: torch.device) -> MemoryEstimate:
    """The estimate, or ConfigError (exit 2) naming what does not fit and what to change."""
    est = estimate(cfg, stage)
    problem = fit_problem(est, *available_bytes(device))
    if problem and cfg.run.memory_check:
        raise ConfigError(f"stage {stage} {problem} ({est.describe()}): use more stages (swarm.num_stages), a "
                          f"smaller data.microbatch_size or swarm.max_inflight, swarm.sync_mode=none, or "
                          f"run.memory_check=false to start anyway")
    return est


def footprint() -> dict[str, int]:
    """This process and every descendant (the DHT and averager processes, p2pd, the reaper): proportional set size,
    so pages they share (forked copy-on-write, shared-memory buffers) count once. name:pid -> bytes."""
    import psutil

    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
            out[f"{proc.name()}:{proc.pid}"] = int(getattr(info, "pss", info.rss))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


class FootprintPeak:
    """The largest whole-peer footprint seen by `sample()` and its split by process at that moment."""

    def __init__(self):
        self.total, self.by_process = 0, {}

    def sample(self) -> int:
        now = footprint()
        total = sum(now.values())
        if total > self.total:
            self.total, self.by_process = total, now
        return total


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc malloc_trim; nothing elsewhere). A step's gradients and
    temporaries are freed into malloc's arenas, which keep them: at GPT-2 small's size a stage's process held
    0.25-0.4 GB more after each step than after a trim (measured with a StageTrainer of configs/gpt2-small-local.yaml: USS 2.30-2.45 GB after steps, 2.05 GB after a trim)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None
