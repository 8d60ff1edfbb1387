"""Data: offline embedded corpus, determinism, sharding, local sources, clear errors."""
import json
import os
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from swarm_peer.config import ConfigError, load_config
from swarm_peer.data import ByteTokenizer, ShardSampler, embedded_files, load_corpus, validation_microbatches
from tests.conftest import PYTHON, ROOT


def _cfg(cache_dir, *extra):
    return load_config(None, [f"data.cache_dir={cache_dir}", "data.max_tokens=300000", *extra])


def test_embedded_corpus_is_offline_and_deterministic(cache_dir, tmp_path):
    root, files = embedded_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    a = load_corpus(_cfg(cache_dir))
    assert a.train.shape[1] == 129 and a.train.dtype == np.int32 and a.val.shape[0] > 0
    assert a.train.max() <= 256 and (a.train == 256).any()  # bytes plus end-of-document separators
    # a second, independent build in a fresh process, with the hub unreachable and an empty cache
    script = ("import sys, json; from swarm_peer.config import load_config; from swarm_peer.data import load_corpus;"
              "c = load_corpus(load_config(None, [f'data.cache_dir={sys.argv[1]}', 'data.max_tokens=300000']));"
              "import hashlib; print(json.dumps([c.key, hashlib.sha256(c.train.tobytes()).hexdigest(),"
              " hashlib.sha256(c.val.tobytes()).hexdigest()]))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}
    out = subprocess.run([PYTHON, "-c", script, str(tmp_path / "fresh")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=180, check=True)
    key, train_hash, val_hash = json.loads(out.stdout.strip().splitlines()[-1])
    import hashlib
    assert key == a.key
    assert train_hash == hashlib.sha256(a.train.tobytes()).hexdigest()
    assert val_hash == hashlib.sha256(a.val.tobytes()).hexdigest()
    assert list((tmp_path / "fresh").glob("packed-*.npy"))  # the cache was written


def test_train_and_validation_are_disjoint(cache_dir):
    c = load_corpus(_cfg(cache_dir))
    train_rows = {r.tobytes() for r in c.train}
    assert not any(r.tobytes() in train_rows for r in c.val)


def test_cache_key_depends_on_seq_len_and_tokenizer_settings(cache_dir):
    a = load_corpus(_cfg(cache_dir))
    b = load_corpus(_cfg(cache_dir, "data.seq_len=64"))
    assert a.key != b.key and b.train.shape[1] == 65


def test_shards_do_not_overlap_and_are_reproducible(cache_dir):
    c = load_corpus(_cfg(cache_dir))
    n = 4
    seen = []
    for shard in range(n):
        s = ShardSampler(c.train, 4, seed=7, shard=shard, num_shards=n)
        per_epoch = len(c.train) // n // 4
        seen.append(np.concatenate([s.indices() for _ in range(per_epoch)]))
    flat = np.concatenate(seen)
    assert len(flat) == len(set(flat.tolist()))  # no sequence served by two shards in an epoch
    again = ShardSampler(c.train, 4, seed=7, shard=1, num_shards=n)
    assert np.array_equal(np.concatenate([again.indices() for _ in range(len(seen[1]) // 4)]), seen[1])
    other_seed = ShardSampler(c.train, 4, seed=8, shard=1, num_shards=n)
    assert not np.array_equal(other_seed.indices(), seen[1][:4])


def test_sampler_state_round_trips_across_epochs(cache_dir):
    c = load_corpus(_cfg(cache_dir))
    s = ShardSampler(c.train[:40], 4, seed=1)
    for _ in range(13):  # crosses an epoch boundary (10 microbatches per epoch)
        s.next()
    state = s.state_dict()
    expected = [s.next().input_ids for _ in range(5)]
    t = ShardSampler(c.train[:40], 4, seed=1)
    t.load_state_dict(state)
    for e in expected:
        assert np.array_equal(t.next().input_ids.numpy(), e.numpy())


def test_microbatch_inputs_and_labels_are_shifted(cache_dir):
    c = load_corpus(_cfg(cache_dir))
    mb = ShardSampler(c.train, 2, seed=0).next()
    assert mb.input_ids.shape == mb.labels.shape == (2, 128)
    assert np.array_equal(mb.input_ids[:, 1:].numpy(), mb.labels[:, :-1].numpy())
    val = validation_microbatches(c, 4, 3)
    assert len(val) == 3 and val[0].input_ids.shape == (4, 128)


def test_local_text_jsonl_parquet_and_globs(tmp_path, cache_dir):
    text = "def f(x):\n    return x * 2\n" * 200
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text(text.upper())
    rows = [{"content": f"document number {i} " * 20} for i in range(100)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    t = load_corpus(_cfg(cache_dir, f"data.source={tmp_path}/*.txt", "data.seq_len=32"))
    assert ByteTokenizer().decode(t.train[:, :-1].reshape(-1)).count("RETURN") > 0
    for name in ("c.jsonl", "d.parquet"):
        c = load_corpus(_cfg(cache_dir, f"data.source={tmp_path / name}", "data.text_field=content", "data.seq_len=32"))
        assert "document number" in ByteTokenizer().decode(c.train[0])


def test_bad_sources_fail_clearly(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="no files match"):
        load_corpus(_cfg(cache_dir, f"data.source={tmp_path}/nothing*.txt"))
    with pytest.raises(ConfigError, match="no files match"):
        load_corpus(_cfg(cache_dir, "data.source=./missing.jsonl"))
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "hello " * 100}) + "\n")
    with pytest.raises(ConfigError, match="text_field"):
        load_corpus(_cfg(cache_dir, f"data.source={tmp_path / 'x.jsonl'}"))
    with pytest.raises(ConfigError, match="vocab_size"):
        load_corpus(_cfg(cache_dir, "model.vocab_size=100"))


# ------------------------------------------------------------------ model.vocab_size follows the tokenizer
def make_gpt2_tokenizer(directory, vocab_size: int = 400) -> int:
    """A small GPT-2-style tokenizer (byte-level BPE, `<|endoftext|>`) saved with transformers' save_pretrained,
    trained offline on a few strings; returns len(tokenizer), what HFTokenizer reports as its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([open(json.__file__).read(), open(os.__file__).read()], trainer)
    fast = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>")
    fast.save_pretrained(str(directory))
    return len(fast)


@pytest.fixture(scope="module")
def gpt2_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2_tokenizer")
    size = make_gpt2_tokenizer(directory)
    assert size > 257  # bigger than the bytes tokenizer, like GPT-2's 50257
    return str(directory), size


def test_vocab_size_follows_a_transformers_tokenizer(gpt2_tokenizer, cache_dir):
    from swarm_peer.model import build_stage, stage_fingerprint

    directory, size = gpt2_tokenizer
    cfg = _cfg(cache_dir, f"data.tokenizer={directory}", "data.max_tokens=30000")
    assert cfg.model.vocab_size == size  # resolved when the config loads, on every stage, not only stage 0
    corpus = load_corpus(cfg)  # no "model.vocab_size 257 is smaller than the tokenizer's ..."
    assert corpus.vocab_size == size and corpus.train.max() < size and corpus.train.max() > 256
    last = build_stage(cfg, cfg.swarm.num_stages - 1)
    assert last.lm_head.out_features == size == build_stage(cfg, 0).embed_tokens.num_embeddings
    # every peer that loads the same config agrees on the fingerprint, and it differs from the bytes model's
    again = load_config(None, [f"data.tokenizer={directory}"])
    assert stage_fingerprint(again, 1) == stage_fingerprint(cfg, 1) != stage_fingerprint(load_config(None), 1)


def test_explicit_vocab_size_is_kept_or_fails_clearly(gpt2_tokenizer, tmp_path):
    directory, size = gpt2_tokenizer
    assert load_config(None, [f"data.tokenizer={directory}", f"model.vocab_size={size + 100}"]).model.vocab_size \
        == size + 100
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"data.tokenizer={directory}", "model.vocab_size=300"])
    assert f"model.vocab_size 300 is smaller than the tokenizer's {size}" in str(e.value)
    assert "\n" not in str(e.value)
    # the same for a value written in the YAML file
    path = tmp_path / "explicit.yaml"
    path.write_text(f"model:\n  vocab_size: 257\ndata:\n  tokenizer: {directory}\n")
    with pytest.raises(ConfigError, match=f"model.vocab_size 257 is smaller than the tokenizer's {size}"):
        load_config(path)


def test_unloadable_tokenizer_fails_at_config_load(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in (str(tmp_path / "empty"), str(tmp_path / "missing")):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"data.tokenizer={name}"])
        assert str(e.value).startswith("data.tokenizer:") and "\n" not in str(e.value)


def test_baseline_runs_with_a_transformers_tokenizer(gpt2_tokenizer, tmp_path):
    directory, size = gpt2_tokenizer
    summary = tmp_path / "s.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    proc = subprocess.run(
        [PYTHON, "-m", "swarm_peer.baseline", "--set", f"data.tokenizer={directory}", "--max-steps", "2",
         "--set", "model.hidden_size=64", "--set", "model.num_heads=4", "--set", "model.num_layers=2",
         "--set", "data.max_tokens=30000", "--set", "run.eval_batches=2", "--set", f"data.cache_dir={tmp_path}",
         "--summary-json", str(summary)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(summary.read_text())["config"]["model"]["vocab_size"] == size
