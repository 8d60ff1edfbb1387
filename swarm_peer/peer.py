"""`python -m swarm_peer --stage N [--initial-peers MADDR ...]`: start a peer hosting one pipeline stage.

Joins (or starts) the run's hivemind DHT, prints a copy-pasteable join line, announces its stage, trains until
the run's end (stage 0: `run.max_steps` inner steps; later stages: until the previous stage has finished), writes
its JSON summary and exits 0.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ipaddress
import json
import logging
import os
import signal
import sys
from pathlib import Path

import torch

from swarm_peer.config import ConfigError, add_config_args, config_from_args

log = logging.getLogger("swarm_peer")


def add_network_args(parser: argparse.ArgumentParser, joins_only: bool = False) -> None:
    """hivemind's conventions; dashes and underscores both accepted. `joins_only`: a tool that needs a swarm."""
    parser.add_argument("--initial-peers", "--initial_peers", nargs="*", default=[], metavar="MADDR",
                        help="multiaddrs of any running peers of the swarm (…/p2p/<peer id>, the 'To join this swarm' "
                             "line a peer prints)" + ("" if joins_only else "; none = start a new swarm"))
    parser.add_argument("--run-id", "--run_id", default="swarm", help="DHT prefix: several swarms can share one DHT")
    parser.add_argument("--host-maddrs", "--host_maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/0"],
                        help="where to listen (default: all interfaces, random port)")
    parser.add_argument("--announce-maddrs", "--announce_maddrs", nargs="+", default=None,
                        help="public addresses to announce (behind NAT / port forwarding)")
    parser.add_argument("--identity-path", "--identity_path", help="private key file for a stable peer id")
    parser.add_argument("--client-mode", "--client_mode", action="store_true",
                        help="make only outgoing connections (stage 0 / tools behind NAT)")
    parser.add_argument("--maddrs-file", "--maddrs_file", help="write this peer's multiaddrs here, one per line")
    parser.add_argument("--swarm-key-file", "--swarm_key_file", metavar="PATH",
                        help="private swarm: every member needs this key file (make one: python -m swarm_peer "
                             "keygen PATH); without it a process can neither use the run's DHT nor send work")
    parser.add_argument("--verbose", "-v", action="store_true", help="hivemind's own logs at info level")


def _fail(message: str) -> "SystemExit":
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(2)


def check_network_args(args) -> None:
    from hivemind.utils.multiaddr import Multiaddr

    for maddr in args.initial_peers:
        try:
            parsed = Multiaddr(maddr)
        except Exception:
            raise _fail(f"--initial-peers: {maddr!r} is not a multiaddr (like /ip4/1.2.3.4/tcp/31337/p2p/Qm…)")
        if "/p2p/" not in str(parsed):
            raise _fail(f"--initial-peers: {maddr!r} must end with /p2p/<peer id>")
    for flag in ("host_maddrs", "announce_maddrs"):
        for maddr in getattr(args, flag) or []:
            try:
                Multiaddr(maddr)
            except Exception:
                raise _fail(f"--{flag.replace('_', '-')}: {maddr!r} is not a multiaddr")
    from swarm_peer.records import RUN_ID_RE

    if not RUN_ID_RE.match(args.run_id):
        raise _fail(f"--run-id {args.run_id!r}: use 1-64 letters, digits or '-'")
    if args.client_mode and not args.initial_peers:
        raise _fail("--client-mode needs --initial-peers of a peer that accepts connections")
    from swarm_peer.swarm_key import SwarmKey, SwarmKeyError

    try:
        args.swarm_key = SwarmKey.from_file(args.swarm_key_file) if args.swarm_key_file else None
    except SwarmKeyError as e:
        raise _fail(f"--swarm-key-file: {e}")
    from swarm_peer.identity import Identity, IdentityError

    try:
        args.identity = Identity(args.identity_path)  # its key signs this peer's records too (identity.py)
    except IdentityError as e:
        raise _fail(f"--identity-path: {e}")


def lane_endpoints(args, visible) -> tuple[str, list[str]]:
    """Where this peer's direct lane listens (the host of its first --host-maddrs: 0.0.0.0 = every interface) and
    the addresses callers are told to try: those of --announce-maddrs, else of its visible addresses (non-loopback
    first), or the one address it listens on."""
    def host(maddr) -> str | None:
        parts = str(maddr).split("/")
        return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6") else None

    bind = next(filter(None, map(host, args.host_maddrs or [])), "0.0.0.0")
    if bind not in ("0.0.0.0", "::"):
        return bind, [bind]
    told = [h for h in map(host, args.announce_maddrs or visible) if h and h not in ("0.0.0.0", "::")]
    return bind, list(dict.fromkeys(told)) or ["127.0.0.1"]


def _is_loopback(maddr) -> bool:
    parts = str(maddr).split("/")
    try:
        return len(parts) > 2 and parts[1] in ("ip4", "ip6") and ipaddress.ip_address(parts[2]).is_loopback
    except ValueError:
        return False


def start_dht(args, validators, quiet: bool = False):
    """Start the DHT (behind the swarm key, if any); print the join line; write the maddrs file; warn about unusable
    setups."""
    import hivemind

    from swarm_peer import swarm_time
    from swarm_peer.reaper import start_reaper
    from swarm_peer.swarm_key import SwarmKeyAuthorizer, SwarmKeyValidator

    start_reaper()  # before the DHT forks: on kill -9 of this process, its DHT, p2pd and averagers go too
    swarm_time.install()  # ... and so does the swarm-time clock every process of this peer reads

    key = getattr(args, "swarm_key", None)
    if key is not None:
        validators = list(validators) + [SwarmKeyValidator(key)]
    unreachable = (f"none of --initial-peers answered ({', '.join(args.initial_peers or [])}): check the address "
                   f"(copy the 'To join this swarm' line a running peer prints), that its peer is running and that its "
                   f"port is reachable from this machine")
    with args.identity.p2pd_file() as identity_path:
        try:
            dht = hivemind.DHT(initial_peers=args.initial_peers, host_maddrs=args.host_maddrs,
                               announce_maddrs=args.announce_maddrs, identity_path=identity_path,
                               check_if_identity_free=args.identity_path is not None,  # a fresh key is free
                               client_mode=args.client_mode, record_validators=validators, start=True,
                               startup_timeout=30, authorizer=SwarmKeyAuthorizer(key) if key is not None else None,
                               ensure_bootstrap_success=False)  # its check refuses clocks 3 s apart; swarm_time
            # fixes them
        except Exception as e:  # p2pd refuses to start when it reaches no bootstrap peer (hivemind.P2PDaemonError)
            if args.initial_peers and "bootstrap" in str(e):
                raise _fail(unreachable) from None
            raise
    if args.initial_peers and swarm_time.synchronize(dht) is None:
        dht.shutdown()
        raise _fail(unreachable)
    if key is not None and not quiet:
        print(f"private swarm: swarm key fingerprint {key.fingerprint()}", flush=True)
    maddrs = sorted(dht.get_visible_maddrs(), key=_is_loopback)  # non-loopback first
    if args.maddrs_file:
        tmp = f"{args.maddrs_file}.tmp"
        Path(tmp).write_text("".join(f"{m}\n" for m in maddrs))
        os.replace(tmp, args.maddrs_file)
    if quiet:
        pass
    elif args.client_mode:
        print(f"peer {dht.peer_id} in client mode (others cannot join through it)", flush=True)
    elif maddrs:
        print(f"To join this swarm: --initial-peers {maddrs[0]}", flush=True)
        if all(_is_loopback(m) for m in maddrs) and any(not _is_loopback(p) for p in args.initial_peers):
            log.warning("this peer announces only loopback addresses but joins a remote swarm: remote peers "
                        "cannot reach it; use --host-maddrs /ip4/0.0.0.0/tcp/PORT and/or --announce-maddrs")
    return dht


class _ConsoleFormat(logging.Formatter):
    """One console format for this program's lines and hivemind's: `[tag] LEVEL message`, like its prints. Without
    --verbose a library's exception is one line (its type and message), not a traceback: hivemind logs expected
    failures (a closed stream, a failed matchmaking attempt) with their tracebacks."""

    def __init__(self, tag: str, verbose: bool):
        super().__init__(f"[{tag}] %(levelname)s %(message)s")
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and not self.verbose and not record.name.startswith("swarm_peer"):
            exc = record.exc_info[1]
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None,
                                            "msg": f"{record.getMessage()} ({type(exc).__name__}: {exc})", "args": ()})
        return super().format(record)


def setup_logging(verbose: bool, tag: str = "swarm_peer") -> None:
    level = "INFO" if verbose else "WARNING"
    os.environ.setdefault("HIVEMIND_LOGLEVEL", level)
    os.environ.setdefault("GOLOG_LOG_LEVEL", "error")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_ConsoleFormat(tag, verbose))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    log.setLevel(logging.INFO)
    from hivemind.utils import logging as hivemind_logging  # reads HIVEMIND_LOGLEVEL: after it is set

    hivemind_logging.use_hivemind_log_handler("nowhere")  # its lines go through the handler above
    logging.getLogger("hivemind").setLevel(os.environ["HIVEMIND_LOGLEVEL"])
    from huggingface_hub.utils import logging as hub_logging  # adds its own stderr handler at import, and its

    hub_logging.get_logger().handlers.clear()  # lines propagate to ours too: each download retry printed twice


def main(argv: list[str] | None = None) -> int:
    from swarm_peer.__main__ import COMMANDS

    parser = argparse.ArgumentParser(prog="swarm-peer", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="other commands (`swarm-peer COMMAND --help`, or `python -m swarm_peer "
                                            "COMMAND`):\n" + "\n".join(f"  {name:<10}{what}"
                                                                         for name, (_, what) in COMMANDS.items()))
    add_config_args(parser)
    parser.add_argument("--stage", type=int, required=True, help="pipeline stage this peer hosts (0-based)")
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
    extra = [f"run.max_steps={args.max_steps}"] if args.max_steps is not None else []
    extra += [f"run.device={args.device}"] if args.device else []
    cfg = config_from_args(args, extra)
    if not 0 <= args.stage < cfg.swarm.num_stages:
        raise _fail(f"--stage {args.stage}: must be in 0..{cfg.swarm.num_stages - 1} (swarm.num_stages)")
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
    from swarm_peer.event_loop import LoopThread
    from swarm_peer import standing_group
    from swarm_peer.lanes import LaneClient, LaneServer

    device = resolve_device(cfg.run.device)
    memory = check_fits(cfg, args.stage, device)  # before anything is allocated
    print(f"[stage {args.stage}] memory estimate ({device.type}, {cfg.swarm.sync_mode}, {cfg.swarm.max_inflight} "
          f"microbatches in flight): {memory.describe()}", flush=True)
    wire = wire_per_step(cfg, args.stage)
    if wire is not None:  # what swarm.compression saves on the links to the neighbour stages
        c, mib = cfg.swarm.compression, 2 ** 20
        print(f"[stage {args.stage}] pipeline wire per batch of {cfg.data.batch_size} sequences: {wire[0] / mib:.2f} MiB "
              f"(hidden states {c.forward}, their gradients {c.backward}; fp32 would be {wire[1] / mib:.2f} MiB, "
              f"{1 - wire[0] / wire[1]:.0%} saved)", flush=True)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    corpus = load_corpus(cfg) if args.stage == 0 else None  # before joining: a bad data source fails fast
    validators = make_validators(args.run_id, cfg.swarm.num_stages, args.identity.key)
    dht = start_dht(args, validators)
    loop = worker = lanes = lane_server = group_server = None
    try:
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
