"""`python -m swarm_peer status --initial-peers … [--run-id …] [--json]`: who serves which stage of a live swarm.

One table per stage (peer id, address, state, throughput, queue, last seen, round, hash agreement), totals and
plain-language warnings: an empty stage, a lone peer (no replica to average with), a drifting replica (its weights
differ from its stage's majority at the same round, or it is behind).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from swarm_peer.config import add_config_args, config_from_args


def stage_report(stage: int, peers: list, ttl: float, now: float) -> tuple[dict, list[str]]:
    """peers: records.PeerInfo of one stage (StageRecord + expiration)."""
    live = [p for p in peers if p.record.state in ("online", "idle")]
    warnings = []
    majority = {}
    if live:
        top = max(p.record.round for p in live)
        hashes = Counter(p.record.global_hash for p in live if p.record.round == top and p.record.round_ok)
        majority = {"round": top, "hash": hashes.most_common(1)[0][0] if hashes else None}
    rows = []
    for p in sorted(peers, key=lambda p: p.record.peer_id):
        r = p.record
        agrees = bool(majority) and r.round == majority["round"] and r.global_hash == majority["hash"]
        rows.append({"peer_id": r.peer_id, "address": r.address, "state": r.state, "throughput": r.throughput,
                     "queue": r.queue, "inflight": r.inflight, "last_seen_s": max(0.0, now - (p.expires_at - ttl)),
                     "inner_step": r.inner_step, "round": r.round, "syncing": r.syncing, "global_hash": r.global_hash,
                     "hash_agrees": agrees})
        if r.state in ("online", "idle") and not agrees and len(live) > 1 and not r.syncing:
            warnings.append(f"stage {stage}: peer {r.peer_id[-8:]} is drifting (round {r.round}, weights "
                            f"{r.global_hash}; the stage's majority: round {majority['round']}, {majority['hash']})")
    if not live:
        warnings.append(f"stage {stage} has no live peer: the pipeline is broken there")
    elif len(live) == 1:
        warnings.append(f"stage {stage} has a lone peer: a single point of failure, nobody to average with")
    return {"stage": stage, "peers": rows, "live": len(live)}, warnings


def collect(dht, run_id: str, num_stages: int, ttl: float) -> dict:
    from hivemind.utils import get_dht_time

    from swarm_peer.records import read_stage_records

    now = get_dht_time()
    stages, warnings = [], []
    for stage in range(num_stages):
        report, warns = stage_report(stage, read_stage_records(dht, run_id, stage), ttl, now)
        stages.append(report)
        warnings += warns
    return {"run_id": run_id, "stages": stages, "total_peers": sum(len(s["peers"]) for s in stages),
            "live_peers": sum(s["live"] for s in stages), "warnings": warnings}


def render(report: dict) -> str:
    lines = [f"run {report['run_id']!r}: {report['live_peers']} live peers ({report['total_peers']} records)"]
    for s in report["stages"]:
        lines.append(f"\nstage {s['stage']} ({s['live']} live)")
        lines.append(f"  {'peer':<10} {'state':<8} {'samples/s':>9} {'queue':>5} {'seen':>6} {'step':>6} {'round':>5}  "
                     f"{'weights':<16} agree  address")
        for p in s["peers"]:
            lines.append(f"  {p['peer_id'][-8:]:<10} {p['state']:<8} {p['throughput']:>9.1f} {p['queue']:>5} "
                         f"{p['last_seen_s']:>5.1f}s {p['inner_step']:>6} {p['round']:>5}  {p['global_hash']:<16} "
                         f"{'yes' if p['hash_agrees'] else 'NO':<5}  {p['address']}")
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from swarm_peer.cli_common import add_network_args, check_network_args, setup_logging, start_dht

    parser = argparse.ArgumentParser(prog="swarm-peer status", description=__doc__.splitlines()[0])
    add_config_args(parser)
    add_network_args(parser, joins_only=True)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not args.initial_peers:
        print("error: status needs --initial-peers of a running swarm", file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    setup_logging(args.verbose, "status")
    check_network_args(args)
    from swarm_peer.records import make_validators

    args.client_mode = True  # a look, not a member
    dht = start_dht(args, make_validators(args.run_id, cfg.swarm.num_stages, args.identity.key), quiet=True)
    try:
        report = collect(dht, args.run_id, cfg.swarm.num_stages, cfg.swarm.record_ttl)
    finally:
        dht.shutdown()
    print(json.dumps(report, indent=1) if args.json else render(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
