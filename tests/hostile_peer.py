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
from swarm_peer.identity import Identity
from swarm_peer.records import (MetricRecord, local_public_key, make_validators, metrics_key, read_stage_records,
                                store_stage_record)
from swarm_peer.transport import LoopThread, RemoteError, TransportError, call_forward

FAKE_HASH = "feedfacefeedface"


class Hostile:
    def __init__(self, run_id: str, num_stages: int, bootstrap: str):
        self.run_id, self.identity = run_id, Identity()
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

    # ------------------------------------------------------------------------------------------ records
    def forge_records(self, stage: int) -> None:
        """Under its own key: copies of the honest records claiming their peer ids (impersonation; tests/test_records.py
        checks them one by one), then its own record claiming a huge agreed round with a made-up hash, refreshed; a
        metrics record with a made-up loss under an honest peer's id."""
        honest = [p.record for p in read_stage_records(self.dht, self.run_id, stage) if p.peer_id != self.peer_id]
        if not honest:
            return
        mine = local_public_key(self.validators)
        lie = dict(round=10**6, round_ok=True, global_hash=FAKE_HASH, syncing=False, state="online",
                   throughput=1e6, queue=0, inflight=0)
        now = get_dht_time()
        if not self.sent["records"]:  # one value per subkey: copies first (superseded at once, but read meanwhile)
            for i, rec in enumerate(honest):
                store_stage_record(self.dht, self.run_id, rec.copy(update=lie), mine, 20, expiration=now + 20 + i * 1e-3)
        self.sent["records"] += 1
        own = honest[0].copy(update={**lie, "peer_id": self.peer_id})  # its own lie, bound to its key
        store_stage_record(self.dht, self.run_id, own, mine, 20, expiration=now + 21 + self.sent["records"] * 1e-3)
        fake = MetricRecord(peer_id=honest[0].peer_id, stage=stage, state="online", window=int(get_dht_time() // 10),
                            period=10.0, round=10**6, inner_step=10**6, samples=1, tokens=1, loss_sum=1e6,
                            loss_count=1, eval_loss=0.0, eval_step=1, tokens_per_s=1e9, queue=0, inflight=0,
                            sync_seconds=0.0, bytes_sent=0, bytes_received=0, global_hash=FAKE_HASH, round_ok=True)
        self.dht.store(metrics_key(self.run_id, stage), fake.dict(), get_dht_time() + 20, subkey=mine)

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

    def shutdown(self) -> None:
        self.stop.set()
        self.loop.stop()
        self.dht.shutdown()

