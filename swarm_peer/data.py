"""Data: a text corpus (embedded / local files / hub) -> tokens -> packed sequences -> deterministic shards.

`data.source`:
  embedded      the Python standard library's own .py files (always present where swarm_peer runs; identical on
                machines with the same Python version), sorted by path. A real code corpus, fully offline.
  local files   a file, a directory, or a glob of .txt/.md/.py (one document per file), .jsonl/.json or .parquet
                (one document per row, column `data.text_field`).
  hub name      anything else, e.g. HuggingFaceFW/fineweb-edu: streamed from the hub up to `data.max_tokens`.
                Only reached when the user names it.

Sequences hold seq_len + 1 tokens (inputs = seq[:-1], labels = seq[1:]); documents are joined with an
end-of-document token. The packed arrays are cached under `data.cache_dir`, keyed by the corpus content (or
file identity), tokenizer, seq_len and token cap.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from swarm_peer.config import BYTES_VOCAB_SIZE, Config, ConfigError, DataConfig, check_vocab_fits

_EMBEDDED_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__",
                  "ensurepip", "lib2to3", "tkinter"}  # skipped: not always installed, or not source text
_LOCAL_BUILDERS = {".txt": "text", ".md": "text", ".py": "text", ".jsonl": "json", ".json": "json",
                   ".parquet": "parquet"}


# ------------------------------------------------------------------------------------------ tokenizers
class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255 plus end-of-document 256: needs no files and no network."""

    name, vocab_size, eos_id = "bytes", BYTES_VOCAB_SIZE, 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer (local directory, or a hub name the user chose)."""

    def __init__(self, name: str, hint: str = ""):
        from transformers import AutoTokenizer

        self.name = name
        try:  # a local directory never reaches the network; a hub name does (the user named it)
            self.tok = AutoTokenizer.from_pretrained(name, local_files_only=os.path.isdir(name))
        except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ... here
            first = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(" .:")
            raise ConfigError(f"data.tokenizer: cannot load {name!r} ({first}){hint}") from None
        self.vocab_size = len(self.tok)
        eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id
        if eos is None:
            raise ConfigError(f"data.tokenizer: {name} has no eos/sep token to separate documents")
        self.eos_id = eos

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def get_tokenizer(name: str, hint: str = ""):
    """The tokenizer named by data.tokenizer; an unloadable one is a ConfigError (one line, + `hint`)."""
    return ByteTokenizer() if name == "bytes" else HFTokenizer(name, hint)


# ---------------------------------------------------------------------------------------------- sources
def embedded_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.rglob("*.py") if not _EMBEDDED_SKIP & set(p.relative_to(root).parts[:-1])),
                   key=lambda p: p.relative_to(root).as_posix())
    return root, files


def _local_files(source: str) -> list[str] | None:
    """Files named by `source`, or None when it doesn't look like a local path (then it is a hub name)."""
    path = os.path.expanduser(source)
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path, recursive=True))
    elif os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.suffix in _LOCAL_BUILDERS and p.is_file())
    elif os.path.isfile(path):
        files = [path]
    elif path.startswith(("/", ".", "~")) or Path(path).suffix in _LOCAL_BUILDERS:
        files = []
    else:
        return None
    if not files:
        raise ConfigError(f"data.source: no files match {source!r}")
    return files


def _source_key(cfg: DataConfig) -> tuple[str, str]:
    """(kind, identity) of the source: a content hash for embedded, file identities for local, name for hub."""
    if cfg.source == "embedded":
        root, files = embedded_files()
        h = hashlib.sha256(sys.version.split()[0].encode())
        for f in files:
            h.update(f.relative_to(root).as_posix().encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
        return "embedded", h.hexdigest()
    local = _local_files(cfg.source)
    if local is not None:
        ident = [(os.path.abspath(f), os.path.getsize(f), int(os.path.getmtime(f))) for f in local]
        return "local", hashlib.sha256(json.dumps(ident).encode()).hexdigest()
    return "hub", f"{cfg.source}/{cfg.hub_config}/{cfg.hub_split}"


def _iter_documents(cfg: DataConfig):
    """Yield document strings from the source, through `datasets` for files and hub."""
    import datasets

    if cfg.source == "embedded":
        root, files = embedded_files()
        ds = datasets.Dataset.from_dict({"text": [f.read_text(encoding="utf-8", errors="replace") for f in files]})
        yield from ds["text"]
        return
    local = _local_files(cfg.source)
    hf_cache = os.path.join(cfg.cache_dir, "hf_datasets")
    if local is not None:
        kinds = {_LOCAL_BUILDERS.get(Path(f).suffix) for f in local}
        if None in kinds or len(kinds) != 1:
            raise ConfigError(f"data.source: files must all be one of .txt/.md/.py, .jsonl/.json or .parquet, "
                              f"got {sorted({Path(f).suffix for f in local})}")
        builder = kinds.pop()
        extra = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=local, split="train", cache_dir=hf_cache, **extra)
    else:
        ds = datasets.load_dataset(cfg.source, cfg.hub_config, split=cfg.hub_split, streaming=True)
    for row in ds:
        if cfg.text_field not in row:
            raise ConfigError(f"data.text_field: column {cfg.text_field!r} not in {sorted(row)}")
        yield row[cfg.text_field]


# ---------------------------------------------------------------------------------------------- corpus
@dataclass
class Corpus:
    train: np.ndarray  # [N, seq_len + 1] int32
    val: np.ndarray  # [M, seq_len + 1] int32
    key: str  # cache key: source identity + tokenizer + seq_len + cap
    vocab_size: int
    tokens: int = field(default=0)


def _tokenize(cfg: DataConfig, tokenizer) -> np.ndarray:
    chunks, total = [], 0
    for text in _iter_documents(cfg):
        ids = tokenizer.encode(text)
        ids.append(tokenizer.eos_id)
        chunks.append(np.asarray(ids, dtype=np.int32))
        total += len(ids)
        if total >= cfg.max_tokens:
            break
    if not chunks:
        raise ConfigError(f"data.source: {cfg.source!r} has no documents")
    return np.concatenate(chunks)[: cfg.max_tokens]


def load_corpus(cfg: Config) -> Corpus:
    """Tokenize, pack and split the configured source (cached on disk)."""
    d = cfg.data
    tokenizer = get_tokenizer(d.tokenizer)
    if cfg.model.name_or_path is None:  # load_config checked it already unless the tokenizer is a hub name
        check_vocab_fits(cfg.model.vocab_size, tokenizer.vocab_size, d.tokenizer)
    kind, ident = _source_key(d)
    key = hashlib.sha256(f"{kind}/{ident}/{d.tokenizer}/{d.seq_len}/{d.max_tokens}".encode()).hexdigest()[:20]
    cache = Path(d.cache_dir) / f"packed-{key}.npy"
    if cache.exists():
        packed = np.load(cache)
    else:
        stream = _tokenize(d, tokenizer)
        n = len(stream) // (d.seq_len + 1)
        if n < 4:
            raise ConfigError(f"data.source: only {len(stream)} tokens, too few for seq_len {d.seq_len}")
        packed = stream[: n * (d.seq_len + 1)].reshape(n, d.seq_len + 1)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, packed)
        os.replace(tmp, cache)  # atomic: concurrent peers building the same cache never read half a file
    order = np.random.default_rng(d.split_seed).permutation(len(packed))
    n_val = max(1, int(round(d.val_fraction * len(packed))))
    return Corpus(train=packed[np.sort(order[n_val:])], val=packed[np.sort(order[:n_val])], key=key,
                  vocab_size=tokenizer.vocab_size, tokens=int(packed.size))


# ---------------------------------------------------------------------------------------------- batches
@dataclass
class Microbatch:
    input_ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64

    @classmethod
    def from_rows(cls, rows: np.ndarray) -> "Microbatch":
        t = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
        return cls(t[:, :-1].contiguous(), t[:, 1:].contiguous())


class ShardSampler:
    """Microbatches from shard `shard` of `num_shards`: every epoch permutes all training sequences with a
    generator seeded by (seed, epoch) and takes every num_shards-th one from `shard` on, so shards never overlap
    within an epoch and the order is reproducible anywhere. `state_dict()`/`load_state_dict()` give the exact position."""

    def __init__(self, data: np.ndarray, microbatch_size: int, seed: int, shard: int = 0, num_shards: int = 1):
        if not 0 <= shard < num_shards:
            raise ConfigError(f"data shard {shard} is out of range for {num_shards} shards")
        if len(data) < num_shards * microbatch_size:
            raise ConfigError(f"{len(data)} training sequences are too few for {num_shards} shards of "
                              f"microbatch {microbatch_size}")
        self.data, self.mbs, self.seed, self.shard, self.num_shards = data, microbatch_size, seed, shard, num_shards
        self.epoch, self.cursor = 0, 0
        self._indices = self._epoch_indices()

    def _epoch_indices(self) -> np.ndarray:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.data))
        return perm[self.shard:: self.num_shards]

    def indices(self) -> np.ndarray:
        """Sequence indices of the next microbatch (advances the position)."""
        if self.cursor + self.mbs > len(self._indices):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._indices = self._epoch_indices()
        idx = self._indices[self.cursor: self.cursor + self.mbs]
        self.cursor += self.mbs
        return idx

    def next(self) -> Microbatch:
        return Microbatch.from_rows(self.data[self.indices()])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._indices = self._epoch_indices()


def validation_microbatches(corpus: Corpus, microbatch_size: int, count: int) -> list[Microbatch]:
    """The first `count` validation microbatches: the same held-out sequences for every peer and every run."""
    rows = corpus.val[: microbatch_size * count]
    return [Microbatch.from_rows(rows[i: i + microbatch_size]) for i in range(0, len(rows), microbatch_size)
            if i + microbatch_size <= len(rows)] or [Microbatch.from_rows(rows)]
