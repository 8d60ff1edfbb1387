"""Test-only: run `python -m swarm_peer ...` on a machine whose wall clock is off by $SWARM_TEST_CLOCK_OFFSET seconds.

Usage (the harness's `prefix`): python tests/skewed_peer.py <python> -m swarm_peer <args...>. time.time is shifted
before anything imports it, so hivemind's DHT time, its DHT and averager processes (forked from this one) and every
record this peer stores see the skewed clock, as on a machine with a wrong clock; time.monotonic is untouched."""
import os
import runpy
import sys
import time

offset = float(os.environ["SWARM_TEST_CLOCK_OFFSET"])
_real = time.time
time.time = lambda: _real() + offset
assert sys.argv[2:4] == ["-m", "swarm_peer"], sys.argv
sys.argv = ["swarm_peer", *sys.argv[4:]]
runpy.run_module("swarm_peer", run_name="__main__", alter_sys=True)
