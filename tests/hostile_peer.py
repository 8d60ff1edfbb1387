"""Test-only hostile outsider: a real DHT peer with its own valid identity that lies in records and sends malformed
traffic to running peers. Never imported by swarm_peer."""
from __future__ import annotations

import threading

import msgpack
import torch
from hivemind import DHT
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time

from swarm_peer.averaging import StageAverager
from swarm_peer.compression import compression_strategy
from swarm_peer.config import Config
from swarm_peer.model import build_stage
from swarm_peer.sync_rules import averaging_buffer_dtype, majority_hash, round_bits
from swarm_peer.identity import Identity
from swarm_peer.records import (MetricRecord, local_public_key, make_validators, metrics_key, read_stage_records,
                                store_stage_record)
from swarm_peer.event_loop import LoopThread
from swarm_peer.transport import RemoteError, TransportError, call_forward

FAKE_HASH = "feedfacefeedface"


class Hostile:
    def __init__(self, run_id: str, num_stages: int, bootstrap: str, metrics_period: float = 10.0):
        self.run_id, self.identity, self.num_stages, self.metrics_period = run_id, Identity(), num_stages, metrics_period
        self.validators = make_validators(run_id, num_stages, self.identity.key)
        with self.identity.p2pd_file() as path:
            self.dht = DHT(start=True, initial_peers=[bootstrap], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                           identity_path=path, check_if_identity_free=False, record_validators=self.validators)
        self.peer_id = str(self.dht.peer_id)
        self.loop = LoopThread()
        self.p2p = self.loop.run(self.dht.replicate_p2p(), 30)
        self.stop = threading.Event()
        self.outcomes: list[tuple[int, str]] = []  # malformed requests that did not get an error reply
        self.sent = {"records": 0, "forward": 0, "forward_refused": 0, "download": 0}
        self.template = None  # an honest stage record its forgeries are copied from

    # ------------------------------------------------------------------------------------------ records
    def forge_records(self, stage: int) -> None:
        """Under its own key: copies of the honest records claiming their peer ids (impersonation; tests/test_records.py
        checks them one by one), then its own record claiming a huge agreed round with a made-up hash, refreshed; a
        last-stage metrics record of its own with a made-up loss, and one under an honest peer's id vouching for it."""
        honest = [p.record for p in read_stage_records(self.dht, self.run_id, stage) if p.peer_id != self.peer_id]
        self.template = honest[0] if honest else self.template  # its own lie goes on after the honest peers left
        if self.template is None:
            return
        mine = local_public_key(self.validators)
        lie = dict(round=10**6, round_ok=True, global_hash=FAKE_HASH, syncing=False, state="online",
                   throughput=1e6, queue=0, inflight=0)
        now = get_dht_time()
        if not self.sent["records"] and honest:  # one value per subkey: copies first (superseded at once, but read meanwhile)
            for i, rec in enumerate(honest):
                store_stage_record(self.dht, self.run_id, rec.copy(update=lie), mine, 20, expiration=now + 20 + i * 1e-3)
        self.sent["records"] += 1
        own = self.template.copy(update={**lie, "peer_id": self.peer_id})  # its own lie, bound to its key: to the
        # next stage it is also an upstream peer that claims to be online for ever
        store_stage_record(self.dht, self.run_id, own, mine, 20, expiration=now + 21 + self.sent["records"] * 1e-3)
        window = int(get_dht_time() // self.metrics_period)
        fake = dict(state="online", window=window, period=self.metrics_period, round=10**6, inner_step=10**6,
                    samples=1, tokens=1, tokens_per_s=1e9, queue=0, inflight=0, sync_seconds=0.0,
                    bytes_sent=0, bytes_received=0, global_hash=FAKE_HASH, round_ok=True)
        last = self.num_stages - 1
        # the last stage's loss under its own id: a made-up figure over a million microbatches it says an honest
        # peer sent it
        mine_loss = MetricRecord(peer_id=self.peer_id, stage=last, loss_sum=1e4, loss_count=10**6,
                                 received={self.template.peer_id: 10**6}, **fake)
        self.dht.store(metrics_key(self.run_id, last), mine_loss.dict(), get_dht_time() + 20, subkey=mine)
        # under an honest peer's id (impersonation): a validation loss of 0, and vouching for the made-up loss above
        vouch = MetricRecord(peer_id=self.template.peer_id, stage=stage, loss_sum=0.0, loss_count=0, evals=[(1, 0.0)],
                             delivered={self.peer_id: 10**6}, **fake)
        self.dht.store(metrics_key(self.run_id, stage), vouch.dict(), get_dht_time() + 20, subkey=mine)

    def keep_forging(self, stage: int, period: float = 1.0) -> threading.Thread:
        def run():
            while not self.stop.is_set():
                try:
                    self.forge_records(stage)
                except Exception:
                    pass
                self.stop.wait(period)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    # ------------------------------------------------------------------------------------------ traffic
    def malformed_forwards(self, target: str, count: int) -> None:
        """`count` malformed rpc_forward requests (wrong shapes, non-finite, huge values, bad metadata, eval/sample
        requests with bad fields); each must get an error reply."""
        peer = PeerID.from_base58(target)
        lab = torch.zeros(2, 32, dtype=torch.int64)
        bad = [
            ({"mb": "x"}, [torch.zeros(2, 31, 64), lab]),
            ({"mb": "x"}, [torch.full((2, 32, 64), float("nan")), lab]),
            ({"mb": "x"}, [torch.full((2, 32, 64), 1e300, dtype=torch.float64), lab]),
            ({"mb": 7}, [torch.zeros(2, 32, 64), lab]),
            ({"mb": "x", "clock": -5}, [torch.zeros(2, 32), lab]),
            ({"kind": "eval", "mb": "x"}, [torch.zeros(2, 32, dtype=torch.int64) - 1]),
            ({"kind": "sample", "mb": "x", "positions": "all"}, [torch.full((1, 4), 10**9, dtype=torch.int64)]),
            ({"kind": "nonsense"}, []),
            ({"mb": "x"}, [torch.full((2, 32), 10**9, dtype=torch.int64), lab]),  # token ids out of the vocabulary
            ({"mb": "x", "sample": 10**6}, [torch.zeros(2, 32, dtype=torch.int64), lab]),  # a position past the end
        ]
        for i in range(count):
            meta, tensors = bad[i % len(bad)]
            try:
                self.loop.run(call_forward(self.p2p, peer, dict(meta), tensors, "none", 10, namespace=self.run_id), 20)
                self.outcomes.append((i % len(bad), "accepted"))
            except RemoteError:
                self.sent["forward_refused"] += 1
            except (TransportError, TypeError, ValueError) as e:
                self.outcomes.append((i % len(bad), repr(e)[:200]))
            self.sent["forward"] += 1

    def malformed_downloads(self, target: str, stage: int, count: int) -> list[int]:
        """`count` garbage rpc_download_slice requests to a peer's averager; returns how many messages each got."""
        peer = PeerID.from_base58(target)
        stub = StageAverager.get_stub(self.p2p, peer, namespace=f"{self.run_id}_avg{stage}")
        garbage = [b"", b"\xff" * 64, msgpack.packb({"indices": "all"}), msgpack.packb({"indices": [10**9]}),
                   msgpack.packb({"indices": [-1, 0]}), msgpack.packb([1, 2, 3])]

        async def one(metadata: bytes) -> int:
            stream = await stub.rpc_download_slice(runtime_pb2.ExpertRequest(metadata=metadata))
            return sum([1 async for _ in stream])

        replies = []
        for i in range(count):
            try:
                replies.append(self.loop.run(one(garbage[i % len(garbage)]), 20))
            except Exception:
                replies.append(-1)
            self.sent["download"] += 1
        return replies

    def poison_rounds(self, cfg: Config, stage: int) -> threading.Thread:
        """Joins the stage's averaging rounds as a groupmate whose parts (as a sender) and averages (as a reducer) are
        all NaN, with a gather that looks like an honest member's (the next round, the majority hash); until `stop`.
        Counts its attempts in `sent["group_attempts"]`."""
        sw = cfg.swarm
        # the stage's own buffer dtype: hivemind's matchmaking refuses a groupmate whose tensors' schema differs
        dtype = averaging_buffer_dtype(sw.sync_mode, sw.compression.averaging)
        buffers = [torch.full(p.shape, float("nan"), dtype=dtype) for p in build_stage(cfg, stage).parameters()]
        averager = StageAverager(buffers, self.dht, get_state=lambda: ({"round": -1}, []), prefix=f"{self.run_id}_avg{stage}",
                                 start=True, min_group_size=2, target_group_size=None, initial_group_bits=round_bits(0),
                                 min_matchmaking_time=sw.matchmaking_time, request_timeout=max(0.2, 0.5 * sw.matchmaking_time),
                                 compression=compression_strategy(sw.compression.averaging),
                                 allreduce_timeout=sw.averaging_timeout / 2, next_chunk_timeout=sw.averaging_chunk_timeout,
                                 client_mode=False, declare_state_period=10)
        self.sent["group_attempts"] = 0

        def run():
            try:
                while not self.stop.is_set():
                    honest = [p.record for p in read_stage_records(self.dht, self.run_id, stage)
                              if p.peer_id != self.peer_id and p.record.state == "online"]
                    if not honest:
                        self.stop.wait(0.5)
                        continue
                    r = max(rec.round for rec in honest)  # the round they are in, or about to start
                    for rnd in (r, r + 1):
                        averager.set_group_bits(round_bits(rnd))
                        gather = {"round": rnd, "clock": max(rec.clock for rec in honest), "ok": True,
                                  "hash": majority_hash([(rec.global_hash, rec.peer_id) for rec in honest])}
                        self.sent["group_attempts"] += 1
                        try:  # the honest side's logs tell whether it got into a group
                            averager.step(weight=1.0, gather=gather, timeout=3 * sw.matchmaking_time, allow_retries=False)
                        except Exception:
                            pass
            finally:
                averager.shutdown()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        self.stop.set()
        self.loop.stop()
        self.dht.shutdown()

