"""Single-process baseline: the unsplit model, the swarm's inner optimizer, data and batch. The reference.

    python -m swarm_peer.baseline --config configs/tiny.yaml [--set ...] [--max-steps N] [--summary-json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from swarm_peer.compute import autocast
from swarm_peer.config import Config, ConfigError, add_config_args, config_from_args
from swarm_peer.data import Corpus, ShardSampler, load_corpus, validation_microbatches
from swarm_peer.model import StageModel, build_stage, count_parameters, stage_layer_ranges, weights_hash
from swarm_peer.optim import build_inner_optimizer, clip_grad_norm
from swarm_peer.progress import count, eta


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {name} requested but CUDA is not available")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: StageModel, corpus: Corpus, cfg: Config, device: torch.device) -> float:
    """Mean validation loss over the fixed held-out microbatches."""
    was_training = model.training
    model.eval()
    losses = []
    for mb in validation_microbatches(corpus, cfg.data.microbatch_size, cfg.run.eval_batches):
        with autocast(cfg, device):
            logits = model(mb.input_ids.to(device))
        losses.append(float(model.loss(logits, mb.labels.to(device))))
    model.train(was_training)
    return sum(losses) / len(losses)


def train(cfg: Config, summary_path: str | None = None, wandb_run=None, quiet: bool = False,
          save_weights: str | None = None, export: str | None = None) -> dict:
    torch.manual_seed(cfg.run.seed)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = resolve_device(cfg.run.device)
    corpus = load_corpus(cfg)
    model = build_stage(cfg, None).to(device)
    model.train()
    init_hash = weights_hash(model)
    groups = model.stage_groups(stage_layer_ranges(cfg))
    opt, sched = build_inner_optimizer(list(model.parameters()), cfg.optim.inner, cfg.run.max_steps)
    sampler = ShardSampler(corpus.train, cfg.data.microbatch_size, cfg.run.seed)
    accum = cfg.data.batch_size // cfg.data.microbatch_size
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    bar = None
    if not quiet and sys.stdout.isatty():  # a terminal: a live bar (tqdm), the periodic lines printed above it
        from tqdm import tqdm

        bar = tqdm(total=cfg.run.max_steps, unit="step", dynamic_ncols=True, file=sys.stdout)
    log = (lambda *a: None) if quiet else (lambda *a: bar.write(" ".join(map(str, a))) if bar is not None else
                                           print(*a, flush=True))
    log(f"baseline: {count_parameters(model):,} parameters, {len(corpus.train):,} train / {len(corpus.val):,} val "
        f"sequences of {cfg.data.seq_len}, batch {cfg.data.batch_size} x {accum} microbatches, device {device}")

    train_curve, val_curve = [], [[0, evaluate(model, corpus, cfg, device)]]
    log(f"step     0 | val loss {val_curve[0][1]:.4f}")
    started = time.perf_counter()
    window_start, window_tokens = started, 0
    for step in range(cfg.run.max_steps):
        loss_sum = 0.0
        for _ in range(accum):
            mb = sampler.next()
            with autocast(cfg, device):
                logits = model(mb.input_ids.to(device))
            loss = model.loss(logits, mb.labels.to(device))
            (loss / accum).backward()
            loss_sum += loss.item()
        for group in groups:
            clip_grad_norm(group, cfg.optim.inner.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_loss = loss_sum / accum
        if not math.isfinite(step_loss):
            raise RuntimeError(f"training loss became {step_loss} at step {step + 1}")
        train_curve.append([step + 1, step_loss])
        if bar is not None:
            bar.set_postfix(loss=f"{step_loss:.4f}", tokens=count((step + 1) * tokens_per_step), refresh=False)
            bar.update(1)
        window_tokens += tokens_per_step
        record = {"train/loss": step_loss, "train/lr": sched.get_last_lr()[0], "train/tokens": (step + 1) * tokens_per_step}
        if (step + 1) % cfg.run.log_interval == 0 or step + 1 == cfg.run.max_steps:
            now = time.perf_counter()
            record["train/tokens_per_s"] = window_tokens / (now - window_start)
            steps_per_s = (step + 1) / (now - started)
            log(f"step {step + 1:>5}/{cfg.run.max_steps} {(step + 1) / cfg.run.max_steps:4.0%} | loss {step_loss:.4f} | "
                f"lr {record['train/lr']:.2e} | {record['train/tokens_per_s']:,.0f} tok/s | "
                f"{count((step + 1) * tokens_per_step)} tokens | {eta(step + 1, cfg.run.max_steps, steps_per_s)}")
            window_start, window_tokens = now, 0
        if (cfg.run.eval_interval and (step + 1) % cfg.run.eval_interval == 0) or step + 1 == cfg.run.max_steps:
            val = evaluate(model, corpus, cfg, device)
            val_curve.append([step + 1, val])
            record.update({"val/loss": val, "val/perplexity": math.exp(min(val, 50))})
            log(f"step {step + 1:>5} | val loss {val:.4f} | ppl {math.exp(min(val, 50)):.2f}")
        if wandb_run is not None:
            wandb_run.log(record, step=step + 1)
    wall = time.perf_counter() - started
    if bar is not None:
        bar.close()

    final_val = val_curve[-1][1]
    summary = {
        "kind": "baseline",
        "config": cfg.model_dump(mode="json"),
        "parameters": count_parameters(model),
        "steps": cfg.run.max_steps,
        "samples": cfg.run.max_steps * cfg.data.batch_size,
        "tokens": cfg.run.max_steps * tokens_per_step,
        "train_loss": train_curve,
        "val_loss": val_curve,
        "initial_val_loss": val_curve[0][1],
        "final_val_loss": final_val,
        "final_val_perplexity": math.exp(min(final_val, 50)),
        "tokens_per_s": cfg.run.max_steps * tokens_per_step / wall,
        "wall_time_s": wall,
        "device": str(device),
        "corpus_key": corpus.key,
        "initial_weights_hash": init_hash,
        "final_weights_hash": weights_hash(model),
    }
    if save_weights:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, save_weights)
    if export:  # the format `swarm-peer export` writes for a swarm
        from swarm_peer.export import write

        write(cfg, {k: v.cpu() for k, v in model.state_dict().items()}, Path(export))
        log(f"model written to {export}/ (transformers: AutoModelForCausalLM.from_pretrained)")
    if summary_path:
        Path(summary_path).parent.mkdir(parents=True, exist_ok=True)
        Path(summary_path).write_text(json.dumps(summary, indent=1))
        log(f"summary written to {summary_path}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swarm-peer baseline", description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--max-steps", "--max_steps", type=int, help="shorthand for --set run.max_steps=N")
    parser.add_argument("--device", help="shorthand for --set run.device=...")
    parser.add_argument("--summary-json", "--summary_json", help="write the JSON summary here")
    parser.add_argument("--save-weights", "--save_weights", help="save the final weights (torch.save) here")
    parser.add_argument("--export", metavar="DIR", help="write the final model as a transformers model directory")
    parser.add_argument("--wandb-project", "--wandb_project", help="log to this W&B project (offline without a key)")
    parser.add_argument("--wandb-entity", "--wandb_entity")
    parser.add_argument("--wandb-run-name", "--wandb_run_name")
    args = parser.parse_args(argv)
    extra = [f"run.max_steps={args.max_steps}"] if args.max_steps is not None else []
    extra += [f"run.device={args.device}"] if args.device else []
    cfg = config_from_args(args, extra)
    wandb_run = None
    project = args.wandb_project or cfg.run.wandb_project
    try:
        if project:
            from swarm_peer.wandb_log import open_run

            wandb_run = open_run(project, args.wandb_entity or cfg.run.wandb_entity,
                                 args.wandb_run_name or cfg.run.wandb_run_name or "baseline",
                                 cfg.model_dump(mode="json"), job_type="baseline")
        train(cfg, args.summary_json, wandb_run, save_weights=args.save_weights, export=args.export)
    except ConfigError as e:
        print(f"error: config: {e}", file=sys.stderr)
        return 2
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
