"""`python -m swarm_peer [--stage N ...]` starts a stage peer; the first word picks another tool:
`monitor` (aggregate metrics, log to W&B), `status` (who serves what), `sample` (generate through the swarm),
`baseline` (the single-process reference trainer), `keygen` (a new swarm key for a private swarm)."""
import sys

TOOLS = {"baseline": "swarm_peer.baseline", "monitor": "swarm_peer.monitor", "status": "swarm_peer.status",
         "sample": "swarm_peer.sample", "keygen": "swarm_peer.swarm_key"}


def main() -> int:
    import importlib

    argv = sys.argv[1:]
    if argv and argv[0] in TOOLS:
        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    from swarm_peer.peer import main as peer_main

    return peer_main(argv)


if __name__ == "__main__":
    sys.exit(main())
