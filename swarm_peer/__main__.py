"""`python -m swarm_peer [--stage N ...]` starts a stage peer; `python -m swarm_peer baseline ...` the baseline."""
import sys


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] == "baseline":
        from swarm_peer.baseline import main as baseline_main

        return baseline_main(argv[1:])
    from swarm_peer.peer import main as peer_main

    return peer_main(argv)


if __name__ == "__main__":
    sys.exit(main())
