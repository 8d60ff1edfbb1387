"""swarm-peer export alone (real transformers models, no network): stage files -> one transformers model directory
that computes what the stages compute, for both families; bad input is one line."""
import json
import subprocess

import pytest
import torch

from swarm_peer.config import load_config
from swarm_peer.export import ExportError, full_state, stage_files, write
from swarm_peer.model import build_stage, weights_hash
from tests.conftest import PYTHON, ROOT
from tests.swarm_harness import FAST


@pytest.mark.parametrize("config, over", [(None, []), ("configs/llama-tiny.yaml", ["model.num_kv_heads=2"])])
def test_stage_files_become_one_transformers_model(tmp_path, config, over):
    from transformers import AutoModelForCausalLM

    cfg = load_config(config, [*FAST, "swarm.num_stages=2", *over])
    for stage in range(2):
        model = build_stage(cfg, stage)
        with torch.no_grad():  # trained weights, not the seeded init (the init is the same on both sides)
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        torch.save(model.state_dict(), tmp_path / f"stage{stage}_peer0.pt")
        summary = {"stage": stage, "config": cfg.model_dump(mode="json"), "final_weights_hash": weights_hash(model)}
        (tmp_path / f"stage{stage}_peer0.json").write_text(json.dumps(summary))
    got_cfg, files = stage_files(tmp_path)
    assert got_cfg == cfg and [f.name for f in files] == ["stage0_peer0.pt", "stage1_peer0.pt"]
    state = full_state(cfg, files)
    write(cfg, state, tmp_path / "model")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "model", local_files_only=True).eval()
    ours = build_stage(cfg, None)
    ours.load_state_dict(state)
    ours.eval()
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-4)


def test_a_run_without_weights_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "stage0_peer0.json").write_text(json.dumps({"stage": 0, "config": load_config(None).model_dump(
        mode="json"), "final_weights_hash": "0" * 16}))
    with pytest.raises(ExportError, match="--save-weights"):
        stage_files(tmp_path)
    proc = subprocess.run([PYTHON, "-m", "swarm_peer", "export", str(tmp_path / "nope"), "--out", str(tmp_path / "m")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no peer summaries" in proc.stderr
