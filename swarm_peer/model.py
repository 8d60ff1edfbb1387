"""Transformers causal LMs (GPT-2, Llama) split into pipeline stages.

A stage owns a contiguous run of decoder blocks; stage 0 also owns the token (and position) embeddings, the last
stage the final norm and LM head. Stages are built from transformers' own modules (GPT2Block, LlamaDecoderLayer,
...), so the split model computes exactly what the unsplit transformers model computes.

Initialisation is seeded per *module* (embeddings, block k, final norm, head) from `run.seed`, so every peer that
builds stage i gets bit-identical weights without talking to anyone, whatever the stage boundaries or the other
stages are, and the single-process baseline (all stages in one module) starts from the very same weights.
The input embedding and the LM head are separate tensors even when a checkpoint ties them: they live on
different stages, so they are untied (the head starts as a copy of the embedding) and trained independently.
"""
from __future__ import annotations

import hashlib
import inspect
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, LlamaConfig, PretrainedConfig
from transformers.masking_utils import create_causal_mask

# no KV cache: transformers 5.24 renamed create_causal_mask's `past_key_values` to `cache` (the old name warns, and
# goes in 5.40); pass whichever this install takes
NO_CACHE = {"cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values": None}
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from swarm_peer.config import Config, ConfigError, ModelConfig


# ---------------------------------------------------------------------------------------------- configs
def hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """The transformers config of the whole model (from the checkpoint when `name_or_path` is set)."""
    if cfg.name_or_path is not None:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(cfg.name_or_path, local_files_only=os.path.isdir(cfg.name_or_path))
        if hf.model_type not in ("gpt2", "llama"):
            raise ConfigError(f"model.name_or_path: model_type {hf.model_type!r} is not supported (gpt2, llama)")
    elif cfg.family == "gpt2":
        hf = GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.intermediate_size,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            initializer_range=cfg.init_std, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
        )
    else:
        intermediate = cfg.intermediate_size or 256 * math.ceil(8 * cfg.hidden_size / 3 / 256)
        hf = LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=intermediate,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, max_position_embeddings=cfg.max_position_embeddings,
            attention_dropout=cfg.dropout, initializer_range=cfg.init_std, bos_token_id=None, eos_token_id=None,
            pad_token_id=None, tie_word_embeddings=False,
        )
    hf._attn_implementation = cfg.attn_implementation
    hf.use_cache = False
    return hf


def _num_layers(hf: PretrainedConfig) -> int:
    return hf.num_hidden_layers


def _block_params(hf: PretrainedConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in _new_block(hf, 0).parameters())


def _embedding_params(hf: PretrainedConfig) -> int:
    pos = hf.n_positions * hf.hidden_size if hf.model_type == "gpt2" else 0
    return hf.vocab_size * hf.hidden_size + pos


def _head_params(hf: PretrainedConfig) -> int:
    norm = hf.hidden_size if hf.model_type == "llama" else 2 * hf.hidden_size  # RMSNorm has no bias
    return hf.vocab_size * hf.hidden_size + norm


# ------------------------------------------------------------------------------------------ partitioning
def stage_layer_ranges(cfg: Config, hf: PretrainedConfig | None = None) -> list[tuple[int, int]]:
    """[start, end) block indices per stage: explicit `swarm.stage_boundaries`, else balanced by parameters.

    Balancing counts the embeddings on stage 0 and the norm + head on the last stage, then picks contiguous
    non-empty groups of blocks minimising the largest stage (exact DP; at most a few hundred blocks).
    """
    hf = hf or hf_config(cfg.model)
    n, s = _num_layers(hf), cfg.swarm.num_stages
    if s > n:
        raise ConfigError(f"swarm.num_stages {s} exceeds the model's {n} layers")
    if cfg.swarm.stage_boundaries is not None:
        if cfg.swarm.stage_boundaries[-1] >= n:
            raise ConfigError(f"swarm.stage_boundaries {cfg.swarm.stage_boundaries} leave no layer for the last stage")
        edges = [0, *cfg.swarm.stage_boundaries, n]
        return list(zip(edges, edges[1:]))
    block, emb, head = _block_params(hf), _embedding_params(hf), _head_params(hf)

    def cost(stage: int, a: int, b: int) -> int:
        return (b - a) * block + (emb if stage == 0 else 0) + (head if stage == s - 1 else 0)

    # best[k][j]: minimal max-cost placing blocks [0, j) on stages [0, k)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(s + 1)]
    cut = [[0] * (n + 1) for _ in range(s + 1)]
    best[0][0] = 0
    for k in range(1, s + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                c = max(best[k - 1][i], cost(k - 1, i, j))
                if c < best[k][j]:
                    best[k][j], cut[k][j] = c, i
    edges, j = [n], n
    for k in range(s, 0, -1):
        j = cut[k][j]
        edges.append(j)
    edges.reverse()
    return list(zip(edges, edges[1:]))


# ----------------------------------------------------------------------------------------------- stages
def _new_block(hf: PretrainedConfig, layer_idx: int) -> nn.Module:
    return GPT2Block(hf, layer_idx=layer_idx) if hf.model_type == "gpt2" else LlamaDecoderLayer(hf, layer_idx)


def _module_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2**63 - 1)


@torch.no_grad()
def _init_module(module: nn.Module, name: str, seed: int, std: float, num_layers: int) -> None:
    """GPT-2 style init, deterministic per module: N(0, std) matrices, residual projections scaled by
    1/sqrt(2 * num_layers), zero biases, unit norms. A CPU generator makes it identical on every machine."""
    gen = torch.Generator().manual_seed(_module_seed(seed, name))
    for pname, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if p.ndim == 1:  # only norms have 1-D weights; every 1-D bias starts at zero
            p.fill_(1.0 if pname.endswith("weight") else 0.0)
        else:
            residual_out = pname.split(".")[-2:-1] in (["c_proj"], ["o_proj"], ["down_proj"])
            scale = std / math.sqrt(2 * num_layers) if residual_out else std
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(scale).to(p.dtype))


class StageModel(nn.Module):
    """Blocks [start, end) of the model, plus embeddings on the first stage and norm + head on the last.

    forward(x): x is token ids [B, T] on the first stage, hidden states [B, T, H] elsewhere; returns hidden states,
    or logits [B, T, V] on the last stage. `loss(logits, labels)` is the mean next-token cross-entropy.
    """

    def __init__(self, hf: PretrainedConfig, start: int, end: int, is_first: bool, is_last: bool):
        super().__init__()
        self.hf, self.start, self.end, self.is_first, self.is_last = hf, start, end, is_first, is_last
        self.gpt2 = hf.model_type == "gpt2"
        h = hf.hidden_size
        if is_first:
            self.embed_tokens = nn.Embedding(hf.vocab_size, h)
            if self.gpt2:
                self.embed_positions = nn.Embedding(hf.n_positions, h)
                self.drop = nn.Dropout(hf.embd_pdrop)
        self.blocks = nn.ModuleList([_new_block(hf, i) for i in range(start, end)])
        if is_last:
            self.norm = nn.LayerNorm(h, eps=hf.layer_norm_epsilon) if self.gpt2 else LlamaRMSNorm(h, eps=hf.rms_norm_eps)
            self.lm_head = nn.Linear(h, hf.vocab_size, bias=False)
        if not self.gpt2:
            self.rotary = LlamaRotaryEmbedding(config=hf)  # no parameters; every stage recomputes positions

    def named_units(self) -> list[tuple[str, nn.Module]]:
        """The independently seeded units of this stage, by global name."""
        units = []
        if self.is_first:
            units.append(("embed_tokens", self.embed_tokens))
            if self.gpt2:
                units.append(("embed_positions", self.embed_positions))
        units += [(f"block.{self.start + i}", b) for i, b in enumerate(self.blocks)]
        if self.is_last:
            units += [("norm", self.norm), ("lm_head", self.lm_head)]
        return units

    def stage_groups(self, ranges: list[tuple[int, int]]) -> list[list[nn.Parameter]]:
        """This module's parameters grouped by the pipeline stage that would own them under `ranges`."""
        groups: list[list[nn.Parameter]] = [[] for _ in ranges]
        for name, unit in self.named_units():
            if name.startswith("block."):
                k = int(name.split(".")[1])
                stage = next(i for i, (a, b) in enumerate(ranges) if a <= k < b)
            else:
                stage = 0 if name.startswith("embed") else len(ranges) - 1
            groups[stage] += list(unit.parameters())
        return groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            seq = x.shape[1]
            hidden = self.embed_tokens(x)
            if self.gpt2:
                hidden = self.drop(hidden + self.embed_positions(torch.arange(seq, device=x.device))[None])
        else:
            hidden = x
        position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
        mask = create_causal_mask(config=self.hf, inputs_embeds=hidden, attention_mask=None,
                                  position_ids=position_ids, **NO_CACHE)
        if self.gpt2:
            for block in self.blocks:
                hidden = block(hidden, None, mask, position_ids=position_ids)
        else:
            rope = self.rotary(hidden, position_ids=position_ids)
            for block in self.blocks:
                hidden = block(hidden, attention_mask=mask, position_embeddings=rope, position_ids=position_ids)
        if self.is_last:
            return self.lm_head(self.norm(hidden))
        return hidden

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


@dataclass(frozen=True)
class StageSpec:
    index: int
    num_stages: int
    start: int
    end: int

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


def stage_spec(cfg: Config, stage: int, hf: PretrainedConfig | None = None) -> StageSpec:
    if not 0 <= stage < cfg.swarm.num_stages:
        raise ConfigError(f"stage {stage} is out of range for swarm.num_stages={cfg.swarm.num_stages}")
    start, end = stage_layer_ranges(cfg, hf)[stage]
    return StageSpec(stage, cfg.swarm.num_stages, start, end)


def build_stage(cfg: Config, stage: int | None) -> StageModel:
    """Build stage `stage` (or the whole model when None) on CPU, fp32, from seed or from the checkpoint."""
    hf = hf_config(cfg.model)
    if stage is None:
        start, end, first, last = 0, _num_layers(hf), True, True
    else:
        spec = stage_spec(cfg, stage, hf)
        start, end, first, last = spec.start, spec.end, spec.is_first, spec.is_last
    model = StageModel(hf, start, end, first, last)
    if cfg.model.name_or_path is None:
        for name, unit in model.named_units():
            _init_module(unit, name, cfg.run.seed, hf.initializer_range, _num_layers(hf))
    else:
        _load_pretrained(model, cfg.model.name_or_path)
    return model


def stage_param_shapes(cfg: Config, stage: int) -> list[torch.Size]:
    """The shapes of `stage`'s parameters in `build_stage`'s order, nothing allocated (meta device)."""
    hf = hf_config(cfg.model)
    spec = stage_spec(cfg, stage, hf)
    with torch.device("meta"):
        return [p.shape for p in StageModel(hf, spec.start, spec.end, spec.is_first, spec.is_last).parameters()]


def _load_pretrained(model: StageModel, name_or_path: str) -> None:
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=os.path.isdir(name_or_path),
                                                torch_dtype=torch.float32)
    body = full.transformer if model.gpt2 else full.model
    blocks = body.h if model.gpt2 else body.layers
    with torch.no_grad():
        if model.is_first:
            model.embed_tokens.load_state_dict((body.wte if model.gpt2 else body.embed_tokens).state_dict())
            if model.gpt2:
                model.embed_positions.load_state_dict(body.wpe.state_dict())
        for i, block in enumerate(model.blocks):
            block.load_state_dict(blocks[model.start + i].state_dict())
        if model.is_last:
            model.norm.load_state_dict((body.ln_f if model.gpt2 else body.norm).state_dict())
            model.lm_head.weight.copy_(full.lm_head.weight)  # a copy: untied from the embedding on stage 0


def weights_hash(module: nn.Module) -> str:
    """The one weights hash of swarm_peer (diloco.tensors_hash over the parameters in order): the hash a round
    publishes for the global copy is the hash of the local weights that equal it (the summary, `done:`)."""
    from swarm_peer.diloco import tensors_hash

    return tensors_hash([p.detach() for p in module.parameters()])


def stage_fingerprint(cfg: Config, stage: int) -> str:
    """What peers of adjacent/same stages must agree on to exchange activations or average weights."""
    spec = stage_spec(cfg, stage)
    base = cfg.fingerprint("model", "data.tokenizer", "data.seq_len", "swarm.num_stages")
    return hashlib.sha256(f"{base}/{spec.start}-{spec.end}".encode()).hexdigest()[:16]


# What replicas of one stage must share to be averaged (besides the stage's model, `stage_fingerprint`): a peer in
# another sync mode, with other optimizer settings, batch, seed, data or averaging codec is never averaged with.
MATES_SETTINGS = ("swarm.sync_mode", "swarm.sync_every", "swarm.sync_samples", "swarm.compression.averaging",
                  "optim", "data.source", "data.hub_config", "data.hub_split", "data.text_field", "data.max_tokens",
                  "data.val_fraction", "data.split_seed", "data.batch_size", "data.microbatch_size", "run.seed",
                  "run.max_steps")


def mates_fingerprint(cfg: Config, stage: int) -> str:
    """What peers of the same stage must agree on to average (sync.stage_peers)."""
    base = cfg.fingerprint(*MATES_SETTINGS)
    return hashlib.sha256(f"{stage_fingerprint(cfg, stage)}/{base}".encode()).hexdigest()[:16]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def config_summary(cfg: Config, stage: int) -> str:
    """What a stage record says of its model, to name a mismatch in a warning (max 200 characters)."""
    spec = stage_spec(cfg, stage)
    m = cfg.model
    return (f"{m.name_or_path or m.family} h{m.hidden_size} L{m.num_layers} v{m.vocab_size} "
            f"layers[{spec.start}:{spec.end}] of {cfg.swarm.num_stages} stages, seq {cfg.data.seq_len}")[:200]
