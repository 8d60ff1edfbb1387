"""One typed config for everything: YAML file + dotted `--set a.b=value` overrides, validated by pydantic.

Every command line (baseline, peer, monitor, ...) loads its config through `load_config`; a bad file, field
or override raises `ConfigError` whose message is one line naming the field, and the CLIs exit 2 on it.
`load_config` also resolves `model.vocab_size` (see `resolve_vocab_size`), so every stage of a run builds the
same embedding and head and computes the same fingerprint, whichever entry point loaded the config.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"

Codec = Literal["none", "fp16", "bf16", "8bit"]
BYTES_VOCAB_SIZE = 257  # the bytes tokenizer (data.ByteTokenizer): 256 byte values + end-of-document


class ConfigError(ValueError):
    """A config problem; str(err) is a single line naming the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    family: Literal["gpt2", "llama"] = "gpt2"
    # a local directory with a transformers checkpoint (or a hub name the user chose); overrides the shape below
    name_or_path: Optional[str] = None
    # follows data.tokenizer (or the local checkpoint at name_or_path) unless set in the YAML or by --set
    vocab_size: int = Field(BYTES_VOCAB_SIZE, gt=0)
    hidden_size: int = Field(192, gt=0)
    num_layers: int = Field(6, gt=0)
    num_heads: int = Field(6, gt=0)
    num_kv_heads: Optional[int] = Field(None, gt=0)  # llama only; None = num_heads
    intermediate_size: Optional[int] = Field(None, gt=0)  # None = 4 * hidden (gpt2) / 8/3 * hidden (llama)
    max_position_embeddings: int = Field(1024, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_std: float = Field(0.02, gt=0.0)
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    @model_validator(mode="after")
    def _heads_divide_hidden(self):
        if self.name_or_path is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        return self


class DataConfig(_Section):
    # "embedded" | a hub dataset name | local text/jsonl/json/parquet file(s), globs or a directory
    source: str = "embedded"
    hub_config: Optional[str] = None  # the dataset's config name (hub datasets only)
    hub_split: str = "train"
    text_field: str = "text"
    tokenizer: str = "bytes"  # "bytes" or a transformers tokenizer (local dir or hub name)
    seq_len: int = Field(128, gt=1)
    max_tokens: int = Field(4_000_000, gt=0)  # cap on the tokenized corpus (hub sources are streamed up to it)
    val_fraction: float = Field(0.02, gt=0.0, lt=0.5)
    batch_size: int = Field(16, gt=0)  # sequences per inner step per peer
    microbatch_size: int = Field(4, gt=0)  # sequences per microbatch (the unit that travels the pipeline)
    split_seed: int = 1234  # fixes the train/validation split independently of run.seed
    cache_dir: str = ".cache/swarm_peer"

    @model_validator(mode="after")
    def _microbatches_divide_batch(self):
        if self.batch_size % self.microbatch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of microbatch_size {self.microbatch_size}")
        return self


class InnerOptimConfig(_Section):
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)  # cosine decays to lr * min_lr_ratio at run.max_steps
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables; applied per pipeline stage (see optim.py)


class OuterOptimConfig(_Section):
    lr: float = Field(0.7, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True


class OptimConfig(_Section):
    inner: InnerOptimConfig = InnerOptimConfig()
    outer: OuterOptimConfig = OuterOptimConfig()


class CompressionConfig(_Section):
    forward: Codec = "none"  # activations, stage i -> i+1
    backward: Codec = "none"  # gradients, stage i+1 -> i
    averaging: Literal["fp32", "fp16", "8bit"] = "fp16"  # DiLoCo pseudo-gradients


class SwarmConfig(_Section):
    num_stages: int = Field(2, gt=0)
    # first layer index of stages 1..num_stages-1; None = balanced by parameter count
    stage_boundaries: Optional[list[int]] = None
    compression: CompressionConfig = CompressionConfig()
    sync_mode: Literal["diloco", "sync", "none"] = "diloco"
    sync_every: int = Field(20, gt=0)  # DiLoCo H: inner steps per peer per outer round (stage average)
    sync_samples: Optional[int] = Field(None, gt=0)  # or: samples the whole stage processes per round (overrides H)
    # DiLoCo: inner training goes on while a round's all-reduce runs; its outer update lands at the next inner step
    # (the local weights keep what they trained meanwhile, sync_modes.DiLoCo.land). False: serving pauses per round.
    # Costs a 4 B/param snapshot; the peer serves while its round runs (README: overlapped rounds)
    overlap_rounds: bool = True
    matchmaking_time: float = Field(3.0, gt=0.0)  # how long a group leader waits for stage peers (hivemind)
    averaging_timeout: float = Field(60.0, gt=0.0)  # one round, every attempt; then a lone step + recovery
    averaging_chunk_timeout: float = Field(15.0, gt=0.0)  # a groupmate silent this long is dropped from the round
    finish_timeout: float = Field(1800.0, gt=0.0)  # a peer done training keeps syncing this long for its stage peers
    upstream_timeout: float = Field(300.0, gt=0.0)  # no record of the previous stage this long (cut off?): leave
    max_inflight: int = Field(4, gt=0)  # microbatches a peer holds at once (backpressure)
    # later stages reply with the input gradient before computing their weight gradients (split_backward.py): a
    # shorter flush per inner step, exact gradients; costs up to max_inflight microbatches' matmul output gradients
    split_backward: bool = True
    announce_period: float = Field(2.0, gt=0.0)  # seconds between DHT record refreshes
    record_ttl: float = Field(20.0, gt=0.0)  # DHT record expiration, seconds
    request_timeout: float = Field(30.0, gt=0.0)  # upper bound on a pipeline hop; adapted down from latency
    # pipeline hops over a direct TCP connection to peers that can reach each other (lanes.py: the handshake goes
    # through hivemind P2P; the lane itself is not encrypted), else through hivemind's p2pd
    direct_lanes: bool = True
    lane_port: int = Field(0, ge=0, lt=65536)  # the lane's TCP port (0: any free one), e.g. for port forwarding


class RunConfig(_Section):
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | cuda:N
    # bf16: the stage's forward (and so its backward) under torch.autocast in bfloat16; weights, gradients, optimizer
    # and DiLoCo state stay fp32, and activations cross the wire in the codec swarm.compression asks for
    precision: Literal["fp32", "bf16"] = "fp32"
    max_steps: int = Field(100, gt=0)  # inner optimizer steps (per peer)
    eval_interval: int = Field(25, ge=0)  # steps between validation passes; 0 = only at the end
    eval_batches: int = Field(8, gt=0)  # microbatches per validation pass
    log_interval: int = Field(5, gt=0)
    metrics_period: float = Field(10.0, ge=0.5, le=3600.0)  # seconds per metrics window (peers and monitor)
    checkpoint_interval: float = Field(60.0, gt=0.0)  # seconds between checkpoints (with --checkpoint-dir)
    threads: int = Field(0, ge=0)  # torch intra-op threads; 0 = torch's default
    memory_check: bool = True  # refuse to start (exit 2) when the estimate (memory.py) exceeds what is free
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    wandb_run_name: Optional[str] = None

    @model_validator(mode="after")
    def _device_known(self):
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        return self


class Config(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    swarm: SwarmConfig = SwarmConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _stages_fit_model(self):
        boundaries, stages = self.swarm.stage_boundaries, self.swarm.num_stages
        if self.model.name_or_path is None and stages > self.model.num_layers:
            raise ValueError(f"swarm.num_stages {stages} exceeds model.num_layers {self.model.num_layers}")
        if boundaries is not None:
            if len(boundaries) != stages - 1:
                raise ValueError(f"swarm.stage_boundaries needs {stages - 1} entries for {stages} stages, got {len(boundaries)}")
            edges = [0, *boundaries]
            if any(b <= a for a, b in zip(edges, edges[1:])):
                raise ValueError(f"swarm.stage_boundaries must be strictly increasing and > 0, got {boundaries}")
            if self.model.name_or_path is None and boundaries[-1] >= self.model.num_layers:
                raise ValueError(f"swarm.stage_boundaries {boundaries} leave no layer for the last stage")
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ValueError(f"data.seq_len {self.data.seq_len} exceeds model.max_position_embeddings")
        return self

    def fingerprint(self, *sections: str) -> str:
        """Short stable hash of the given sections (dotted paths), e.g. what stage peers must agree on."""
        dump = self.model_dump(mode="json")
        picked = {}
        for path in sections:
            node: Any = dump
            for part in path.split("."):
                node = node[part]
            picked[path] = node
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{loc}: {msg}{extra}"


def _did_you_mean(name: str, fields) -> str:
    close = difflib.get_close_matches(name, list(fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(fields)})"


def apply_override(tree: dict, override: str) -> None:
    """Apply one `a.b.c=value` override in place; value is parsed as YAML (so 3e-4, true, [1,2] work)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. optim.inner.lr=3e-4")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: malformed key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, float) and raw.strip().lower() in {"nan", ".nan"}:
        raise ConfigError(f"{key}: NaN is not allowed")
    node = tree
    fields = Config.model_fields
    for depth, part in enumerate(parts[:-1]):
        if fields is not None and part not in fields:
            raise ConfigError(f"{'.'.join(parts[:depth + 1])}: unknown field{_did_you_mean(part, fields)}")
        annotation = fields[part].annotation if fields is not None else None
        fields = getattr(annotation, "model_fields", None)
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parts[:depth + 1])}: is not a section")
    if fields is not None and parts[-1] not in fields:
        raise ConfigError(f"{key}: unknown field{_did_you_mean(parts[-1], fields)}")
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Load YAML at `path` (default configs/tiny.yaml), apply overrides, validate. Raises ConfigError."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    for override in overrides:
        apply_override(tree, override)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None
    return resolve_vocab_size(cfg)


def check_vocab_fits(vocab_size: int, tokenizer_vocab: int, tokenizer: str) -> None:
    if tokenizer_vocab > vocab_size:
        raise ConfigError(f"model.vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer_vocab} "
                          f"({tokenizer}): raise it, or leave it out to follow the tokenizer")


def resolve_vocab_size(cfg: Config) -> Config:
    """Set `model.vocab_size` from what the model must embed, unless the config set it explicitly.

    Not set (absent from the YAML and the overrides, i.e. not in pydantic's `model_fields_set`): the vocabulary of
    the local checkpoint at `model.name_or_path` (its config.json), else the tokenizer's (bytes: 257; a
    transformers tokenizer: len(tokenizer), loading only the tokenizer, from a local directory without network;
    a hub name is fetched, as the user named it). Set explicitly: kept, and checked against the tokenizer when
    that needs no network (bytes or a local directory; a hub tokenizer is checked when stage 0 loads the corpus).
    Done at load time on every peer, not only on stage 0 (the one loading the corpus), because every stage
    builds its part of the model from the config and the fingerprint hashes the model section.
    """
    model = cfg.model
    explicit = "vocab_size" in model.model_fields_set
    if model.name_or_path is not None:
        # the checkpoint's vocabulary is what the model has (hf_config ignores vocab_size); a hub checkpoint is
        # left alone here so that tools which only read the config never need the network
        if not explicit and os.path.isdir(model.name_or_path):
            model.vocab_size = _checkpoint_vocab_size(model.name_or_path)
        return cfg
    name = cfg.data.tokenizer
    if explicit and name != "bytes" and not os.path.isdir(name):
        return cfg
    if name == "bytes":
        needed = BYTES_VOCAB_SIZE
    else:
        from swarm_peer.data import get_tokenizer  # data imports this module; transformers only when needed

        needed = get_tokenizer(name, hint="" if explicit else "; or set model.vocab_size explicitly").vocab_size
    if explicit:
        check_vocab_fits(model.vocab_size, needed, name)
    else:
        model.vocab_size = needed
    return cfg


def _checkpoint_vocab_size(path: str) -> int:
    from transformers import AutoConfig

    try:
        vocab = AutoConfig.from_pretrained(path, local_files_only=True).vocab_size
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ... here
        raise ConfigError(f"model.name_or_path: cannot read a transformers config in {path}: "
                          f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    if not isinstance(vocab, int) or vocab <= 0:
        raise ConfigError(f"model.name_or_path: the config in {path} has no vocab_size; set model.vocab_size")
    return vocab


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, repeatable: --set optim.inner.lr=3e-4 --set data.seq_len=128")


def config_from_args(args: argparse.Namespace, extra_overrides: list[str] = ()) -> Config:
    """Load the config named on the command line; on error print one line and exit 2."""
    try:
        return load_config(args.config, [*args.overrides, *extra_overrides])
    except ConfigError as e:
        print(f"error: config: {e}", file=sys.stderr)
        raise SystemExit(2)
