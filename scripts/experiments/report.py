"""Turn a method's raw run into its result record; write results.json, results.md and the PNG plots."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

# Published numbers (validation perplexity), for comparison only: a different scale (124M parameters, GPT-2
# tokenizer, billions of tokens, GPUs) and a different corpus than these CPU runs.
PUBLISHED = {
    "source": "DiLoCo-SWARM report, GPT-2 small on FineWeb-Edu, final validation perplexity",
    "exp1": {"baseline_fewer_tokens": 37.16, "swarm": 30.22, "diloco_swarm": 30.15,
             "_notes": "single GPU trained on 4x fewer tokens: 37.16; SWARM: 30.22; DiLoCo-SWARM (H=50): 30.15"},
    "exp2": {"H=10": 27.95, "H=20": 28.61, "H=50": 30.15, "H=100": 30.49, "H=200": 31.27},
    "exp3": {"_notes": "no published model-size numbers were given to us"},
    "exp4": {"_notes": "the report publishes no codec comparison"},
}


def ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def _mean_by_step(curves: list[list[list[float]]]) -> list[list[float]]:
    by_step = defaultdict(list)
    for curve in curves:
        for step, loss in curve:
            by_step[int(step)].append(loss)
    return [[s, sum(v) / len(v)] for s, v in sorted(by_step.items())]


def method_result(kind: str, raw: dict, cfg, loss: float, hashes: list[dict] | None = None,
                  replica_losses: list[float] | None = None) -> dict:
    """cfg: the method's config; loss: final validation loss of its final model (harness.final_eval); a swarm's
    `replica_losses`: the same for the model of peer p of every stage, p = 0.. (equal when the replicas agree)."""
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len  # one peer's (or the baseline's) inner step
    res = {"kind": kind, "sync_mode": None, "final_val_loss": loss, "final_val_perplexity": ppl(loss),
           "process_wall_s": raw["process_wall_s"]}
    if kind == "baseline":
        s = raw["summary"]
        res.update(steps=s["steps"], tokens=s["tokens"], train_wall_s=s["wall_time_s"],
                   loss_curve=[[k * tokens_per_step, v] for k, v in s["train_loss"]],
                   val_curve=[[k * tokens_per_step, v] for k, v in s["val_loss"]],
                   sync_bytes_sent=0, pipeline_bytes_sent=0)
        return res
    peers, summ = raw["peers"], raw["summaries"]
    first = [v for v in summ.values() if v["stage"] == 0]
    scale = peers * tokens_per_step  # global tokens after every stage-0 peer did k inner steps
    stages = sorted({v["stage"] for v in summ.values()})
    agree = {str(s): len({v["final_weights_hash"] for v in summ.values() if v["stage"] == s}) == 1 for s in stages}
    res.update(
        sync_mode=first[0]["sync"]["mode"], sync_every=cfg.swarm.sync_every, peers_per_stage=peers,
        steps=[v["inner_steps"] for v in first],
        # tokens the stage-0 peers trained on (forward + backward done: the compute spent)...
        tokens=sum(v["microbatches"] for v in first) * cfg.data.microbatch_size * cfg.data.seq_len,
        # ...and those in inner steps that were applied (sync mode drops a step whose all-reduce failed and
        # recovers the stage's weights instead; DiLoCo counts a dropped round's steps here too)
        tokens_in_applied_steps=sum(v["tokens"] for v in first),
        recoveries=sum(len(v["sync"]["recoveries"]) for v in summ.values()),
        failed_rounds=sum(not r["ok"] for v in summ.values() for r in v["sync"]["rounds"]),
        train_wall_s=max(v["wall_time_s"] for v in first),  # slowest stage-0 peer, its final round included
        loss_curve=[[k * scale, v] for k, v in _mean_by_step([v["loss_curve"] for v in first])],
        # the peers' own pipeline evaluations (their local replica at that step, before the last outer round)
        val_curve=[[k * scale, v] for k, v in _mean_by_step([v["eval_curve"] for v in first])],
        rounds={str(s): len(summ[f"stage{s}_peer0"]["sync"]["rounds"]) for s in stages},
        sync_bytes_sent=sum(r["bytes_sent"] for v in summ.values() for r in v["sync"]["rounds"]),
        pipeline_bytes_sent=sum(v["transport"]["bytes_sent"] for v in summ.values()),
        lost_microbatches=sum(v["lost_microbatches"] for v in summ.values()),
        replicas_agree=agree,
        final_weights_hash={n: v["final_weights_hash"] for n, v in sorted(summ.items())},
        global_hash={n: v["sync"]["global_hash"] for n, v in sorted(summ.items())},
        replica_val_losses=replica_losses,
        # the share of a peer's wall time in which it admitted no training request because of same-stage sync
        # (DRAINING + AVERAGING) / wall time, as each peer reported it (stepper.Stepper.sync_blocked_share)
        sync_blocked_share={n: v["sync_blocked_share"] for n, v in sorted(summ.items())})
    if hashes is not None:  # the evaluated files are what the peers reported: their weights and the global model
        res["saved_weights_match_summary"] = all(
            h["weights"] == summ[f"stage{s}_peer0"]["final_weights_hash"] for s, h in enumerate(hashes))
        res["saved_weights_are_global_model"] = all(
            h["params"] == summ[f"stage{s}_peer0"]["sync"]["global_hash"] for s, h in enumerate(hashes))
    return res


def markdown(results: dict) -> str:
    pub = results.get("published", {})
    notes_disagree: list[str] = []
    rows = ["| method | group | tokens | final val loss | perplexity | published ppl | train wall s | "
            "sync MiB sent | pipeline MiB sent | rounds (stage 0/1) | replicas agree | recoveries |", "|" + "---|" * 12]
    for name, m in results["methods"].items():
        rounds = "/".join(str(v) for v in m.get("rounds", {}).values()) or "-"
        agree = "-" if "replicas_agree" not in m else ("yes" if all(m["replicas_agree"].values()) else "NO")
        published = pub.get(m.get("published_key", name), "-")
        rows.append(f"| {name} | {m.get('group', '-')} | {m['tokens']:,} | {m['final_val_loss']:.4f} | "
                    f"{m['final_val_perplexity']:.3f} | {published} | {m['train_wall_s']:.0f} | "
                    f"{m['sync_bytes_sent'] / 2**20:.1f} | {m['pipeline_bytes_sent'] / 2**20:.1f} | {rounds} | {agree} | {m.get('recoveries', '-')} |")
        if agree == "NO":
            notes_disagree.append(f"{name}: replicas differ at the end; final val loss of peer p's model of every "
                                  f"stage: {', '.join(f'{x:.4f}' for x in m['replica_val_losses'])}")
    notes = [f"\n{results['experiment']}: {results['description']}",
             f"Final loss: nats/token of the final model on {results['eval_sequences']} fixed held-out sequences "
             f"(swarm_peer.baseline.evaluate), identical for every method.",
             f"tokens: trained on by the baseline / the stage-0 peers (equal for the compute-matched methods: "
             f"{results['compute_matched_tokens']}); recoveries: a peer replaced its weights by its stage's after a "
             f"failed or missed all-reduce (its work since the last agreed state is dropped)."]
    notes += notes_disagree
    if pub.get("_notes"):
        notes.append(f"Published ({PUBLISHED['source']}): {pub['_notes']}")
    return "\n".join(rows + notes)


def _smooth(ys: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    groups = list(dict.fromkeys(m.get("group", "") for m in methods.values()))
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for i, (name, m) in enumerate((n, m) for n, m in methods.items() if m.get("group", "") == group):
            color = f"C{i}"
            if m["loss_curve"]:
                xs, ys = zip(*m["loss_curve"])
                ax.plot(xs, _smooth(list(ys), 5), color=color, lw=1.2, label=f"{name} (train, smoothed)")
            if m["val_curve"]:
                xs, ys = zip(*m["val_curve"])
                ax.plot(xs, ys, "o--", color=color, ms=3, lw=0.8, alpha=0.7)
            ax.plot([m["tokens"]], [m["final_val_loss"]], "*", color=color, ms=12)
        ax.set(xlabel="training tokens", ylabel="loss (nats/token)", title=f"{results['experiment']} {group}".strip())
        ax.set_ylim(top=min(ax.get_ylim()[1], 4.0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="o-- validation during training, * final model", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_tokens.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(methods)), 4))
    names = list(methods)
    vals = [methods[n]["final_val_perplexity"] for n in names]
    ax.bar(range(len(names)), vals, color=[f"C{i}" for i in range(len(names))])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="final validation perplexity", title=f"{results['experiment']}: final model")
    fig.tight_layout()
    fig.savefig(out / "final_perplexity.png", dpi=110)
    plt.close(fig)
    written = ["loss_vs_tokens.png", "final_perplexity.png"]

    if results["experiment"] == "exp2":
        hs = [m["sync_every"] for m in methods.values()]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot(hs, vals, "o-")
        a.set(xscale="log", xlabel="H (inner steps per outer round)", ylabel="final validation perplexity",
              title="this run (CPU, tiny GPT-2)")
        ref = {int(k[2:]): v for k, v in PUBLISHED["exp2"].items()}
        b.plot(list(ref), list(ref.values()), "s-", color="C1")
        b.set(xscale="log", xlabel="H", ylabel="perplexity", title="published (GPT-2 small, FineWeb-Edu)")
        for axis, ticks in ((a, sorted(set(hs))), (b, sorted(ref))):
            axis.minorticks_off()
            axis.set_xticks(ticks, [str(t) for t in ticks])
            axis.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "perplexity_vs_H.png", dpi=110)
        plt.close(fig)
        written.append("perplexity_vs_H.png")
    return written


def write(results: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (out / "results.md").write_text(table + "\n")
    return table
