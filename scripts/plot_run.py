"""Render a run's loss curves to PNG, against tokens so a swarm and the single-process baseline compare fairly.

    python scripts/plot_run.py runs/<run-id> [--baseline runs/baseline.json] [--out runs/<run-id>/loss.png]

Panels: training loss per peer (first and last stage), validation loss per stage-0 peer, and (when the run has a
monitor history) the monitor's global training loss and validation loss by metrics window. A peer's x is its run
step × the tokens one step of its stage takes from all its replicas (batch × sequence length × peers of the stage),
the tokens the stage's model has learned from; the baseline's is its step × batch × sequence length. Dotted lines
mark the outer rounds of stage 0's first peer. The y-range leaves out the first steps' loss (it would squash the end of
training). The monitor's history is read from its W&B run file or monitor.jsonl, whichever has more rows.
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
    """The monitor's rows from its W&B run file or monitor.jsonl, whichever has more (a run stopped early can leave
    a W&B file with no readable row)."""
    from swarm_peer.wandb_log import read_history

    candidates = []
    for path in sorted(glob.glob(str(run_dir / "wandb" / "*run-*" / "run-*.wandb")))[-1:]:
        try:
            candidates.append(read_history(path))
        except Exception:  # a truncated file: the JSON lines may still have it all
            pass
    path = run_dir / "monitor.jsonl"
    if path.exists():
        candidates.append([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    return max(candidates, key=lambda rows: sum("loss" in r for r in rows), default=[])


def tokens_per_step(summary: dict, peers_of_stage: int) -> float:
    cfg = summary.get("config", {}).get("data", {})
    if cfg.get("batch_size") and cfg.get("seq_len"):
        return cfg["batch_size"] * cfg["seq_len"] * peers_of_stage
    return summary["tokens"] / max(summary["inner_steps"], 1) * peers_of_stage if summary.get("tokens") else 1.0


def end_range(values: list[float]) -> tuple[float, float] | None:
    """A y-range for the curves after their first tenth (the untrained loss would squash the rest)."""
    tail = sorted(values[len(values) // 10:]) if len(values) >= 10 else sorted(values)
    if not tail:
        return None
    lo, hi = tail[0], tail[int(0.98 * (len(tail) - 1))]
    pad = max(0.05 * (hi - lo), 0.02)
    return lo - pad, hi + pad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[2:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory (runs/<run-id>: stage*_peer*.json, monitor files)")
    parser.add_argument("--baseline", type=Path, help="summary JSON of `python -m swarm_peer.baseline --summary-json`")
    parser.add_argument("--out", type=Path, help="PNG path (default: RUN_DIR/loss.png)")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"error: {args.run_dir} is not a run directory", file=sys.stderr)
        return 2
    summaries = {Path(p).stem: json.loads(Path(p).read_text())
                 for p in sorted(glob.glob(str(args.run_dir / "stage*_peer*.json")))}
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
    peers = {}
    for s in summaries.values():
        peers[s["stage"]] = peers.get(s["stage"], 0) + 1
    train_values, val_values = [], []
    for name, s in summaries.items():
        scale = tokens_per_step(s, peers[s["stage"]])
        if s.get("loss_curve") and s["stage"] in (0, s["num_stages"] - 1):
            steps, losses = zip(*s["loss_curve"])
            train.plot([k * scale for k in steps], losses, lw=1, alpha=0.8, label=name)
            train_values += losses
        if s.get("eval_curve"):
            steps, losses = zip(*s["eval_curve"])
            val.plot([k * scale for k in steps], losses, marker="o", lw=1, label=name)
            val_values += losses
    first = summaries.get("stage0_peer0")
    if first:  # the outer rounds, at the run clock each was applied at
        scale = tokens_per_step(first, peers[0])
        for i, r in enumerate(first.get("sync", {}).get("rounds", [])):
            if r.get("clock") is not None:
                train.axvline(r["clock"] * scale, color="grey", ls=":", lw=0.8, label="outer round" if i == 0 else None)
    if baseline:
        scale = tokens_per_step(baseline, 1) if "config" in baseline else 1.0
        steps, losses = zip(*baseline["train_loss"])
        train.plot([k * scale for k in steps], losses, "k--", lw=1.5, label="baseline (1 process)")
        train_values += losses
        steps, losses = zip(*baseline["val_loss"])
        val.plot([k * scale for k in steps], losses, "k--", marker="s", lw=1.5, label="baseline (1 process)")
        val_values += losses
    train.set(title="training loss (per peer)", xlabel="tokens", ylabel="loss (nats/token)")
    val.set(title="validation loss", xlabel="tokens", ylabel="loss (nats/token)")
    for ax, values in ((train, train_values), (val, val_values)):
        if (span := end_range(values)) is not None:
            ax.set_ylim(*span)
    if monitor:
        ax = axes[2]
        rows = [r for r in monitor if "loss" in r]
        ax.plot([r.get("_step", r.get("step", i)) for i, r in enumerate(rows)], [r["loss"] for r in rows], "C3",
                label="global training loss")
        evals = [r for r in monitor if "eval_loss" in r]
        if evals:
            ax.plot([r.get("_step", r.get("step", i)) for i, r in enumerate(evals)], [r["eval_loss"] for r in evals],
                    "C0", marker="o", label="validation loss")
        if (span := end_range([r["loss"] for r in rows] + [r["eval_loss"] for r in evals])) is not None:
            ax.set_ylim(*span)
        ax.set(title="the swarm (monitor)", xlabel="metrics window", ylabel="loss (nats/token)")
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
