"""`python -m swarm_peer sample --initial-peers … --prompt "…" [--max-new-tokens N]`: generate through the live pipeline
(or, with `--model DIR`, from a model directory `swarm-peer export` wrote, with transformers alone: no swarm).

The prompt's token ids go to a stage-0 peer as an inference request (no gradients, no training window); each stage
forwards to a next-stage peer of its choosing and the last stage returns the logits at the prompt's last position.
One request per new token (no KV cache: the models this runs on CPUs are small); the context is the last seq_len
tokens, right-padded (causal attention: padding after the position does not change its logits).
"""
from __future__ import annotations

import argparse
import random
import sys

import torch

from swarm_peer.config import add_config_args, config_from_args


def pick_token(logits: torch.Tensor, temperature: float, top_k: int, rng: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        cutoff = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=rng))


def main(argv: list[str] | None = None) -> int:
    from swarm_peer.cli_common import _fail, add_network_args, check_network_args, setup_logging, start_dht

    parser = argparse.ArgumentParser(prog="swarm-peer sample", description=__doc__.splitlines()[0])
    add_config_args(parser)
    add_network_args(parser, joins_only=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", "--top_k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--model", metavar="DIR", help="sample from this exported model directory, not a swarm")
    args = parser.parse_args(argv)
    if args.model:
        return sample_exported(args)
    if not args.initial_peers:
        raise _fail("sample needs --initial-peers of a running swarm")
    if not 1 <= args.max_new_tokens <= 100_000:
        raise _fail("--max-new-tokens must be in 1..100000")
    cfg = config_from_args(args)
    setup_logging(args.verbose, "sample")
    check_network_args(args)
    from hivemind.p2p import PeerID

    from swarm_peer.data import get_tokenizer
    from swarm_peer.model import stage_fingerprint
    from swarm_peer.records import make_validators, read_stage_records
    from swarm_peer.event_loop import LoopThread
    from swarm_peer.transport import RemoteError, TransportError, call_forward

    tokenizer = get_tokenizer(cfg.data.tokenizer)
    tokens = tokenizer.encode(args.prompt)
    if not tokens:
        raise _fail("--prompt is empty after tokenization")
    args.client_mode = True
    dht = start_dht(args, make_validators(args.run_id, cfg.swarm.num_stages, args.identity.key), quiet=True)
    loop = LoopThread()
    rng, pick = torch.Generator().manual_seed(args.seed), random.Random(args.seed)
    seq, fingerprint, new = cfg.data.seq_len, stage_fingerprint(cfg, 0), []
    try:
        p2p = loop.run(dht.replicate_p2p(), timeout=60)
        for i in range(args.max_new_tokens):
            context = (tokens + new)[-seq:]
            ids = torch.zeros(1, seq, dtype=torch.int64)
            ids[0, :len(context)] = torch.tensor(context)
            meta = {"mb": f"sample:{i}", "n": 1, "sample": len(context) - 1}
            for _ in range(10):  # a stage-0 peer that fails is skipped for another
                peers = [p.record.peer_id for p in read_stage_records(dht, args.run_id, 0)
                         if p.record.state == "online" and not p.record.client_mode
                         and p.record.fingerprint == fingerprint]
                if not peers:
                    print("error: no stage-0 peer of this config accepts requests (all in client mode or none online)",
                          file=sys.stderr)
                    return 1
                try:
                    _, out = loop.run(call_forward(p2p, PeerID.from_base58(pick.choice(peers)), meta,
                                                   [ids, torch.zeros_like(ids)], "none", args.timeout,
                                                   namespace=args.run_id, swarm_key=args.swarm_key),
                                      args.timeout + 5)
                    break
                except (RemoteError, TransportError) as e:
                    print(f"warning: request failed ({e}); retrying", file=sys.stderr)
            else:
                print("error: the pipeline did not answer", file=sys.stderr)
                return 1
            token = pick_token(out[0][0], args.temperature, args.top_k, rng)
            if token == getattr(tokenizer, "eos_id", None):
                break
            new.append(token)
    finally:
        loop.stop()
        dht.shutdown()
    print(args.prompt + tokenizer.decode(new), flush=True)
    return 0


def sample_exported(args) -> int:
    """transformers' generate() on a directory `swarm-peer export` (or `baseline --export`) wrote."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    except (OSError, ValueError) as e:
        print(f"error: --model {args.model}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        print("error: --prompt is empty after tokenization", file=sys.stderr)
        return 2
    positions = model.config.max_position_embeddings  # the context it was trained on: keep within it
    new_tokens = min(args.max_new_tokens, positions - 1)
    ids = ids[:, -(positions - new_tokens):]
    torch.manual_seed(args.seed)
    greedy = args.temperature <= 0
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=not greedy,
                         temperature=None if greedy else args.temperature, top_k=None if greedy else args.top_k,
                         pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    print(tokenizer.decode(out[0], skip_special_tokens=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
