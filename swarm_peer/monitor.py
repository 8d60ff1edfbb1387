"""`python -m swarm_peer monitor`: a peer that hosts no stage, aggregates the swarm's metric records from the DHT and
logs the global training loss (and the rest) to Weights & Biases and a live console table.

Per metrics window w (aligned on DHT time, see telemetry.py), once every peer has had time to publish it:
    trusted       = (several stages) records of identities with confirmed work: a microbatch that its sender's
                    record says it delivered and its receiver's record says it served, in this or an earlier
                    window (confirmed_work); nothing else below counts the others
    global loss   = Σ mean loss × weight / Σ weight over the last stage's records *of window w* (never mixing
                    windows); weight = its loss_count, at most its confirmed microbatches in w (backed_losses)
    alive[i]      = peers of stage i that published window w while training (state online); expired, finished,
                    idle and non-training peers (monitors, tools) do not count
    tokens/s      = Σ tokens/s of stage-0 peers in window w;  samples = Σ stage-0 samples since start
    round[i]      = newest round among stage i's peers; hash agreement[i] = share of them holding the majority
                    weights hash of that round
    eval loss     = median of stage-0 peers' losses for one evaluation step, each step logged once (due_evaluation)
"""
from __future__ import annotations

import argparse
import math
import signal
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from swarm_peer.config import add_config_args, config_from_args
from swarm_peer.records import EVAL_HISTORY, MetricRecord


@dataclass
class Seen:
    """What the monitor carries from window to window."""
    confirmed: set[str] = field(default_factory=set)  # identities another peer has confirmed work with
    evals: dict[int, dict[str, float]] = field(default_factory=dict)  # eval step not yet logged -> peer id -> loss
    eval_first: dict[int, int] = field(default_factory=dict)  # eval step not yet logged -> window first seen
    eval_logged: int = -1  # newest eval step logged: evaluations are logged in step order, each once


def due_evaluation(first: list[MetricRecord], window: int, seen: Seen) -> tuple[int, float] | None:
    """(step, median loss) of the oldest evaluation ready to log, or None. An evaluation is ready once every stage-0
    peer of this window reports it, or one window after it was first seen (stage mates evaluate the same step within
    moments of each other; one that never does must not hold the row back). A record carries its peer's last few
    evaluations, so one the monitor started too late for, or missed a window of, is still logged, once."""
    for r in first:
        for step, loss in r.evals:
            if step > seen.eval_logged and (step in seen.evals or len(seen.evals) < 2 * EVAL_HISTORY):
                seen.evals.setdefault(step, {})[r.peer_id] = loss
                seen.eval_first.setdefault(step, window)
    if not seen.evals:
        return None
    step = min(seen.evals)  # in step order: a later evaluation waits for the earlier one
    if not ({r.peer_id for r in first} <= seen.evals[step].keys() or window > seen.eval_first[step]):
        return None
    losses = seen.evals.pop(step).values()
    del seen.eval_first[step]
    seen.eval_logged = step
    return step, statistics.median(losses)  # one made-up figure cannot drag it beyond the honest ones


def confirmed_work(fresh: list[MetricRecord]) -> dict[tuple[str, str], int]:
    """(sender, receiver) -> training microbatches both report for one window: the sender's `delivered` to a peer of
    the next stage, capped by that peer's `received` from it. libp2p authenticated the sender of each request, and
    each side's record is bound to its own key, so no single identity can make up work with an honest peer."""
    by_id = {r.peer_id: r for r in fresh}
    pairs = {}
    for u in fresh:
        for peer, n in u.delivered.items():
            v = by_id.get(peer)
            if v is not None and peer != u.peer_id and v.stage == u.stage + 1:
                both = min(n, v.received.get(u.peer_id, 0))
                if both:
                    pairs[(u.peer_id, peer)] = both
    return pairs


def backed_losses(fresh: list[MetricRecord], num_stages: int, pairs: dict[tuple[str, str], int]) -> list[tuple[float, int]]:
    """(mean training loss, weight) per last-stage record of one window: the weight is its microbatch count, capped
    by the confirmed work the previous stage handed it (a single stage trains on its own data: nobody can back it).
    An outsider's made-up loss thus weighs nothing unless it really served the microbatches."""
    last = [r for r in fresh if r.stage == num_stages - 1 and r.loss_count > 0]
    if num_stages == 1:
        return [(r.loss_sum / r.loss_count, r.loss_count) for r in last]
    handed: dict[str, int] = {}
    for (_, peer), n in pairs.items():
        handed[peer] = handed.get(peer, 0) + n
    out = [(r.loss_sum / r.loss_count, min(r.loss_count, handed.get(r.peer_id, 0))) for r in last]
    return [(mean, w) for mean, w in out if w > 0]


def aggregate(records: list[tuple[MetricRecord, float]], window: int, num_stages: int, now: float,
              seen: Seen | None = None) -> dict:
    """records: (record, expiration time). Only fresh records of exactly `window` count, and (with several stages)
    only those of identities whose work another peer has confirmed in this or an earlier window: an outsider's
    made-up records change no figure. `seen` carries that, and the evaluations already logged, across windows."""
    seen = Seen() if seen is None else seen
    fresh = [r for r, expires in records if expires > now and r.window == window]
    stages: dict[str, set] = {}
    for r in fresh:
        stages.setdefault(r.peer_id, set()).add(r.stage)
    fresh = [r for r in fresh if len(stages[r.peer_id]) == 1]  # one identity claiming two stages: neither counts
    pairs = confirmed_work(fresh)
    seen.confirmed.update(peer for pair in pairs for peer in pair)
    if num_stages > 1:
        fresh = [r for r in fresh if r.peer_id in seen.confirmed]
    row: dict = {"window": window}
    weighted = backed_losses(fresh, num_stages, pairs)
    count = sum(w for _, w in weighted)
    if count:
        row["loss"] = sum(mean * w for mean, w in weighted) / count
        row["loss_microbatches"] = count
    alive_total = 0
    for stage in range(num_stages):
        peers = [r for r in fresh if r.stage == stage]
        alive = sum(r.state == "online" for r in peers)
        alive_total += alive
        row[f"alive/stage{stage}"] = alive
        if peers:
            top = max(r.round for r in peers)
            at_top = [r.global_hash for r in peers if r.round == top]
            row[f"round/stage{stage}"] = top
            row[f"hash_agreement/stage{stage}"] = Counter(at_top).most_common(1)[0][1] / len(peers)
            row[f"sync_seconds/stage{stage}"] = max(r.sync_seconds for r in peers)
    row["alive"] = alive_total
    first = [r for r in fresh if r.stage == 0]
    row["tokens_per_s"] = sum(r.tokens_per_s for r in first)
    row["samples"] = sum(r.samples for r in first)
    row["bytes_sent"] = sum(r.bytes_sent for r in fresh)
    evaluation = due_evaluation(first, window, seen)
    if evaluation is not None:
        row["eval_step"], row["eval_loss"] = evaluation
        row["eval_perplexity"] = math.exp(min(row["eval_loss"], 50.0))
    return row


def read_all(dht, run_id: str, num_stages: int) -> list[tuple[MetricRecord, float]]:
    from swarm_peer.records import read_metric_records

    out = []
    for stage in range(num_stages):
        out += [(p.record, p.expires_at) for p in read_metric_records(dht, run_id, stage)]
    return out


def format_header(num_stages: int) -> str:
    stages = " ".join(f"{f'stage{i} alive/round/agree':>24}" for i in range(num_stages))
    return f"[monitor] {'window':>6} {'loss':>8} {'val loss':>8} {'ppl':>7} {'tok/s':>8} {'samples':>9} {'alive':>5} {stages}"


def format_row(row: dict, num_stages: int, step: int) -> str:
    """One row of the monitor's console table (header: format_header)."""
    loss = f"{row['loss']:8.4f}" if "loss" in row else f"{'-':>8}"
    val = f"{row['eval_loss']:8.4f} {row['eval_perplexity']:7.1f}" if "eval_loss" in row else f"{'-':>8} {'-':>7}"
    stages = " ".join(f"{row[f'alive/stage{i}']:>12}/{row.get(f'round/stage{i}', '-'):>4}/"
                      f"{row.get(f'hash_agreement/stage{i}', 0):>6.0%}" for i in range(num_stages))
    return (f"[monitor] {step:>6} {loss} {val} {row['tokens_per_s']:>8,.0f} {row['samples']:>9,} {row['alive']:>5} "
            f"{stages}")


def main(argv: list[str] | None = None) -> int:
    from swarm_peer.cli_common import add_network_args, check_network_args, setup_logging, start_dht

    parser = argparse.ArgumentParser(prog="swarm-peer monitor", description=__doc__.splitlines()[0])
    add_config_args(parser)
    add_network_args(parser)
    parser.add_argument("--wandb-project", "--wandb_project", help="log to this W&B project (offline without a key)")
    parser.add_argument("--wandb-entity", "--wandb_entity")
    parser.add_argument("--wandb-run-name", "--wandb_run_name")
    parser.add_argument("--wandb-dir", "--wandb_dir", help="where W&B writes its files (default: ./wandb)")
    parser.add_argument("--history-json", "--history_json", help="also append every logged row here (JSON lines)")
    parser.add_argument("--until-done", "--until_done", action="store_true",
                        help="exit once peers were seen and none is left (run_local_experiment.sh uses it)")
    parser.add_argument("--max-seconds", "--max_seconds", type=float, default=7 * 24 * 3600)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    setup_logging(args.verbose, "monitor")
    check_network_args(args)
    from swarm_peer.records import make_validators, read_stage_records

    num_stages, period = cfg.swarm.num_stages, cfg.run.metrics_period
    dht = start_dht(args, make_validators(args.run_id, num_stages, args.identity.key))
    run = None
    if args.wandb_project or cfg.run.wandb_project:
        from swarm_peer.wandb_log import open_run

        run = open_run(args.wandb_project or cfg.run.wandb_project, args.wandb_entity or cfg.run.wandb_entity,
                       args.wandb_run_name or cfg.run.wandb_run_name or f"{args.run_id}-monitor",
                       config={**cfg.model_dump(mode="json"), "run_id": args.run_id}, directory=args.wandb_dir,
                       job_type="monitor")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    print(f"[monitor] run {args.run_id!r}: {num_stages} stages, windows of {period:g}s"
          f"{', logging to W&B' if run else ''}", flush=True)
    print(format_header(num_stages), flush=True)
    from hivemind.utils import get_dht_time

    logged, first_window, active_seen, empty_since, seen = None, None, False, None, Seen()

    def log_window(window: int, rows, now: float) -> None:
        nonlocal first_window
        row = aggregate(rows, window, num_stages, now, seen)
        if row["alive"] or "loss" in row or "eval_loss" in row:
            first_window = window if first_window is None else first_window
            _log(run, row, window - first_window, num_stages, args.history_json)

    deadline = time.monotonic() + args.max_seconds
    try:
        while not stop and time.monotonic() < deadline:
            time.sleep(min(1.0, period / 4))
            now = get_dht_time()
            window = int((now - 0.5 * period) // period) - 1  # closed half a period ago: every peer has published
            if logged is None or window > logged:
                log_window(window, read_all(dht, args.run_id, num_stages), now)
                logged = window
            if args.until_done:  # an outsider's record that says "online" for ever does not keep it running
                active = any(p.record.state in ("online", "idle") and (num_stages == 1 or p.peer_id in seen.confirmed)
                             for s in range(num_stages) for p in read_stage_records(dht, args.run_id, s))
                active_seen |= active
                empty_since = None if active else (empty_since or time.monotonic())
                if active_seen and empty_since and time.monotonic() - empty_since > 2 * period and not seen.evals:
                    # (an evaluation still pending is logged within a window: due_evaluation)
                    print("[monitor] every peer has finished", flush=True)
                    break
        if stop and logged is not None:  # stopped (Ctrl-C): log what the peers have published so far, the windows
            # still open included (a stopping peer publishes the window it ends in), then what evaluations are left
            now = get_dht_time()
            rows, current = read_all(dht, args.run_id, num_stages), int(now // period)
            window = logged + 1
            while window <= current or (seen.evals and window <= current + 2 * EVAL_HISTORY):
                log_window(window, rows if window <= current else [], now)
                window += 1
            print(f"[monitor] stopped{'; closing the W&B run' if run is not None else ''}", flush=True)
    finally:
        if run is not None:
            run.finish()
        dht.shutdown()
    return 0


def _log(run, row: dict, step: int, num_stages: int, history_json: str | None) -> None:
    import json

    print(format_row(row, num_stages, step), flush=True)
    if run is not None:
        run.log({k: v for k, v in row.items() if k != "window"}, step=step)
    if history_json:
        Path(history_json).parent.mkdir(parents=True, exist_ok=True)
        with open(history_json, "a") as f:
            f.write(json.dumps({"step": step, **row}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
