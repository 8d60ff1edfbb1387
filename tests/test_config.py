import subprocess

import pytest

from swarm_peer.config import Config, ConfigError, load_config
from tests.conftest import PYTHON, ROOT


@pytest.mark.parametrize("name", ["tiny", "gpt2-small", "llama-tiny"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert isinstance(cfg, Config)


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["optim.inner.lr=3e-4", "data.seq_len=64", "swarm.stage_boundaries=[2]",
                             "swarm.compression.forward=fp16", "run.device=cuda:1"])
    assert cfg.optim.inner.lr == 3e-4 and cfg.data.seq_len == 64
    assert cfg.swarm.stage_boundaries == [2] and cfg.swarm.compression.forward == "fp16"
    assert cfg.run.device == "cuda:1"


@pytest.mark.parametrize("override, field", [
    ("optim.inner.lr=abc", "optim.inner.lr"),
    ("optim.inner.lr=-1", "optim.inner.lr"),
    ("optim.inner.nope=1", "optim.inner.nope"),
    ("nosection.x=1", "nosection"),
    ("data.seq_len=0", "data.seq_len"),
    ("swarm.num_stages=99", "num_stages"),
    ("swarm.stage_boundaries=[3,2]", "stage_boundaries"),
    ("swarm.compression.forward=zip", "swarm.compression.forward"),
    ("data.batch_size=10", "batch_size"),
    ("run.device=tpu", "device"),
    ("lr", "lr"),
])
def test_bad_overrides_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert field in msg and "\n" not in msg


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  hiden_size: 10\n")
    with pytest.raises(ConfigError, match="model.hiden_size: unknown field"):
        load_config(typo)


@pytest.mark.parametrize("args", [["--set", "optim.inner.lr=abc"], ["--config", "/nonexistent.yaml"],
                                  ["--set", "model.bogus=1"], ["--set", "model.vocab_size=100"]])
def test_cli_exits_2_with_one_line(args):
    proc = subprocess.run([PYTHON, "-m", "swarm_peer.baseline", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: config:"), proc.stderr


def test_vocab_size_follows_the_bytes_tokenizer_and_explicit_values_stay():
    from swarm_peer.model import stage_fingerprint

    auto = load_config(None)
    assert auto.model.vocab_size == 257
    for name in ("tiny", "llama-tiny"):  # their YAML leaves model.vocab_size to the tokenizer
        assert load_config(ROOT / "configs" / f"{name}.yaml").model.vocab_size == 257
    # the resolved value hashes like the value written out: same fingerprint as before it was derived
    explicit = load_config(None, ["model.vocab_size=257"])
    assert [stage_fingerprint(auto, i) for i in range(2)] == [stage_fingerprint(explicit, i) for i in range(2)]
    assert load_config(None, ["model.vocab_size=1000"]).model.vocab_size == 1000
    assert load_config(ROOT / "configs" / "gpt2-small.yaml").model.vocab_size == 50257  # explicit; no hub access
    with pytest.raises(ConfigError, match="model.vocab_size 100 is smaller than the tokenizer's 257"):
        load_config(None, ["model.vocab_size=100"])


def test_vocab_size_follows_a_local_checkpoint(tmp_path):
    from transformers import GPT2Config

    GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=256).save_pretrained(tmp_path)
    cfg = load_config(None, [f"model.name_or_path={tmp_path}"])
    assert cfg.model.vocab_size == 300
    (tmp_path / "empty").mkdir()  # a directory without a checkpoint: one line, not a traceback
    with pytest.raises(ConfigError, match="model.name_or_path"):
        load_config(None, [f"model.name_or_path={tmp_path / 'empty'}"])
