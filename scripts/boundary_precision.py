"""Precision of the pipeline-boundary wire codecs at GPT-2 small's shape (configs/gpt2-small.yaml), offline, on CPU.

For every boundary k -> k+1 it runs the real stages (swarm_peer.compute.StageTrainer) on embedded-corpus microbatches
and measures, over the microbatches:
  - the backward gradient dL/dh_k that stage k+1 sends to stage k (the last stage back-propagates loss * n/batch):
    |g| quantiles, the fraction of nonzero entries below fp16's smallest normal 2^-14 (6.1e-5, subnormal: fewer
    mantissa bits) and below 2^-24 (6e-8, fp16's smallest subnormal; < 2^-25 flushes to zero);
    per codec (fp16 / bf16 / 8bit via swarm_peer.compression.serialize -> deserialize, i.e. exactly as on the wire,
    plus "fp16x2^k", a hypothetical per-tensor power-of-two scale before fp16): fraction of nonzero entries decoded
    as exactly 0, relative L2 error ||g - dec(enc(g))|| / ||g||, cosine similarity;
  - the same for the forward activations h_k (fp16 / bf16 / 8bit), plus fp16 saturation (|h| > 65504);
  - what matters for training: stage k's parameter gradient back-propagated from the decoded boundary gradient vs
    from the fp32 one (relative L2 over all of stage k's parameters, the worst single tensor, cosine).
Each boundary's reference chain is fp32 (stage k always passes the fp32 gradient on), so boundaries are independent.
Gradient magnitude per token scales as 1/(batch_size * seq_len): with a reduced --seq-len the default batch size is
raised so batch_size * seq_len = the config's (32 * 1024) and per-entry magnitudes match the full-size run (pass
--batch-size 32 for the config's literal n/batch). --train-steps N runs N AdamW steps (fp32, --train-mbs
microbatches each, rescaled to the batch by StageTrainer.step) and measures again.

    .venv/bin/python scripts/boundary_precision.py [--seq-len 256] [--microbatch-size 2] [--stages 2]
        [--microbatches 4] [--batch-size N] [--train-steps 0] [--train-mbs 2] [--set key=value ...]
        [--config configs/gpt2-small.yaml] [--out /tmp/boundary_precision.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from swarm_peer.compression import deserialize, serialize  # noqa: E402
from swarm_peer.compute import StageTrainer  # noqa: E402
from swarm_peer.config import load_config  # noqa: E402
from swarm_peer.data import ShardSampler, load_corpus  # noqa: E402

FP16_NORMAL, FP16_TINY = 2.0 ** -14, 2.0 ** -24
GRAD_CODECS, ACT_CODECS, PARAM_CODECS = ("fp16", "bf16", "8bit", "fp16x2^k"), ("fp16", "bf16", "8bit"), \
    ("fp16", "bf16", "fp16x2^k")


def roundtrip(t: torch.Tensor, codec: str) -> torch.Tensor:
    if codec == "fp16x2^k":  # hypothetical: largest power of two that keeps max|t| under 2^15
        k = math.floor(math.log2(2.0 ** 15 / max(t.abs().max().item(), 1e-30)))
        return deserialize(serialize(t * 2.0 ** k, "fp16")) / 2.0 ** k
    return deserialize(serialize(t, codec))


def magnitudes(t: torch.Tensor) -> dict:
    a = t.detach().reshape(-1).abs().float()
    nz = a[a > 0]
    q = torch.quantile(nz[torch.randperm(nz.numel())[:1_000_000]], torch.tensor([0.01, 0.5, 0.99])).tolist() \
        if nz.numel() else [0.0] * 3
    n = max(nz.numel(), 1)
    return {"numel": a.numel(), "nonzero_frac": nz.numel() / a.numel(), "p01": q[0], "median": q[1], "p99": q[2],
            "max": a.max().item(), "rms": a.pow(2).mean().sqrt().item(),
            "sub_fp16_normal": (nz < FP16_NORMAL).sum().item() / n, "below_fp16_tiny": (nz < FP16_TINY).sum().item() / n,
            "above_fp16_max": (a > 65504).sum().item() / a.numel()}


def codec_error(t: torch.Tensor, dec: torch.Tensor) -> dict:
    t, dec = t.detach().reshape(-1).double(), dec.reshape(-1).double()
    nz = t != 0
    return {"zeroed_frac": ((dec == 0) & nz).sum().item() / max(nz.sum().item(), 1),
            "rel_l2": ((t - dec).norm() / t.norm()).item(),
            "cosine": (t @ dec / (t.norm() * dec.norm()).clamp_min(1e-300)).item()}


def param_grads(pending, params, grad_out):
    grads = torch.autograd.grad(pending.outputs, params, grad_outputs=grad_out, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def param_error(ref: list, got: list) -> dict:
    diff2 = sum((r.double() - g.double()).pow(2).sum().item() for r, g in zip(ref, got))
    ref2 = sum(r.double().pow(2).sum().item() for r in ref)
    dot = sum((r.double() * g.double()).sum().item() for r, g in zip(ref, got))
    got2 = sum(g.double().pow(2).sum().item() for g in got)
    worst = max(((r - g).norm() / r.norm()).item() for r, g in zip(ref, got) if r.norm() > 0)
    return {"rel_l2": math.sqrt(diff2 / ref2), "worst_tensor_rel_l2": worst, "cosine": dot / math.sqrt(ref2 * got2)}


def measure(trainers, sampler, n_mb: int, mb_size: int) -> dict:
    S = len(trainers)
    out = {f"{k}->{k + 1}": {"grad": [], "act": [], "param": []} for k in range(S - 1)}
    losses = []
    for m in range(n_mb):
        mb = sampler.next()
        tickets = [tr.ticket(f"mb{m}", mb_size) for tr in trainers]
        pendings, x = [], mb.input_ids
        for k in range(S - 1):
            p = trainers[k].forward(x)
            pendings.append(p)
            h = x = p.outputs.detach()
            out[f"{k}->{k + 1}"]["act"].append({"mag": magnitudes(h), **{c: codec_error(h, roundtrip(h, c))
                                                                         for c in ACT_CODECS}})
        g, loss = trainers[-1].forward_backward_last(x, mb.labels, tickets[-1])
        losses.append(loss)
        for k in range(S - 2, -1, -1):
            rec = out[f"{k}->{k + 1}"]
            decoded = {c: roundtrip(g, c) for c in GRAD_CODECS}
            rec["grad"].append({"mag": magnitudes(g), **{c: codec_error(g, d) for c, d in decoded.items()}})
            ref = param_grads(pendings[k], trainers[k].params, g)
            rec["param"].append({c: param_error(ref, param_grads(pendings[k], trainers[k].params, decoded[c]))
                                 for c in PARAM_CODECS})
            del ref
            g = trainers[k].backward(pendings[k], g, tickets[k])  # the real backward, fp32 chain
        del pendings
    for tr in trainers:
        tr.discard_gradients()
    return {"loss": sum(losses) / len(losses), "boundaries": out}


def train(trainers, sampler, steps: int, mbs: int, mb_size: int) -> None:
    for _ in range(steps):
        for m in range(mbs):
            mb = sampler.next()
            tickets = [tr.ticket(f"t{m}", mb_size) for tr in trainers]
            pendings, x = [], mb.input_ids
            for tr in trainers[:-1]:
                pendings.append(tr.forward(x))
                x = pendings[-1].outputs.detach()
            g, _ = trainers[-1].forward_backward_last(x, mb.labels, tickets[-1])
            for k in range(len(trainers) - 2, -1, -1):
                g = trainers[k].backward(pendings[k], g, tickets[k])
        for tr in trainers:
            tr.step()


def mean(rows, *path):
    vals = []
    for r in rows:
        for p in path:
            r = r[p]
        vals.append(r)
    return sum(vals) / len(vals)


def report(label: str, res: dict) -> None:
    print(f"\n=== {label}: mean loss {res['loss']:.4f} (means over microbatches) ===")
    for name, rec in res["boundaries"].items():
        for kind, codecs in (("grad", GRAD_CODECS), ("act", ACT_CODECS)):
            rows = rec[kind]
            print(f"boundary {name} {'backward gradient' if kind == 'grad' else 'forward activation'}: "
                  + ", ".join(f"{k} {mean(rows, 'mag', k):.3g}" for k in ("median", "p01", "p99", "max", "rms")))
            print(f"  nonzero entries: {100 * mean(rows, 'mag', 'sub_fp16_normal'):.3f}% < 6.1e-5 (fp16 subnormal), "
                  f"{100 * mean(rows, 'mag', 'below_fp16_tiny'):.4f}% < 6e-8; "
                  f"{100 * mean(rows, 'mag', 'above_fp16_max'):.4f}% of all > 65504")
            print(f"  {'codec':<10}{'zeroed %':>12}{'rel L2 err':>14}{'cosine':>16}")
            for c in codecs:
                print(f"  {c:<10}{100 * mean(rows, c, 'zeroed_frac'):>12.4f}{mean(rows, c, 'rel_l2'):>14.3e}"
                      f"{mean(rows, c, 'cosine'):>16.10f}")
        print(f"  stage {name.split('->')[0]} parameter gradient from the decoded boundary gradient vs fp32:")
        print(f"  {'codec':<10}{'rel L2 err':>14}{'worst tensor':>14}{'cosine':>16}")
        for c in PARAM_CODECS:
            print(f"  {c:<10}{mean(rec['param'], c, 'rel_l2'):>14.3e}{mean(rec['param'], c, 'worst_tensor_rel_l2'):>14.3e}"
                  f"{mean(rec['param'], c, 'cosine'):>16.10f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/gpt2-small.yaml")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--microbatch-size", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help="default: keeps batch*seq_len of the config")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=0)
    ap.add_argument("--train-mbs", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="/tmp/boundary_precision.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    base = load_config(args.config, ["data.source=embedded", "data.tokenizer=bytes"])
    batch = args.batch_size or max(args.microbatch_size, round(base.data.batch_size * base.data.seq_len / args.seq_len
                                                               / args.microbatch_size) * args.microbatch_size)
    overrides = ["data.source=embedded", "data.tokenizer=bytes", "data.cache_dir=/tmp/bp_cache", "run.device=cpu",
                 f"data.seq_len={args.seq_len}", f"data.microbatch_size={args.microbatch_size}",
                 f"data.batch_size={batch}", f"swarm.num_stages={args.stages}", *args.set]
    cfg = load_config(args.config, overrides)
    torch.manual_seed(cfg.run.seed)
    t0 = time.time()
    corpus = load_corpus(cfg)
    sampler = ShardSampler(corpus.train, cfg.data.microbatch_size, cfg.run.seed)
    trainers = [StageTrainer(cfg, s, torch.device("cpu")) for s in range(cfg.swarm.num_stages)]
    spans = [(tr.spec.start, tr.spec.end) for tr in trainers]
    print(f"{args.config}: {cfg.model.num_layers}x{cfg.model.hidden_size}, vocab {cfg.model.vocab_size}, "
          f"stages {spans}, seq {cfg.data.seq_len}, microbatch {cfg.data.microbatch_size}, batch {cfg.data.batch_size} "
          f"(loss scale n/batch = {cfg.data.microbatch_size}/{cfg.data.batch_size}; batch*seq = "
          f"{cfg.data.batch_size * cfg.data.seq_len}), {args.microbatches} microbatches; overrides {overrides}")
    results = {"config": args.config, "overrides": overrides, "stages": spans, "points": {}}
    results["points"]["init"] = res = measure(trainers, sampler, args.microbatches, cfg.data.microbatch_size)
    report("at init", res)
    if args.train_steps:
        train(trainers, sampler, args.train_steps, args.train_mbs, cfg.data.microbatch_size)
        label = f"after {args.train_steps} AdamW steps"
        results["points"][label] = res = measure(trainers, sampler, args.microbatches, cfg.data.microbatch_size)
        report(label, res)
    results["seconds"] = time.time() - t0
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
