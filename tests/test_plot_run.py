"""scripts/plot_run.py renders a PNG from a run directory (peer summaries + monitor history) and a baseline."""
import json
import subprocess

from tests.conftest import PYTHON, ROOT


def test_plot_run_writes_a_png(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for stage in range(2):
        summary = {"stage": stage, "num_stages": 2, "loss_curve": [[1, 5.0], [2, 4.0], [3, 3.5]],
                   "eval_curve": [[3, 3.6]] if stage == 0 else []}
        (run / f"stage{stage}_peer0.json").write_text(json.dumps(summary))
    (run / "monitor.jsonl").write_text("\n".join(json.dumps({"step": i, "loss": 5.0 - i}) for i in range(3)))
    broken = run / "wandb" / "offline-run-x" / "run-x.wandb"  # a run stopped before W&B wrote a readable row
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a wandb file")
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"train_loss": [[1, 5.1], [2, 4.2]], "val_loss": [[0, 5.5], [2, 4.0]]}))
    out = tmp_path / "loss.png"
    proc = subprocess.run([PYTHON, "scripts/plot_run.py", str(run), "--baseline", str(baseline), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from plot_run import end_range, load_monitor

    assert [r["loss"] for r in load_monitor(run)] == [5.0, 4.0, 3.0]  # the history that has the rows
    lo, hi = end_range([9.0] + [3.0 + 0.01 * i for i in range(20)])
    assert hi < 4.0 and lo < 3.0  # the first step's loss is left out of the range
    help_text = subprocess.run([PYTHON, "scripts/plot_run.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                               timeout=60).stdout
    assert "tokens" in help_text and "--baseline" in help_text and "outer rounds" in help_text
    bad = subprocess.run([PYTHON, "scripts/plot_run.py", str(tmp_path / "nope")], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
