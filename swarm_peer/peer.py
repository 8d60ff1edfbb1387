"""`python -m swarm_peer --stage N [--initial-peers MADDR ...]`: start a peer hosting one pipeline stage.

Joins (or starts) the run's hivemind DHT, prints a copy-pasteable join line, announces its stage, trains until
the run's end (stage 0: `run.max_steps` inner steps; later stages: until the previous stage has finished), writes
its JSON summary and exits 0.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path

import torch

from swarm_peer.cli_common import (_fail, _is_loopback, add_network_args, check_network_args, lane_endpoints,
                                   retag_logging, setup_logging, start_dht)
from swarm_peer.config import ConfigError, add_config_args, config_from_args

log = logging.getLogger("swarm_peer")


def _stage_arg(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise _fail(f"--stage {value}: expected a stage number or auto") from None


def main(argv: list[str] | None = None) -> int:
    from swarm_peer.__main__ import COMMANDS

    parser = argparse.ArgumentParser(prog="swarm-peer", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="other commands (`swarm-peer COMMAND --help`, or `python -m swarm_peer "
                                            "COMMAND`):\n" + "\n".join(f"  {name:<10}{what}"
                                                                         for name, (_, what) in COMMANDS.items()))
    add_config_args(parser)
    parser.add_argument("--stage", required=True, metavar="N|auto",
                        help="pipeline stage this peer hosts (0-based), or auto: the stage serving the fewest "
                             "samples/s (an empty one first)")
    add_network_args(parser)
    parser.add_argument("--device", help="cpu | cuda | cuda:N (shorthand for --set run.device=...)")
    parser.add_argument("--max-steps", "--max_steps", type=int, help="inner steps of stage-0 peers (run.max_steps)")
    parser.add_argument("--summary-json", "--summary_json", help="write this peer's summary here at the end")
    parser.add_argument("--data-shard", "--data_shard", default=None, metavar="K/N",
                        help="stage 0: read shard K of N (default: the whole set in a peer-specific order)")
    parser.add_argument("--save-weights", "--save_weights", help="save the final stage weights (torch.save) here")
    parser.add_argument("--checkpoint-dir", "--checkpoint_dir",
                        help="save this peer's state here every run.checkpoint_interval s and on exit; resume from it")
    args = parser.parse_args(argv)
    args.stage = _stage_arg(args.stage)
    extra = [f"run.max_steps={args.max_steps}"] if args.max_steps is not None else []
    extra += [f"run.device={args.device}"] if args.device else []
    cfg = config_from_args(args, extra)
    if args.stage != "auto" and not 0 <= args.stage < cfg.swarm.num_stages:
        raise _fail(f"--stage {args.stage}: must be in 0..{cfg.swarm.num_stages - 1} (swarm.num_stages)")
    if args.client_mode and args.stage == "auto":
        raise _fail("--client-mode: only stage 0 peers can be clients; use --stage 0")
    if args.client_mode and args.stage != 0:
        raise _fail(f"--client-mode: stage {args.stage} peers must accept connections from stage {args.stage - 1}")
    setup_logging(args.verbose, f"stage {args.stage}")  # before anything imports hivemind: it reads HIVEMIND_LOGLEVEL at import
    check_network_args(args)
    shard = (0, 1)
    if args.data_shard is not None:
        try:
            k, n = (int(x) for x in args.data_shard.split("/"))
            assert 0 <= k < n
            shard = (k, n)
        except (ValueError, AssertionError):
            raise _fail(f"--data-shard {args.data_shard!r}: expected K/N with 0 <= K < N")
    try:
        return run_peer(cfg, args, shard)
    except ConfigError as e:
        print(f"error: config: {e}", file=sys.stderr)
        return 2


def phase_shares(summary: dict) -> str:
    """'training 81%, averaging 12%, draining 5%': where the peer's wall time went (phases of 1% and more)."""
    seconds = summary.get("phase_seconds") or {}
    total = sum(seconds.values()) or 1.0
    shares = sorted(((s / total, p) for p, s in seconds.items() if s / total >= 0.01), reverse=True)
    return ", ".join(f"{p} {share:.0%}" for share, p in shares) or "n/a"


def resume(worker, directory: str) -> None:
    """Load this stage's checkpoint from `directory` if there is one; a corrupt one stops the peer (exit 2)."""
    from swarm_peer.checkpoint import CheckpointError, checkpoint_path, read_verified

    path = checkpoint_path(directory, worker.stage)
    if not path.exists():
        return
    try:
        state = read_verified(path)
        worker.load_state_dict(state)
    except (CheckpointError, ValueError) as e:
        raise _fail(str(e))
    p = worker.sync.progress
    worker.resumed_from = {"path": str(path), "inner_step": worker.trainer.inner_step, "round": p.round,
                           "global_hash": p.global_hash}
    print(f"[stage {worker.stage}] resumed from checkpoint {path}: inner step {worker.trainer.inner_step}, "
          f"round {p.round}, weights {p.global_hash}", flush=True)


def run_peer(cfg, args, shard: tuple[int, int]) -> int:
    from swarm_peer.baseline import resolve_device
    from swarm_peer.data import ShardSampler, load_corpus, validation_microbatches
    from swarm_peer.compression import wire_per_step
    from swarm_peer.memory import check_fits
    from swarm_peer.records import local_public_key, make_validators
    from swarm_peer.stage_worker import StageWorker
    from swarm_peer import placement
    from swarm_peer.event_loop import LoopThread
    from swarm_peer import standing_group
    from swarm_peer.lanes import LaneClient, LaneServer

    device = resolve_device(cfg.run.device)

    def preflight():
        memory = check_fits(cfg, args.stage, device)  # before the stage allocates anything
        print(f"[stage {args.stage}] memory estimate ({device.type}, {cfg.swarm.sync_mode}, {cfg.swarm.max_inflight} "
              f"microbatches in flight): {memory.describe()}", flush=True)
        wire = wire_per_step(cfg, args.stage)
        if wire is not None:  # what swarm.compression saves on the links to the neighbour stages
            c, mib = cfg.swarm.compression, 2 ** 20
            print(f"[stage {args.stage}] pipeline wire per batch of {cfg.data.batch_size} sequences: "
                  f"{wire[0] / mib:.2f} MiB (hidden states {c.forward}, their gradients {c.backward}; fp32 would be "
                  f"{wire[1] / mib:.2f} MiB, {1 - wire[0] / wire[1]:.0%} saved)", flush=True)
        return load_corpus(cfg) if args.stage == 0 else None  # before training: a bad data source fails fast

    auto = args.stage == "auto"
    fits = placement.fitting_stages(cfg, device) if auto else None  # before joining: none fits -> exit 2
    corpus = None if auto else preflight()  # a known stage is checked before joining the DHT
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    validators = make_validators(args.run_id, cfg.swarm.num_stages, args.identity.key)
    dht = start_dht(args, validators)
    loop = worker = lanes = lane_server = group_server = chosen_from = None
    try:
        if auto:
            args.stage = placement.checkpointed_stage(args.checkpoint_dir, cfg.swarm.num_stages)
            if args.stage is not None:
                print(f"[stage auto] taking stage {args.stage}: the stage of the checkpoint in {args.checkpoint_dir}",
                      flush=True)
            else:
                args.stage, loads = placement.place(dht, cfg, args.run_id, local_public_key(validators), fits)
                print(f"[stage auto] taking stage {args.stage} ({placement.describe(loads)})", flush=True)
                chosen_from = [vars(load) for load in loads]
            retag_logging(f"stage {args.stage}", args.verbose)
            corpus = preflight()
        sampler = None
        if corpus is not None:
            # with an explicit shard all stage-0 peers split one permutation; otherwise each peer shuffles the
            # whole set in its own order (seeded by its id), which needs no coordination
            seed = cfg.run.seed if args.data_shard else cfg.run.seed + int.from_bytes(dht.peer_id.to_bytes()[-4:], "big")
            sampler = ShardSampler(corpus.train, cfg.data.microbatch_size, seed, *shard)
        loop = LoopThread()
        p2p = loop.run(dht.replicate_p2p(), timeout=60)
        maddrs = sorted(dht.get_visible_maddrs(), key=_is_loopback)
        val = validation_microbatches(corpus, cfg.data.microbatch_size, cfg.run.eval_batches) if corpus else []
        lanes = LaneClient(p2p, args.run_id, args.swarm_key) if cfg.swarm.direct_lanes else None
        worker = StageWorker(cfg, args.stage, dht, p2p, args.run_id, local_public_key(validators), device, sampler,
                             client_mode=args.client_mode,
                             address=str(maddrs[0]) if maddrs else "", val_batches=val,
                             metrics_period=cfg.run.metrics_period, swarm_key=args.swarm_key, lanes=lanes)
        if args.checkpoint_dir:
            worker.checkpoint_dir = args.checkpoint_dir
            resume(worker, args.checkpoint_dir)
        # adopt the stage's current weights (DiLoCo state) before serving or announcing anything; a resumed peer
        # whose stage has moved on downloads the newer state
        loop.run(worker.sync.join(worker._refresh_stage), timeout=15 * max(30.0, cfg.swarm.averaging_timeout))
        if not args.client_mode:  # stage 0 serves eval/sample requests (`python -m swarm_peer sample`)
            servicer = worker.servicer()
            if cfg.swarm.direct_lanes:
                lane_server = servicer.lanes = LaneServer(servicer, *lane_endpoints(args, maddrs),
                                                          port=cfg.swarm.lane_port)
                try:
                    loop.run(lane_server.start(), timeout=30)
                except OSError as e:  # e.g. swarm.lane_port taken
                    raise _fail(f"cannot listen for direct lanes on {lane_server.bind_host} port "
                                f"{cfg.swarm.lane_port}: {e.strerror or e}") from None
            loop.run(servicer.add_p2p_handlers(p2p, namespace=args.run_id), timeout=30)
            if cfg.swarm.sync_mode == "sync" and cfg.swarm.direct_lanes:  # rounds with no matchmaking once formed
                group_server = loop.run(standing_group.start(cfg, worker.sync, p2p, f"{args.run_id}_fast{args.stage}",
                                                             *lane_endpoints(args, maddrs), args.swarm_key), timeout=30)
        print(f"[stage {args.stage}] peer {dht.peer_id} serving layers [{worker.spec.start}:{worker.spec.end}] of "
              f"{cfg.model.num_layers}, run {args.run_id!r}", flush=True)

        def on_signal(signum, _frame):
            print(f"[stage {args.stage}] got signal {signum}; stopping", flush=True)
            if worker.stop_event is not None:
                loop.loop.call_soon_threadsafe(worker.stop_event.set)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        future = loop.submit(worker.main(cfg.run.max_steps))
        while True:  # wait in slices so signal handlers run in the main thread
            try:
                future.result(timeout=0.5)
                break
            except concurrent.futures.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                continue
        if args.checkpoint_dir:
            loop.run(worker.save_checkpoint("signal" if worker.stop_event.is_set() else "end"), timeout=300)
        summary = worker.summary()
        summary["placement"] = {"auto": auto, "loads": chosen_from}  # --stage auto: what it chose from
        if args.summary_json:
            Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.summary_json).write_text(json.dumps(summary, indent=1))
        if args.save_weights:
            torch.save({k: v.cpu() for k, v in worker.trainer.model.state_dict().items()}, args.save_weights)
        print(f"[stage {args.stage}] done: {summary['inner_steps']} inner steps, {summary['samples']} samples, "
              f"{summary['tokens_per_s']:,.0f} tok/s, {len(summary['sync']['rounds'])} rounds "
              f"({summary['sync']['mode']}), weights {summary['final_weights_hash']}; time {phase_shares(summary)}",
              flush=True)
        if worker.stats.get("upstream_lost"):
            print(f"error: stage {args.stage - 1} stayed out of sight for swarm.upstream_timeout "
                  f"({cfg.swarm.upstream_timeout:g} s): check this machine's network; the checkpoint (if any) and "
                  f"summary are saved", file=sys.stderr)
            return 1
        if worker.stats.get("downstream_lost"):
            print(f"error: no peer of stage 1 was visible for swarm.upstream_timeout ({cfg.swarm.upstream_timeout:g} "
                  f"s): check this machine's network and that stage-1 peers are running; the checkpoint (if any) "
                  f"and summary are saved", file=sys.stderr)
            return 1
        return 0  # finished, or stopped by a signal (the summary says which)
    finally:
        if worker is not None:
            worker.sync.shutdown()
            worker.compute.stop()
        if loop is not None:
            for server in (lane_server, group_server):
                if server is not None:
                    with contextlib.suppress(Exception):
                        loop.run(server.close(), timeout=10)
            if lanes is not None:
                loop.loop.call_soon_threadsafe(lanes.close)
            loop.stop()
        dht.shutdown()
