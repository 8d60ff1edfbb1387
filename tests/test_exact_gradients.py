"""Exact gradients under hop timeouts: a request abandoned by its caller never adds an uncounted gradient.

One peer per stage, `sync_mode: none`; the stage-1 (last) peer is slowed so that some of stage 0's hops time out
while stage 1 is still computing them (the caller cancels, the handler is cancelled, the compute thread is busy with
that very microbatch). Stage 0 is frozen (lr 1e-30), so stage 1's inputs are a pure function of the data: a
single-process reference then replays exactly the microbatches stage 1's ledger says each inner step summed, with the
same StageTrainer code, and must land on stage 1's parameters."""
import pytest
import torch

from swarm_peer.compute import StageTrainer
from swarm_peer.config import load_config
from swarm_peer.data import ShardSampler, load_corpus
from swarm_peer.model import build_stage
from tests.swarm_harness import FAST

pytestmark = pytest.mark.slow
STEPS = 5


def test_abandoned_backward_never_touches_gradients(swarm_factory, cache_dir):
    over = ["swarm.num_stages=2", "swarm.sync_mode=none", "swarm.max_inflight=4", "swarm.request_timeout=1.2",
            "swarm.compression.forward=none", "swarm.compression.backward=none", f"run.max_steps={STEPS}"]
    swarm = swarm_factory("abandoned", over)
    swarm.start("s1", 1, "--save-weights", str(swarm.tmp / "s1.pt"), faults="slow=0.35")
    swarm.wait_ready("s1")
    swarm.start("s0", 0, "--data-shard", "0/1", "--set", "optim.inner.lr=1e-30")  # frozen: below fp32 resolution
    swarm.wait_ready("s0")
    for name in ("s0", "s1"):
        assert swarm.wait_exit(name, 300) == 0, swarm.log(name)[-3000:]
    s0, s1 = swarm.summary("s0"), swarm.summary("s1")
    assert s0["retries"] > 0, "no hop timed out: the test did not exercise abandoned requests"
    ledger = s1["ledger"]
    assert sum(e["samples"] for e in ledger) == s1["samples"] and len(ledger) == s1["inner_steps"]

    # the reference: the same stage code in this process, fed exactly the microbatches each step counted
    cfg = load_config(None, [*FAST, f"data.cache_dir={cache_dir}", *over])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the peers run (run.threads=1): same kernels, same roundings
    try:
        sampler = ShardSampler(load_corpus(cfg).train, cfg.data.microbatch_size, cfg.run.seed, 0, 1)
        wanted = max(int(mb.split(":")[1]) for e in ledger for mb in e["mbs"])
        batches = [sampler.next() for _ in range(wanted + 1)]
        stage0 = build_stage(cfg, 0)  # frozen (lr 1e-30 on the stage-0 peer)
        ref = StageTrainer(cfg, 1, torch.device("cpu"))
        for entry in ledger:
            for mb in entry["mbs"]:
                batch = batches[int(mb.split(":")[1])]
                with torch.no_grad():
                    hidden = stage0(batch.input_ids)
                ref.forward_backward_last(hidden, batch.labels, ref.ticket(mb, batch.input_ids.shape[0]))
            assert ref.step(clock=entry["clock"]) == entry["samples"]  # the run step it trained at
    finally:
        torch.set_num_threads(threads)
    got = torch.load(swarm.tmp / "s1.pt")
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0, msg=f"stage 1 {k}")
    print(f"\nabandoned requests: {s0['retries']} hops re-sent, {s1['abandoned_backwards']} backwards skipped, "
          f"{s1['inner_steps']} stage-1 steps over {sum(len(e['mbs']) for e in ledger)} counted microbatches; "
          f"parameters equal the reference within 1e-6")
