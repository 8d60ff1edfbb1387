"""The single-process baseline as a user runs it: loss drops, the summary has its fields, W&B offline works."""
import json
import os
import subprocess

from tests.conftest import PYTHON, ROOT


def test_baseline_trains_and_writes_summary(tmp_path, cache_dir):
    summary = tmp_path / "baseline.json"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    proc = subprocess.run(
        [PYTHON, "-m", "swarm_peer.baseline", "--config", "configs/tiny.yaml", "--max-steps", "40",
         "--set", "run.eval_interval=20", "--set", "run.log_interval=10", "--set", f"data.cache_dir={cache_dir}",
         "--set", "data.max_tokens=1000000", "--summary-json", str(summary), "--wandb-project", "swarm-peer-test"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step    40/40" in proc.stdout and "tok/s" in proc.stdout
    s = json.loads(summary.read_text())
    for key in ("config", "steps", "tokens", "train_loss", "val_loss", "final_val_loss", "tokens_per_s",
                "wall_time_s", "final_val_perplexity"):
        assert key in s
    assert s["steps"] == 40 and s["tokens"] == 40 * 16 * 128 and len(s["train_loss"]) == 40
    assert s["config"]["run"]["max_steps"] == 40
    # 5.5 nats at init (uniform over 257 bytes); well under 3.5 after 40 steps
    assert s["initial_val_loss"] > 5.0 and s["final_val_loss"] < 3.5
    assert [v for _, v in s["val_loss"]] == sorted((v for _, v in s["val_loss"]), reverse=True)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
