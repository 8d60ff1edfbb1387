"""What the commands that join a swarm share (the peer, the monitor, `status`, `sample`): network arguments and
their checks, starting the DHT (swarm time, reaper, join line), the direct lanes' endpoints, console logging."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

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


def retag_logging(tag: str, verbose: bool) -> None:
    """The console prefix once `--stage auto` has chosen (setup_logging's handler)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, _ConsoleFormat):
            handler.setFormatter(_ConsoleFormat(tag, verbose))


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
