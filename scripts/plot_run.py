"""Render a run's loss curves to PNG: per-peer training loss and validation loss by inner step (peer summaries),
the monitor's global loss by metrics window (its W&B run file or monitor.jsonl), and the single-process baseline
overlaid when given.

    python scripts/plot_run.py runs/<run-id> [--baseline runs/baseline.json] [--out runs/<run-id>/loss.png]
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_monitor(run_dir: Path) -> list[dict]:
    from swarm_peer.wandb_log import read_history

    files = sorted(glob.glob(str(run_dir / "wandb" / "*run-*" / "run-*.wandb")))
    if files:
        return read_history(files[-1])
    path = run_dir / "monitor.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--baseline", type=Path, help="summary JSON of `python -m swarm_peer.baseline`")
    parser.add_argument("--out", type=Path, help="PNG path (default: RUN_DIR/loss.png)")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"error: {args.run_dir} is not a run directory", file=sys.stderr)
        return 2
    summaries = {Path(p).stem: json.loads(Path(p).read_text()) for p in sorted(glob.glob(str(args.run_dir / "stage*_peer*.json")))}
    monitor = load_monitor(args.run_dir)
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    if not summaries and not monitor:
        print(f"error: no peer summaries or monitor history in {args.run_dir}", file=sys.stderr)
        return 2

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if monitor else 2, figsize=(16 if monitor else 11, 4.5))
    train, val = axes[0], axes[1]
    for name, s in summaries.items():
        if s.get("loss_curve") and (s["stage"] == s["num_stages"] - 1 or s["stage"] == 0):
            steps, losses = zip(*s["loss_curve"])
            train.plot(steps, losses, lw=1, alpha=0.8, label=name)
        if s.get("eval_curve"):
            steps, losses = zip(*s["eval_curve"])
            val.plot(steps, losses, marker="o", lw=1, label=name)
    if baseline:
        steps, losses = zip(*baseline["train_loss"])
        train.plot(steps, losses, "k--", lw=1.5, label="baseline (1 process)")
        steps, losses = zip(*baseline["val_loss"])
        val.plot(steps, losses, "k--", marker="s", lw=1.5, label="baseline (1 process)")
    train.set(title="training loss (per peer)", xlabel="inner step", ylabel="loss (nats/token)")
    val.set(title="validation loss", xlabel="inner step", ylabel="loss (nats/token)")
    if monitor:
        rows = [r for r in monitor if "loss" in r]
        axes[2].plot([r.get("_step", r.get("step", i)) for i, r in enumerate(rows)], [r["loss"] for r in rows], "C3")
        axes[2].set(title="global training loss (monitor)", xlabel="metrics window", ylabel="loss (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = args.out or args.run_dir / "loss.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
