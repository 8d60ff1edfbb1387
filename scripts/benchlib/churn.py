"""Parts d and e, measured in one shared 2-stage x 2-peer run (part f reads its peers' summaries too):

  d  join time of a replacement stage peer (its state download) / (state bytes / loopback bandwidth)
  e  after kill -9 of a stage-1 peer's process group: stall and recovery time of stage 0 / normal step interval
"""
from __future__ import annotations

import json
import shutil
import time

from benchlib.common import ANNOUNCE_PERIOD, log, read_summaries
from benchlib.harness import Bench
from benchlib.procs import Procs
from benchlib.tracker import Tracker, event_times, longest_gap, total_at


def shared_run(bench: Bench) -> dict:
    """2 stages x 2 peers (DiLoCo, config defaults): warm up, steady window, kill -9 s1p1, watch stage 0 recover,
    start a replacement s1p2 (it downloads the stage state), stop everything with SIGTERM. Runs once per invocation:
    parts d and e share it (and its failure)."""
    if bench.shared_run is not None:
        return bench.shared_run
    if bench.shared_run_error is not None:
        raise RuntimeError(f"the shared 2x2 run failed: {bench.shared_run_error}")
    try:
        bench.shared_run = _run_kill_and_join(bench)
    except Exception as e:
        bench.shared_run_error = f"{type(e).__name__}: {e}"
        raise
    return bench.shared_run


def _run_kill_and_join(bench: Bench) -> dict:
    ttl = bench.cfg.swarm.record_ttl
    H = bench.cfg.swarm.sync_every if not bench.tiny else 5
    warm_steps = H + 2  # one outer round done before the steady window
    base_s = bench.sized(20, 10)
    # the dead peer's record expires (record_ttl) before the replacement starts; until then its stage mate may
    # still try to average with it
    obs_s = max(ttl + bench.sized(20, 6), bench.sized(25, 12))
    deadline = time.time() + bench.sized(420, 240)
    run_dir = bench.out / "def"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    common = ["swarm.num_stages=2", f"swarm.sync_every={H}", "run.eval_interval=0"]
    bench.prepare_corpus(common)
    procs = Procs(run_dir)
    tracker = Tracker("bench-def", 2, ttl, stages=(0, 1))
    info: dict = {"H": H, "record_ttl": ttl, "base_window_s": base_s, "observe_s": obs_s}

    def start(name: str, stage: int, extra=()) -> None:
        procs.start(name, bench.peer_args("bench-def", stage, name, run_dir, tracker.maddr, common,
                                          ["--max-steps", "1000000", *extra]))

    def warmed_up() -> bool:
        steps = tracker.peer_steps(0)
        return len(steps) == 2 and min(steps.values()) >= warm_steps

    try:
        for p in range(2):
            start(f"s1p{p}", 1)
        for p in range(2):
            start(f"s0p{p}", 0, ["--data-shard", f"{p}/2"])
        for n in ("s1p0", "s1p1", "s0p0", "s0p1"):
            procs.wait_line(n, r"serving layers", deadline, "serving")
        log("4 peers serving")
        tracker.wait(warmed_up, deadline, f"stage 0 at {warm_steps} steps", procs)
        log(f"stage 0 warmed up ({warm_steps} steps each); steady window {base_s:g} s")
        t_base0 = time.time()
        time.sleep(base_s)
        victim_id = (run_dir / "s1p1.maddrs").read_text().split()[0].split("/p2p/")[-1]
        t_kill = time.time()
        procs.kill("s1p1")
        info["t_kill"] = t_kill
        log(f"killed s1p1 (kill -9 of its process group); watching stage 0 for {obs_s:g} s")
        time.sleep(obs_s)
        t_join = time.time()
        start("s1p2", 1)
        t_serving = procs.wait_line("s1p2", r"serving layers", deadline, "the replacement serving")
        log(f"replacement s1p2 serving after {t_serving - t_join:.1f} s")
        time.sleep(2.0)
        info.update(join_start_to_serving_s=t_serving - t_join)
        series0, series1 = tracker.series(0), tracker.series(1)
        (run_dir / "timeline.json").write_text(json.dumps(
            {"t_base0": t_base0, "t_kill": t_kill, "t_join": t_join, "info": info, "stage0": series0,
             "stage1": series1, "fields": ["t", "inner_step", "samples", "state", "round"]}))
    finally:
        # a peer stopped in the middle of an outer round finishes it first (up to swarm.averaging_timeout)
        killed = procs.close(grace=bench.cfg.swarm.averaging_timeout + 20)
        tracker.close()
    names = ["s0p0", "s0p1", "s1p0", "s1p2"]
    summaries = read_summaries(run_dir, names)
    info["exit_codes"] = {n: procs.procs[n].returncode for n in [*names, "s1p1"]}
    bench.summaries["def"] = summaries
    return {"info": info, "series0": series0, "t_base0": t_base0, "t_kill": t_kill, "victim": victim_id,
            "summaries": summaries, "leftover_pids_killed": killed, "series1": series1}


def part_d(bench: Bench) -> dict:
    run = shared_run(bench)
    bw = bench.loopback_bandwidth()
    if "s1p2" not in run["summaries"]:  # a peer writes its summary on SIGTERM before shutting hivemind down
        raise RuntimeError(f"no summary from the replacement s1p2 (exit codes {run['info']['exit_codes']}):\n"
                           + (bench.out / "def" / "s1p2.log").read_text()[-3000:])
    joiner = run["summaries"]["s1p2"]
    joins = [r for r in joiner["sync"]["recoveries"] if r["reason"] == "joining the stage"]
    if not joins:
        raise RuntimeError(f"the replacement recorded no join download: {joiner['sync']['recoveries']}")
    j = joins[0]
    ideal = j["bytes"] / bw["bytes_per_s"]
    return {"ratios": {"d.join": j["seconds"] / ideal},
            "figures": {"join_seconds": j["seconds"], "state_bytes": j["bytes"], "donors": j["donors"],
                        "loopback_bytes_per_s": bw["bytes_per_s"], "loopback_payload_bytes": bw["bytes"],
                        "ideal_seconds": ideal,
                        "process_start_to_serving_s": run["info"]["join_start_to_serving_s"]},
            "definitions": {"d.join": "a replacement stage-1 peer's state download when joining (its "
                                      "sync.recoveries[0].seconds, reason 'joining the stage': request, download "
                                      "from the donors, hash check, load) / (downloaded state bytes / loopback "
                                      "bandwidth of one raw TCP stream, measured with a big echo payload)"}}


def part_e(bench: Bench) -> dict:
    run = shared_run(bench)
    s0, t_kill, t_b = run["series0"], run["t_kill"], run["t_base0"]
    base = t_kill - t_b
    steps_base = total_at(s0, t_kill, 1) - total_at(s0, t_b, 1)
    samples_base = total_at(s0, t_kill, 2) - total_at(s0, t_b, 2)
    if steps_base <= 0:
        raise RuntimeError("stage 0 made no step in the steady window")
    interval = base / steps_base  # stage-level: time between two inner steps of any stage-0 peer
    r0 = samples_base / base
    expected = r0 * 1 / 2  # stage 1 lost 1 of its 2 peers
    times = [t for t in event_times(s0) if t > t_kill]
    stall = longest_gap(s0, t_kill, t_kill + run["info"]["observe_s"])
    normal_gap = longest_gap(s0, t_b, t_kill)
    window = max(5 * interval, 2.0)
    obs_end = t_kill + run["info"]["observe_s"]
    # sustained recovery: from this reading on, every rolling-rate reading in the window stays >= 90 %
    recovered = None
    for t in [t for t in times if t_kill + window <= t <= obs_end]:
        ok = (total_at(s0, t, 2) - total_at(s0, t - window, 2)) / window >= 0.9 * expected
        recovered = (recovered or t) if ok else None
    half = (obs_end - t_kill) / 2
    r1 = (total_at(s0, obs_end, 2) - total_at(s0, obs_end - half, 2)) / half
    censored = recovered is None
    rec_s = (recovered if recovered is not None else obs_end) - t_kill  # >= window by construction
    seq = bench.cfg.data.seq_len
    return {"ratios": {"e.stall": stall / interval, "e.stall_vs_pre_kill_gap": stall / normal_gap,
                       "e.recovery": rec_s / interval},
            "figures": {"step_interval_s": interval, "stall_s": stall, "pre_kill_longest_gap_s": normal_gap,
                        "recovery_s": rec_s,
                        "recovery_censored": censored, "rolling_window_s": window,
                        "recovery_window_start_s": rec_s - window,
                        "pre_kill_tokens_per_s": r0 * seq, "post_kill_tokens_per_s": r1 * seq,
                        "post_over_pre": r1 / r0, "expected_surviving_tokens_per_s": expected * seq,
                        "steady_window_s": base, "observe_s": run["info"]["observe_s"],
                        "announce_period_s": ANNOUNCE_PERIOD},
            "definitions": {
                "e.stall": "longest time without any completed stage-0 inner step in the observation window "
                           "that starts at the kill -9 (whole process group of stage-1 peer s1p1, p2pd "
                           "included); steps are seen in the stage records (every 0.5 s: +-0.5 s) / normal step "
                           "interval (steady window before the kill / inner steps of all stage-0 peers in it)",
                "e.stall_vs_pre_kill_gap": "the same longest gap / the longest gap in the steady window before "
                                           "the kill (DiLoCo rounds pause steps too)",
                "e.recovery": "time from the kill until stage 0's rolling token rate (over the last W = "
                              "max(5 step intervals, 2 s), all after the kill, so never below W) reads >= 90% of "
                              "the expected surviving capacity (pre-kill rate x 1/2: stage 1 keeps 1 of 2 peers) "
                              "and stays there to the end of the observation window / normal step interval"
                              + (" (not reached: the observation window, a lower bound)" if censored else "")}}
