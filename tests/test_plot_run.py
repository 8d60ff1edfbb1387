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
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"train_loss": [[1, 5.1], [2, 4.2]], "val_loss": [[0, 5.5], [2, 4.0]]}))
    out = tmp_path / "loss.png"
    proc = subprocess.run([PYTHON, "scripts/plot_run.py", str(run), "--baseline", str(baseline), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    bad = subprocess.run([PYTHON, "scripts/plot_run.py", str(tmp_path / "nope")], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
