"""`swarm-peer export RUN_DIR --out DIR`: one trained model out of a swarm, as a transformers model directory.

    swarm-peer export runs/<run-id> --out model/      # the stage weight files its peers saved (--save-weights)
    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; ..."     # loads it, generate() samples

Each stage's weights come from one of its peers' files (`stage{S}_peer{P}.pt`, written at the end of a run; with
DiLoCo every replica of a stage ends on the same global model, and a replica whose final hash is its stage's
majority is preferred); the config from those peers' summaries. The stages are joined into transformers' own
GPT2LMHeadModel / LlamaForCausalLM (the stage blocks are already transformers' modules) and written with
save_pretrained, with the tokenizer: the run's transformers tokenizer, or for the default `bytes` tokenizer a
byte-level one that encodes text exactly as the peers did (UTF-8 bytes as ids 0..255, 256 = end of document).
`swarm-peer baseline --export DIR` writes the same format; `swarm-peer sample --model DIR` samples from it.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch

from swarm_peer.config import Config

HF_NAMES = {  # our unsplit model's parameter prefixes -> transformers' causal-LM ones
    "gpt2": {"embed_tokens.": "transformer.wte.", "embed_positions.": "transformer.wpe.", "blocks.": "transformer.h.",
             "norm.": "transformer.ln_f.", "lm_head.": "lm_head."},
    "llama": {"embed_tokens.": "model.embed_tokens.", "blocks.": "model.layers.", "norm.": "model.norm.",
              "lm_head.": "lm_head."},
}


class ExportError(ValueError):
    pass


def stage_files(run_dir: Path) -> tuple[Config, list[Path]]:
    """The run's config and one weight file per stage, from the peers' summaries and --save-weights files."""
    summaries = {Path(p).stem: json.loads(Path(p).read_text()) for p in sorted(glob.glob(str(run_dir / "stage*_peer*.json")))}
    if not summaries:
        raise ExportError(f"{run_dir}: no peer summaries (stage*_peer*.json)")
    cfg = Config(**next(iter(summaries.values()))["config"])
    files = []
    for stage in range(cfg.swarm.num_stages):
        peers = {n: s for n, s in summaries.items() if s["stage"] == stage and (run_dir / f"{n}.pt").exists()}
        if not peers:
            raise ExportError(f"{run_dir}: no weights of stage {stage} (stage{stage}_peer*.pt: run the peers with "
                              f"--save-weights; run_local_experiment.sh does)")
        majority = Counter(s["final_weights_hash"] for s in peers.values()).most_common(1)[0][0]
        files.append(run_dir / f"{min(n for n, s in peers.items() if s['final_weights_hash'] == majority)}.pt")
    return cfg, files


def full_state(cfg: Config, files: list[Path]) -> dict[str, torch.Tensor]:
    """The unsplit model's state dict from one file per stage (its blocks renumbered to whole-model indices)."""
    from swarm_peer.model import stage_spec

    state = {}
    for stage, path in enumerate(files):
        start = stage_spec(cfg, stage).start
        for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
            if key.startswith("blocks."):
                _, i, rest = key.split(".", 2)
                key = f"blocks.{start + int(i)}.{rest}"
            state[key] = value
    return state


def to_transformers(cfg: Config, state: dict[str, torch.Tensor]):
    """transformers' own causal LM holding `state` (our unsplit model's keys)."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    from swarm_peer.model import hf_config

    hf = hf_config(cfg.model)
    hf.use_cache = True  # generate() may cache; training never did
    family = "gpt2" if hf.model_type == "gpt2" else "llama"
    model = (GPT2LMHeadModel if family == "gpt2" else LlamaForCausalLM)(hf)
    renamed = {}
    for key, value in state.items():
        prefix = next((p for p in HF_NAMES[family] if key.startswith(p)), None)
        if prefix is None:
            raise ExportError(f"unexpected parameter {key!r}")
        renamed[HF_NAMES[family][prefix] + key[len(prefix):]] = value
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    persistent = {k for k, _ in model.named_parameters()}
    if unexpected or [k for k in missing if k in persistent]:
        raise ExportError(f"weights do not fit {type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def byte_tokenizer():
    """A transformers tokenizer equal to data.ByteTokenizer: each UTF-8 byte one token (ids 0..255, in GPT-2's
    byte-to-unicode alphabet, no merges), 256 = end of document."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()  # GPT-2's reversible byte -> printable character map (ByteLevel's alphabet)
    vocab = {byte_char[b]: b for b in range(256)}
    vocab["<|endoftext|>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def write(cfg: Config, state: dict[str, torch.Tensor], out: Path) -> None:
    """`out`: a directory AutoModelForCausalLM and AutoTokenizer load."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per command, not a bar per shard
    model = to_transformers(cfg, state)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if cfg.data.tokenizer == "bytes":
        byte_tokenizer().save_pretrained(out)
    else:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(cfg.data.tokenizer, local_files_only=os.path.isdir(cfg.data.tokenizer)) \
            .save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swarm-peer export", description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory: stage*_peer*.json summaries and .pt weights")
    parser.add_argument("--out", type=Path, required=True, help="the model directory to write")
    args = parser.parse_args(argv)
    try:
        cfg, files = stage_files(args.run_dir)
        write(cfg, full_state(cfg, files), args.out)
    except (ExportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/ from {', '.join(f.name for f in files)}: load it with "
          f"AutoModelForCausalLM.from_pretrained({str(args.out)!r}) and AutoTokenizer.from_pretrained(...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
