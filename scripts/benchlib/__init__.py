"""Building blocks of scripts/bench.py (and scripts/bench_wan.py).

    common      paths, config overrides, the peer command line, summaries and progress lines
    procs       Procs: the processes a benchmark starts (logs, CPU samples, stopping by process group)
    tracker     Tracker: a bootstrap DHT node that records every peer's stage records; timeline helpers
    harness     Bench: one invocation's settings and state, plus the runs several parts share
    throughput  parts a (swarm vs baseline tokens/s) and b (activation hop vs raw TCP)
    sync_bytes  part c (bytes per DiLoCo round vs a per-step all-reduce)
    churn       the shared 2x2 run with a kill -9 and a replacement; parts d (join) and e (recovery)
    memory      part f (peak RSS vs training state)
    report      the markdown table and JSON clean-up
    wan_net     network namespaces + tbf links for bench_wan.py
"""
