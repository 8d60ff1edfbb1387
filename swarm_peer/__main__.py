"""`swarm-peer --stage N ...` (or `python -m swarm_peer --stage N ...`) starts a stage peer; a first word picks
another command (COMMANDS)."""
import sys

COMMANDS = {  # name -> (module, what it does)
    "monitor": ("swarm_peer.monitor", "a peer that hosts no stage: the global loss per window, console + W&B"),
    "status": ("swarm_peer.status", "who serves which stage: per-stage tables, totals, warnings"),
    "sample": ("swarm_peer.sample", "generate text through the live pipeline"),
    "baseline": ("swarm_peer.baseline", "the single-process reference trainer (same model, data and optimizer)"),
    "export": ("swarm_peer.export", "a run's trained model as a transformers model directory (from its peers' weights)"),
    "keygen": ("swarm_peer.swarm_key", "a new swarm key file for a private swarm"),
}


def main() -> int:
    import importlib

    import signal

    # Ctrl-C raises KeyboardInterrupt (below) even where the parent ignored SIGINT, as a non-interactive shell does for
    # its background jobs (`cmd &`): a peer started that way could not be stopped during its start-up (CI saw it)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    argv = sys.argv[1:]
    try:
        if argv and argv[0] in COMMANDS:
            return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])
        from swarm_peer.peer import main as peer_main

        return peer_main(argv)
    except KeyboardInterrupt:  # Ctrl-C before a command's own handler is up (a peer's start-up: data, DHT, join);
        # whatever had started was stopped on the way out (each command's `finally`)
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `swarm-peer status --json | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0


if __name__ == "__main__":
    sys.exit(main())
