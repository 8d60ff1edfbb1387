"""The peer-to-peer pipeline with real hivemind DHT/P2P, every peer a separate OS process on loopback."""
import json
import subprocess

import pytest
import torch

from swarm_peer.config import load_config
from swarm_peer.model import stage_layer_ranges
from tests.conftest import PYTHON, ROOT
from tests.swarm_harness import FAST

pytestmark = pytest.mark.slow


def _baseline(tmp_path, cache_dir, overrides, steps):
    weights = tmp_path / "baseline.pt"
    args = [PYTHON, "-m", "swarm_peer.baseline", "--max-steps", str(steps), "--save-weights", str(weights),
            "--summary-json", str(tmp_path / "baseline.json")]
    for o in [*FAST, f"data.cache_dir={cache_dir}", *overrides]:
        args += ["--set", o]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    return torch.load(weights), json.loads((tmp_path / "baseline.json").read_text())


def _stage_view(full: dict, start: int, end: int, first: bool, last: bool) -> dict:
    """The baseline's parameters named as stage [start, end) names them."""
    out = {}
    for k, v in full.items():
        if k.startswith("blocks."):
            idx, rest = k.split(".", 2)[1:]
            if start <= int(idx) < end:
                out[f"blocks.{int(idx) - start}.{rest}"] = v
        elif (k.startswith("embed") and first) or (k.startswith(("norm", "lm_head")) and last):
            out[k] = v
    return out


def _run_pipeline(swarm, stages, steps, extra=()):
    # every peer gets the same max_steps: it sets the length of each peer's own lr schedule
    swarm.start(f"s{stages - 1}", stages - 1, "--save-weights", str(swarm.tmp / f"s{stages - 1}.pt"),
                "--max-steps", str(steps))
    swarm.wait_ready(f"s{stages - 1}")
    for st in range(stages - 2, -1, -1):
        more = ["--data-shard", "0/1", "--max-steps", str(steps)] if st == 0 else ["--max-steps", str(steps)]
        swarm.start(f"s{st}", st, "--save-weights", str(swarm.tmp / f"s{st}.pt"), *more, *extra)
        swarm.wait_ready(f"s{st}")
    for st in range(stages):
        assert swarm.wait_exit(f"s{st}", 240) == 0, swarm.log(f"s{st}")[-3000:]


@pytest.mark.parametrize("stages", [2, 3])
def test_one_peer_per_stage_matches_single_process_baseline(swarm_factory, tmp_path, cache_dir, stages):
    # sync_mode none: a lone DiLoCo peer's outer step (lr 0.7, momentum) is a different optimizer than the baseline's
    over = [f"swarm.num_stages={stages}", "swarm.max_inflight=1", "model.num_layers=6", "swarm.sync_mode=none"]
    steps = 4
    swarm = swarm_factory(f"exact{stages}", over)
    _run_pipeline(swarm, stages, steps)
    full, base = _baseline(tmp_path, cache_dir, over, steps)
    cfg = load_config(None, [*FAST, *over])
    for st, (a, b) in enumerate(stage_layer_ranges(cfg)):
        got = torch.load(tmp_path / f"s{st}.pt")
        want = _stage_view(full, a, b, st == 0, st == stages - 1)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=f"stage {st} {k}")
    # the loss curve seen by stage 0 (from the last stage's replies) is the baseline's
    curve = swarm.summary("s0")["loss_curve"]
    assert [s for s, _ in curve] == list(range(1, steps + 1))
    for (_, got), (_, want) in zip(curve, base["train_loss"]):
        assert abs(got - want) < 1e-5


def test_pipelined_loss_curve_matches_baseline(swarm_factory, tmp_path, cache_dir):
    over = ["swarm.num_stages=2", "swarm.max_inflight=4", "swarm.sync_mode=none"]
    steps = 6
    swarm = swarm_factory("pipelined", over)
    _run_pipeline(swarm, 2, steps)
    _, base = _baseline(tmp_path, cache_dir, over, steps)
    for name in ("s0", "s1"):
        curve = swarm.summary(name)["loss_curve"]
        assert len(curve) == steps
        for (_, got), (_, want) in zip(curve, base["train_loss"]):
            assert abs(got - want) < 1e-4, (name, curve, base["train_loss"])


def test_two_by_two_trains_and_wiring_avoids_slow_peer(swarm_factory):
    swarm = swarm_factory("twobytwo", ["swarm.num_stages=2", "optim.inner.lr=3e-3"])
    swarm.start("s1p0", 1)
    swarm.wait_ready("s1p0")
    swarm.start("s1p1", 1, faults="slow=0.25")  # test-only: a slower stage-1 peer
    swarm.wait_ready("s1p1")
    for p in range(2):
        swarm.start(f"s0p{p}", 0, "--data-shard", f"{p}/2", "--max-steps", "25")
    for name in ("s0p0", "s0p1", "s1p0", "s1p1"):
        assert swarm.wait_exit(name, 400) == 0, swarm.log(name)[-3000:]
    summaries = {n: swarm.summary(n) for n in ("s0p0", "s0p1", "s1p0", "s1p1")}
    assert all(s["microbatches"] > 0 for s in summaries.values())
    # every stage-0 peer ran to the end of the run's 25 steps of schedule; together they took at most about 2 x 25
    # (the faster one more; one that started late joined its stage where it was)
    assert all(25 <= s["clock"] < 26 for n, s in summaries.items() if n.startswith("s0"))
    assert 25 <= summaries["s0p0"]["inner_steps"] + summaries["s0p1"]["inner_steps"] <= 56
    fast_id, slow_id = summaries["s1p0"]["peer_id"], summaries["s1p1"]["peer_id"]
    to_fast = sum(s["forwarded_to"].get(fast_id, 0) for n, s in summaries.items() if n.startswith("s0"))
    to_slow = sum(s["forwarded_to"].get(slow_id, 0) for n, s in summaries.items() if n.startswith("s0"))
    print(f"microbatches to fast peer {to_fast}, to slow peer {to_slow}")
    assert to_fast > 2 * to_slow
    longest = max(("s0p0", "s0p1"), key=lambda n: summaries[n]["inner_steps"])
    for name in ("s1p0", longest):
        curve = [loss for _, loss in summaries[name]["loss_curve"]]
        assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.5, curve


def test_killed_stage1_peer_is_rerouted_around(swarm_factory):
    swarm = swarm_factory("killone", ["swarm.num_stages=2"])
    swarm.start("s1p0", 1)
    swarm.wait_ready("s1p0")
    swarm.start("s1p1", 1)
    swarm.wait_ready("s1p1")
    swarm.start("s0", 0, "--max-steps", "30")
    import time
    deadline = time.monotonic() + 120
    while "step" not in swarm.log("s1p1") or "microbatches 0" in swarm.log("s1p1").splitlines()[-1]:
        assert time.monotonic() < deadline, swarm.log("s1p1")
        time.sleep(0.2)
    swarm.kill("s1p1")
    assert swarm.wait_exit("s0", 300) == 0, swarm.log("s0")[-3000:]
    assert swarm.wait_exit("s1p0", 60) == 0, swarm.log("s1p0")[-3000:]
    s0 = swarm.summary("s0")
    assert s0["inner_steps"] == 30
    assert s0["forwarded_to"].get(swarm.summary("s1p0")["peer_id"], 0) > 0


def test_private_swarm_compressed_wire_and_malformed_requests(swarm_factory, tmp_path):
    """A private swarm (swarm key) with 8-bit activations / fp16 gradients trains. Requests without the key or with
    another key are refused before they are read; malformed requests from a key holder get error replies; none of
    them changes anything."""
    from hivemind import DHT
    from hivemind.p2p import PeerID

    from swarm_peer.records import make_validators
    from swarm_peer.swarm_key import SwarmKey, SwarmKeyAuthorizer, SwarmKeyValidator
    from swarm_peer.event_loop import LoopThread
    from swarm_peer.lanes import LaneClient
    from swarm_peer.transport import RemoteError, TransportStats, call_forward

    run = "compressed"
    key_file = tmp_path / "swarm.key"
    key_file.write_text("c0ffee" * 8)
    key, wrong = SwarmKey.from_file(str(key_file)), SwarmKey(b"w" * 24)
    swarm = swarm_factory(run, ["swarm.num_stages=2", "swarm.compression.forward=8bit",
                                "swarm.compression.backward=fp16"])
    swarm.start("s1", 1, "--max-steps", "12", "--swarm-key-file", str(key_file))
    maddr = swarm.wait_ready("s1")
    target = PeerID.from_base58(maddr.split("/p2p/")[-1])
    member = DHT(start=True, initial_peers=[maddr], client_mode=True, authorizer=SwarmKeyAuthorizer(key),
                 record_validators=make_validators(run, 2) + [SwarmKeyValidator(key)])
    outsider = DHT(start=True, initial_peers=[maddr], client_mode=True, record_validators=make_validators(run, 2),
                   ensure_bootstrap_success=False)
    loop = LoopThread()
    good = [torch.zeros(2, 32, 64), torch.zeros(2, 32, dtype=torch.int32)]
    try:
        p2p, p2p_out = loop.run(member.replicate_p2p(), 30), loop.run(outsider.replicate_p2p(), 30)
        for client, client_key, reason in ((p2p_out, None, "needs its swarm key"),
                                           (p2p_out, wrong, "bad swarm key token"),
                                           (p2p, wrong, "bad swarm key token")):
            with pytest.raises(RemoteError, match=reason):
                loop.run(call_forward(client, target, {"mb": "x"}, good, "none", 30, namespace=run,
                                      swarm_key=client_key), 40)
        good_labels = torch.zeros(2, 32, dtype=torch.int32)
        bad = [
            ({"mb": "x"}, [torch.zeros(2, 31, 64), good_labels]),  # wrong seq_len
            ({"mb": "x"}, [torch.zeros(2, 32, 65), good_labels]),  # wrong hidden size
            ({"mb": "x"}, [torch.full((2, 32, 64), float("nan")), good_labels]),  # non-finite
            ({"mb": "x"}, [torch.full((2, 32, 64), 1e300, dtype=torch.float64), good_labels]),  # inf in fp32
            ({"mb": "x"}, [torch.full((2, 32, 64), 3e38), good_labels]),  # finite, but LayerNorm would give NaN
            ({"mb": "x", "clock": -1}, [torch.zeros(2, 32, 64), good_labels]),  # a run clock out of range
            ({"mb": "x"}, [torch.zeros(2, 32, 64), torch.full((2, 32), 10**6, dtype=torch.int32)]),  # bad labels
            ({"mb": "x"}, [torch.zeros(9, 32, 64), torch.zeros(9, 32, dtype=torch.int32)]),  # too many samples
            ({"mb": 5}, [torch.zeros(2, 32, 64), good_labels]),  # bad metadata
            ({"mb": "x"}, [torch.zeros(2, 32, 64)]),  # missing labels
        ]
        # the direct TCP lane (lanes.py): its ticket is handed out over P2P to key holders only
        assert loop.run(LaneClient(p2p_out, run)._ask(target, 10), 20) is None  # refused: unauthorized
        lanes = LaneClient(p2p, run, key)
        for meta, tensors in bad:  # over P2P and over the member's lane
            for via in (None, lanes):
                stats = TransportStats()
                with pytest.raises(RemoteError) as error:
                    loop.run(call_forward(p2p, target, meta, tensors, "none", 30, namespace=run, swarm_key=key,
                                          lanes=via, stats=stats), 40)
                assert "unauthorized" not in str(error.value)  # a key holder gets as far as validation
                assert stats.snapshot()["lane_calls"] == int(via is not None)
    finally:
        loop.stop()
        outsider.shutdown()
        member.shutdown()
    assert swarm.procs["s1"].poll() is None  # still serving
    swarm.start("s0", 0, "--max-steps", "12", "--swarm-key-file", str(key_file))
    for name in ("s0", "s1"):
        assert swarm.wait_exit(name, 300) == 0, swarm.log(name)[-3000:]
    s1 = swarm.summary("s1")
    assert s1["inner_steps"] == 12 and s1["microbatches"] == 12 * 4  # the bad requests were never admitted
    assert s1["transport"]["unauthorized"] == 4
    print(f"\nprivate swarm: {s1['transport']['unauthorized']} requests without a valid swarm key refused, "
          f"{len(bad)} malformed requests from a key holder rejected over P2P and over its direct lane")
    wire = swarm.summary("s0")["transport"]
    assert wire["calls"] == wire["lane_calls"] > 0, wire  # every hop of the run went over the direct lane
    curve = [loss for _, loss in s1["loss_curve"]]
    assert curve[-1] < curve[0] - 0.5, curve


def test_run_local_experiment_end_to_end(cache_dir):
    """The README's main job, small: a monitor + 2 stages x 2 peers as a private swarm (--private: a fresh swarm key
    for every process), merged log, summaries, DiLoCo rounds between the key holders, the monitor's W&B offline run
    (read back from its run file) with a falling global loss and the right alive-peer counts, nothing left running."""
    import glob
    import os
    import shutil
    import time
    import uuid

    from swarm_peer.wandb_log import read_history
    from tests.swarm_harness import group_pids

    run_id = f"pytest-{uuid.uuid4().hex[:8]}"
    extra = []
    for o in [*FAST, f"data.cache_dir={cache_dir}", "run.metrics_period=1", "swarm.sync_every=5",
              "run.eval_interval=10", "optim.inner.lr=3e-3"]:
        extra += ["--set", o]
    run_dir = ROOT / "runs" / run_id
    try:
        proc = subprocess.run(["bash", "run_local_experiment.sh", "-s", "2", "-p", "2", "--run-id", run_id,
                               "--max-steps", "40", "--timeout", "300", "--wandb-project", "pytest", "--private", "--",
                               *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=400,
                              env={**os.environ, "WANDB_MODE": "offline"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        for s in range(2):
            for p in range(2):
                assert f"[stage{s}/peer{p}] " in proc.stdout
                summary = (run_dir / f"stage{s}_peer{p}.json")
                assert summary.exists() and (run_dir / f"stage{s}_peer{p}.log").exists()
                rounds = json.loads(summary.read_text())["sync"]["rounds"]
                assert any(r["group_size"] == 2 for r in rounds), rounds  # averaged with its stage mate
        assert proc.stdout.count("private swarm: swarm key fingerprint") == 5
        assert "all 4 peers up" in proc.stdout and "finished" in proc.stdout and "[monitor] window" in proc.stdout
        # the end-of-run table: both stages' replicas on one model, the final validation loss, where results are
        assert proc.stdout.count("  agree ") == 2 and "validation loss" in proc.stdout and "results in" in proc.stdout
        assert "Traceback" not in proc.stdout + proc.stderr
        pids = [int(line.split()[0]) for line in (run_dir / "pids").read_text().splitlines()]
        assert len(pids) == 5  # 4 peers + the monitor
        deadline = time.monotonic() + 10  # a peer's reaper (and exited children) may take a moment after it
        while any(group_pids(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(group_pids(pid) for pid in pids), [group_pids(pid) for pid in pids]
        run_files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
        assert len(run_files) == 1, list(run_dir.rglob("*"))
        history = read_history(run_files[0])
        rows = [row for row in history if "loss" in row]
        print("global loss by window (microbatches):", [(round(r["loss"], 3), r["loss_microbatches"]) for r in rows])
        # windows of like length: the first and last windows of a run are partial (start-up, end), and a window of
        # a few microbatches right after an outer step is no measure of the model
        counts = sorted(r["loss_microbatches"] for r in rows)
        like = [r["loss"] for r in rows if r["loss_microbatches"] >= counts[len(counts) // 2] / 2]
        assert len(like) >= 3 and sum(like[-2:]) / 2 < like[0] - 0.5, rows
        # the model itself: the held-out loss (same sequences, no dropout), each evaluation logged once
        evals = [(row["eval_step"], row["eval_loss"]) for row in history if "eval_loss" in row]
        print("validation loss by evaluation step:", evals)
        steps = [s for s, _ in evals]
        assert steps == [0, 10, 20, 30, 40], evals  # every one, once (CI once showed 10, 10, 20, 20, 30, 40)
        # from the untrained model (step 0) to well trained, and no divergence at the end: the curve flattens after
        # ~step 20 on this corpus (single process: 5.56, 3.83, 3.49, 3.44, 3.42 at steps 0..40), so a fall between
        # two late evaluations is no measure; seen in the swarm: 5.56 -> 3.61, 3.58, 3.64, 3.58, 3.64
        assert evals[0][0] == 0 and evals[-1][1] < evals[0][1] - 1.0, evals
        # (an evaluation that lands between stage 0's and stage 1's outer step of one round sees the two stages out of
        # step: CI once read 3.90 at step 40 after a 3.53 minimum; the noted DiLoCo-quality item of issue 17)
        assert evals[-1][1] < min(loss for _, loss in evals) + 0.5, evals
        assert max(row["alive/stage0"] for row in history) == 2
        assert max(row["alive/stage1"] for row in history) == 2
        full = [row for row in history if row["alive"] == 4]
        assert full and all(row["alive/stage0"] == 2 and row["alive/stage1"] == 2 for row in full)
        _export_round_trip(run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _export_round_trip(run_dir):
    """A model to take home: `swarm-peer export` of the run, loaded by transformers alone, computes what the swarm's
    stages compute, and generates (`swarm-peer sample --model`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarm_peer.data import ByteTokenizer
    from swarm_peer.export import full_state, stage_files
    from swarm_peer.model import build_stage

    out = run_dir / "model"
    proc = subprocess.run([PYTHON, "-m", "swarm_peer", "export", str(run_dir), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "def main(argv):\n    return 0  # ü"
    assert tokenizer(text)["input_ids"] == ByteTokenizer().encode(text)
    cfg, files = stage_files(run_dir)
    ours = build_stage(cfg, None)
    ours.load_state_dict(full_state(cfg, files))
    ours.eval()
    ids = torch.tensor([ByteTokenizer().encode(text)])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ours(ids), atol=1e-4)
    sampled = subprocess.run([PYTHON, "-m", "swarm_peer", "sample", "--model", str(out), "--prompt", "def ",
                              "--max-new-tokens", "16", "--temperature", "0"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert sampled.returncode == 0 and sampled.stdout.startswith("def ") and len(sampled.stdout) > 6, sampled.stderr


def test_mismatched_config_peer_is_ignored_with_a_warning(swarm_factory):
    import time

    swarm = swarm_factory("mismatch", ["swarm.num_stages=2"])
    swarm.overrides.append("model.hidden_size=96")  # this stage-1 peer runs another model
    swarm.start("s1", 1)
    swarm.wait_ready("s1")
    swarm.overrides.pop()
    swarm.start("s0", 0, "--max-steps", "2")
    deadline = time.monotonic() + 60
    while not ("config fingerprint mismatch" in swarm.log("s0") and "has no live peers; waiting" in swarm.log("s0")):
        assert time.monotonic() < deadline, swarm.log("s0")[-3000:]
        time.sleep(0.3)
    line = next(x for x in swarm.log("s0").splitlines() if "fingerprint mismatch" in x)
    assert "h96" in line and "h64" in line  # names both configs
    assert swarm.procs["s0"].poll() is None  # waits, does not crash
