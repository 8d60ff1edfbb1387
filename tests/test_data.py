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
    state = s.state()
    expected = [s.next().input_ids for _ in range(5)]
    t = ShardSampler(c.train[:40], 4, seed=1)
    t.load_state(state)
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
