"""run_local_experiment.sh stopped by Ctrl-C as a researcher stops it: what the run did survives (real processes,
real hivemind, real wandb offline)."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from swarm_peer.launch import group_pids
from swarm_peer.wandb_log import read_history
from tests.conftest import ROOT
from tests.swarm_harness import FAST

pytestmark = pytest.mark.slow


def test_ctrl_c_keeps_every_summary_and_the_wandb_rows(cache_dir):
    """Seen before the launcher stopped peers in order: Ctrl-C 40 s in gave exit 130 after 10.5 s, no peer's `done:`,
    no summary file, 0 readable W&B rows (a TERM to each whole process group killed the DHT child under its peer)."""
    run_id = f"pytest-{uuid.uuid4().hex[:8]}"
    run_dir = ROOT / "runs" / run_id
    extra = []
    for o in [*FAST, f"data.cache_dir={cache_dir}", "run.metrics_period=2", "swarm.sync_every=5"]:
        extra += ["--set", o]
    try:
        # its own session, as a shell's foreground job: Ctrl-C is a SIGINT to that whole process group
        proc = subprocess.Popen(["bash", "run_local_experiment.sh", "--run-id", run_id, "--max-steps", "100000",
                                 "--wandb-project", "pytest", "--checkpoints", "--", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env={**os.environ, "WANDB_MODE": "offline"})
        lines, deadline = [], time.monotonic() + 180
        while time.monotonic() < deadline:  # until the monitor has logged a window with a loss
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("[monitor]") and len(line.split()) > 2 and line.split()[1].isdigit() and \
                    line.split()[2] != "-":
                break
        assert proc.poll() is None, "".join(lines[-50:])
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        stop_s = time.monotonic() - t0
        out = "".join(lines) + out
        assert proc.returncode == 130, out[-4000:]
        assert "stopping" in out and f"run {run_id} stopped" in out, out[-3000:]
        for s in range(2):
            for p in range(2):
                summary = json.loads((run_dir / f"stage{s}_peer{p}.json").read_text())
                assert summary["state"] == "offline" and summary["inner_steps"] > 0, summary["state"]
                assert f"[stage{s}/peer{p}] [stage {s}] done:" in out
                assert (run_dir / f"stage{s}_peer{p}.pt").exists()  # its final weights
                assert (run_dir / "ckpt" / f"stage{s}_peer{p}" / f"stage{s}.ckpt").exists()  # and a checkpoint
        assert "no peer summaries written" not in out and "train loss (last" in out  # the end-of-run table
        run_files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
        assert len(run_files) == 1
        rows = [row for row in read_history(run_files[0]) if "loss" in row]
        assert rows, out[-3000:]
        plot = subprocess.run([sys.executable, "scripts/plot_run.py", str(run_dir)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert plot.returncode == 0 and (run_dir / "loss.png").stat().st_size > 10_000, plot.stderr  # plottable
        pids = [int(line.split()[0]) for line in (run_dir / "pids").read_text().splitlines()]
        assert len(pids) == 5 and not any(group_pids(pid) for pid in pids)
        print(f"\nstopped in {stop_s:.1f}s; {len(rows)} W&B rows with a loss")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(run_dir, ignore_errors=True)
