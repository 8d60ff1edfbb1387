"""scripts/bench.py --tiny and scripts/bench_wan.py produce well-formed reports: every ratio of the parts run is
present, finite and positive, and the markdown lists them. Benchmarks, not timed tests: no assertion on speed.

Parts run here: SWARM_BENCH_TEST_PARTS, default "b,f": the cheapest pair that still covers both kinds of part, a
helper script (b: scripts/bench_hop.py) and a real swarm (f: a 2-stage x 1-peer run, its summaries, process
cleanup); ~30 s on an idle 2-core machine. "a,b,c,d,e,f" runs everything (~6-8 min)."""
import json
import math
import os
import re
import signal
import subprocess

import pytest

from tests.conftest import PYTHON, ROOT

pytestmark = pytest.mark.slow

EXPECTED = {"a": ["a.steady", "a.end_to_end", "a.steady_vs_1_thread", "a.tokens_per_cpu_s"],
            "b": ["b.none", "b.fp16", "b.8bit"],
            "c": ["c.fp32", "c.fp16", "c.8bit", "c.sync_measured_vs_formula"], "d": ["d.join"],
            "e": ["e.stall", "e.stall_vs_pre_kill_gap", "e.recovery"], "f": ["f.median", "f.max"],
            "g": ["g.memory_vs_target_max", "g.round_vs_transport_median", "g.round_vs_transport_max",
                  "g.allreduce_vs_transport_median", "g.join_vs_transport", "g.checkpoint_pause_vs_step_max",
                  "g.sync_blocked_share_max"], "h": ["h.sync_vs_gloo"]}


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a bench script in its own session; on timeout SIGTERM it (it stops what it started), then SIGKILL.
    The result's `pid` is the script's PID (bench_wan names its namespaces after it)."""
    proc = subprocess.Popen([PYTHON, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"{args[0]} did not finish in {timeout} s:\n{out[-4000:]}")
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, None)
    done.pid = proc.pid
    return done


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_bench_tiny_report_is_well_formed(tmp_path):
    parts = os.environ.get("SWARM_BENCH_TEST_PARTS", "b,f").split(",")
    out = tmp_path / "bench"
    done = _run(["scripts/bench.py", "--tiny", "--only", ",".join(parts), "--out", str(out)], timeout=900)
    assert done.returncode == 0, done.stdout[-4000:]
    report = json.loads((out / "bench.json").read_text())
    md = (out / "bench.md").read_text()
    assert report["meta"]["tiny"] is True and report["meta"]["parts"] == parts
    for part in parts:
        res = report["parts"][part]
        assert "error" not in res, res["error"]
        for name in EXPECTED[part]:
            assert name in res["ratios"], (name, res["ratios"])
        for name, value in res["ratios"].items():
            assert _positive(value), (name, value)
            assert res["definitions"][name]
            assert report["ratios"][name] == value
            assert f"| {name} | " in md, name
    assert set(report["parts"]) == set(parts)
    rows = [line for line in md.splitlines() if line.startswith("| ") and line.count("|") == 4]
    assert len(rows) >= 1 + sum(len(report["parts"][p]["ratios"]) for p in parts), md


def test_bench_wan_exits_0_and_writes_json(tmp_path):
    """Link check only (namespaces, tbf, a TCP transfer through them, cleanup); skipped without root/ip netns."""
    out = tmp_path / "wan"
    done = _run(["scripts/bench_wan.py", "--link-check-only", "--out", str(out)], timeout=180)
    assert done.returncode == 0, done.stdout[-4000:]
    report = json.loads((out / "bench_wan.json").read_text())
    assert report["status"] in ("skipped", "link-check"), report
    if report["status"] == "skipped":
        assert report["reason"]
    else:
        assert _positive(report["link_check"]["ratio_to_rate"]) and report["link_check"]["bytes"] > 0
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        ours = re.compile(rf"spw{done.pid % 100000}(sw|h\d+|probe)$")
        assert not [n for n in namespaces if ours.match(n)], namespaces  # cleaned up
    assert (out / "bench_wan.md").read_text().startswith("# Emulated WAN")
