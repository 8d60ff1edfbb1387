"""DHT records: every key swarm_peer stores, their pydantic (v1, as hivemind requires) schemas and validators.

Keys (raw strings, `run_id` prefixed so several swarms share one DHT):
  {run_id}_stage{i}   subkey = the announcing peer's RSA public key (so only that peer can write it),
                      value  = StageRecord: who serves stage i, with which config, how loaded it is, its round.
  {run_id}_metrics{i} subkey = the peer's RSA public key, value = MetricRecord: what the peer did in the last
                      metrics window (what the monitor and `status` aggregate).
  {run_id}_placement  subkey = the peer's RSA public key, value = PlacementClaim: the stage a `--stage auto` peer is
                      about to join (placement.py: peers choosing at once see each other's choices).

Every peer (the monitor and the CLI tools too) must run the same validators: `make_validators`. A record counts only
for the peer id of the key that signed it (identity.py: a peer's libp2p identity is its record-signing key); readers
drop the others.
Records are refreshed every `swarm.announce_period` seconds and expire after `swarm.record_ttl`; a leaving peer
overwrites its record with state "offline" (a DHT value cannot be deleted, only superseded by a later expiration).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm_peer.identity import speaks_for

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
MAX_DELIVERED_PEERS = 256
RECENT_ROUNDS = 32  # agreed (round, hash) pairs a stage record carries (StageRecord.recent)
EVAL_HISTORY = 8  # evaluations a metric record carries (a monitor catches up on up to this many)
STATES = ("online", "idle", "finished", "offline")  # idle: done training, still syncing with its stage


class StageRecord(pydantic.BaseModel):
    peer_id: pydantic.constr(strict=True, min_length=1, max_length=128)
    stage: pydantic.conint(strict=True, ge=0, le=1024)
    fingerprint: pydantic.constr(strict=True, regex=r"^[0-9a-f]{16}$")  # the stage's model: neighbours must match
    mates_fingerprint: pydantic.constr(strict=True, regex=r"^[0-9a-f]{16}$")  # + settings stage mates must share
    config_summary: pydantic.constr(strict=True, max_length=200)  # human-readable, to name a mismatch
    state: pydantic.constr(strict=True, regex="^(online|idle|finished|offline)$")
    client_mode: pydantic.StrictBool
    queue: pydantic.conint(strict=True, ge=0, le=1_000_000)  # microbatches waiting for admission/compute
    inflight: pydantic.conint(strict=True, ge=0, le=1_000_000)  # admitted, not yet finished
    max_inflight: pydantic.conint(strict=True, ge=1, le=1_000_000)
    throughput: pydantic.confloat(strict=True, ge=0.0, le=1e9)  # samples/s EMA of its own compute
    inner_step: pydantic.conint(strict=True, ge=0)
    samples: pydantic.conint(strict=True, ge=0)
    clock: pydantic.confloat(strict=True, ge=0.0, le=2.0**31)  # the run step it trains at (its lr schedule's position)
    # same-stage synchronization (sync.py): the outer round this peer is in, its progress in it, whether it is
    # averaging now, the hash of its global weights at the round's start and whether it got them from a completed
    # round (a peer whose last round failed does not vote on the stage's weights)
    round: pydantic.conint(strict=True, ge=0)
    round_steps: pydantic.conint(strict=True, ge=0)
    round_samples: pydantic.conint(strict=True, ge=0)
    syncing: pydantic.StrictBool
    paused: pydantic.StrictBool = False  # admits no training request now (a round that is not overlapped)
    global_hash: pydantic.constr(strict=True, regex=r"^[0-9a-f]{16}$")
    round_ok: pydantic.StrictBool
    address: pydantic.constr(strict=True, max_length=256)  # a multiaddr to reach it (status tables)
    # the global hashes of its last agreed rounds, oldest first: a state downloaded at a round its donors have since
    # left (a fast stage runs several rounds between two reads of its records) is checked against what they agreed
    recent: List[Tuple[pydantic.conint(strict=True, ge=0), pydantic.constr(strict=True, regex=r"^[0-9a-f]{16}$")]] = []

    @pydantic.validator("recent")
    def _few_rounds(cls, v):
        if len(v) > RECENT_ROUNDS:
            raise ValueError(f"more than {RECENT_ROUNDS} recent rounds")
        return v

    class Config:
        extra = pydantic.Extra.forbid


class MetricRecord(pydantic.BaseModel):
    """One peer's figures for metrics window `window` (= floor(DHT time / period)): published when the window closes,
    so the monitor never mixes windows. Loss sums come from last-stage peers, eval loss from stage-0 peers."""
    peer_id: pydantic.constr(strict=True, min_length=1, max_length=128)
    stage: pydantic.conint(strict=True, ge=0, le=1024)
    state: pydantic.constr(strict=True, regex="^(online|idle|finished|offline)$")
    window: pydantic.conint(strict=True, ge=0)
    period: pydantic.confloat(strict=True, gt=0.0, le=86400.0)
    round: pydantic.conint(strict=True, ge=0)
    inner_step: pydantic.conint(strict=True, ge=0)
    samples: pydantic.conint(strict=True, ge=0)  # since start
    tokens: pydantic.conint(strict=True, ge=0)  # since start
    loss_sum: pydantic.confloat(strict=True, ge=0.0, le=1e12)  # training losses of microbatches done in the window
    loss_count: pydantic.conint(strict=True, ge=0)
    # stage 0's latest validation losses, (run step, loss) oldest first: a history, so a monitor that starts late or
    # misses a window still logs every evaluation once
    evals: List[Tuple[pydantic.conint(strict=True, ge=0), pydantic.confloat(strict=True, ge=0.0, le=1e6)]] = []
    tokens_per_s: pydantic.confloat(strict=True, ge=0.0, le=1e12)  # in the window
    queue: pydantic.conint(strict=True, ge=0, le=1_000_000)
    inflight: pydantic.conint(strict=True, ge=0, le=1_000_000)
    sync_seconds: pydantic.confloat(strict=True, ge=0.0)  # total time spent in rounds
    bytes_sent: pydantic.conint(strict=True, ge=0)  # pipeline + averaging, since start
    bytes_received: pydantic.conint(strict=True, ge=0)
    global_hash: pydantic.constr(strict=True, regex=r"^[0-9a-f]{16}$")
    round_ok: pydantic.StrictBool
    # training microbatches this peer handed to each next-stage peer in the window (a reply came back) and took from
    # each previous-stage peer (it replied): work two peers both report is what the monitor believes (monitor.py)
    delivered: Dict[pydantic.constr(strict=True, min_length=1, max_length=128),
                    pydantic.conint(strict=True, ge=0, le=10**9)] = {}
    received: Dict[pydantic.constr(strict=True, min_length=1, max_length=128),
                   pydantic.conint(strict=True, ge=0, le=10**9)] = {}

    @pydantic.validator("delivered", "received")
    def _few_peers(cls, v):
        if len(v) > MAX_DELIVERED_PEERS:
            raise ValueError(f"more than {MAX_DELIVERED_PEERS} next-stage peers")
        return v

    @pydantic.validator("evals")
    def _few_evals(cls, v):
        if len(v) > EVAL_HISTORY:
            raise ValueError(f"more than {EVAL_HISTORY} evaluations")
        return v

    class Config:
        extra = pydantic.Extra.forbid


class PlacementClaim(pydantic.BaseModel):
    """A `--stage auto` peer's choice while it joins (placement.py), until its stage record exists."""
    peer_id: pydantic.constr(strict=True, min_length=1, max_length=128)
    stage: pydantic.conint(strict=True, ge=0, le=1024)
    at: pydantic.confloat(strict=True, ge=0.0, le=2.0**40)  # DHT time of its first claim: earlier claims win

    class Config:
        extra = pydantic.Extra.forbid


def placement_key(run_id: str) -> str:
    return f"{run_id}_placement"


def stage_key(run_id: str, stage: int) -> str:
    return f"{run_id}_stage{stage}"


def metrics_key(run_id: str, stage: int) -> str:
    return f"{run_id}_metrics{stage}"


def make_validators(run_id: str, num_stages: int, private_key: Optional[RSAPrivateKey] = None) -> list:
    """RSA signature validator (owner-only subkeys) + schema validator for this run's stage keys."""
    if not RUN_ID_RE.match(run_id):
        raise ValueError(f"run id {run_id!r}: use 1-64 letters, digits or '-'")
    fields = {f"stage{i}": (Optional[Dict[BytesWithPublicKey, StageRecord]], None) for i in range(num_stages)}
    fields.update({f"metrics{i}": (Optional[Dict[BytesWithPublicKey, MetricRecord]], None) for i in range(num_stages)})
    fields["placement"] = (Optional[Dict[BytesWithPublicKey, PlacementClaim]], None)
    schema = pydantic.create_model(f"SwarmSchema_{num_stages}", **fields)
    return [RSASignatureValidator(private_key), SchemaValidator(schema, prefix=run_id)]


def local_public_key(validators: list) -> bytes:
    return next(v for v in validators if isinstance(v, RSASignatureValidator)).local_public_key


@dataclass
class PeerInfo:
    """A live stage record as read back from the DHT."""
    record: StageRecord
    expires_at: float

    @property
    def peer_id(self) -> str:
        return self.record.peer_id


def store_stage_record(dht, run_id: str, record: StageRecord, subkey: bytes, ttl: float,
                       expiration: Optional[float] = None, timeout: float = 10.0) -> bool:
    expiration = expiration if expiration is not None else get_dht_time() + ttl
    fut = dht.store(stage_key(run_id, record.stage), record.dict(), expiration_time=expiration, subkey=subkey,
                    return_future=True)
    return bool(fut.result(timeout=timeout))


def _read(dht, key: str, schema, stage: int, timeout: float) -> list[PeerInfo]:
    try:
        found = dht.get(key, latest=True, return_future=True).result(timeout=timeout)
    except Exception:
        return []
    if found is None or not isinstance(found.value, dict):
        return []
    now = get_dht_time()
    peers = []
    for subkey, entry in found.value.items():
        try:
            rec = schema.parse_obj(entry.value)
        except (pydantic.ValidationError, TypeError):
            continue  # validators reject malformed stores; this guards against anything that slipped through
        if not speaks_for(subkey, rec.peer_id):
            continue  # signed by another key than the claimed peer's: a copy or a made-up peer id (identity.py)
        if entry.expiration_time > now and rec.stage == stage:
            peers.append(PeerInfo(rec, entry.expiration_time))
    return peers


def read_placement_claims(dht, run_id: str, timeout: float = 5.0) -> list[PlacementClaim]:
    """Fresh, well-formed claims of `--stage auto` peers (each signed by the peer it names). Never raises."""
    try:
        found = dht.get(placement_key(run_id), latest=True, return_future=True).result(timeout=timeout)
    except Exception:
        return []
    if found is None or not isinstance(found.value, dict):
        return []
    now, claims = get_dht_time(), []
    for subkey, entry in found.value.items():
        try:
            claim = PlacementClaim.parse_obj(entry.value)
        except (pydantic.ValidationError, TypeError):
            continue
        if entry.expiration_time > now and speaks_for(subkey, claim.peer_id):
            claims.append(claim)
    return claims


def store_placement_claim(dht, run_id: str, claim: PlacementClaim, subkey: bytes, ttl: float,
                          timeout: float = 10.0) -> bool:
    fut = dht.store(placement_key(run_id), claim.dict(), expiration_time=get_dht_time() + ttl, subkey=subkey,
                    return_future=True)
    return bool(fut.result(timeout=timeout))


def read_stage_records(dht, run_id: str, stage: int, timeout: float = 5.0) -> list[PeerInfo]:
    """All fresh, well-formed records of `stage` (any state; callers filter). Never raises on bad data."""
    return _read(dht, stage_key(run_id, stage), StageRecord, stage, timeout)


def read_metric_records(dht, run_id: str, stage: int, timeout: float = 5.0) -> list[PeerInfo]:
    """All fresh, well-formed metric records of `stage`. Never raises on bad data."""
    return _read(dht, metrics_key(run_id, stage), MetricRecord, stage, timeout)


def store_metric_record(dht, run_id: str, record: MetricRecord, subkey: bytes, ttl: float, timeout: float = 10.0) -> bool:
    fut = dht.store(metrics_key(run_id, record.stage), record.dict(), expiration_time=get_dht_time() + ttl,
                    subkey=subkey, return_future=True)
    return bool(fut.result(timeout=timeout))


class Announcer:
    """Keeps this peer's stage record fresh; `withdraw()` marks it offline for good."""

    def __init__(self, dht, run_id: str, subkey: bytes, ttl: float):
        self.dht, self.run_id, self.subkey, self.ttl = dht, run_id, subkey, ttl
        self.last_expiration = 0.0

    def publish(self, record: StageRecord) -> bool:
        # strictly increasing expirations: a newer record always supersedes an older one
        expiration = max(get_dht_time() + self.ttl, self.last_expiration + 1e-3)
        ok = store_stage_record(self.dht, self.run_id, record, self.subkey, self.ttl, expiration)
        if ok:
            self.last_expiration = expiration
        return ok

    def withdraw(self, record: StageRecord) -> bool:
        offline = record.copy(update={"state": "offline", "queue": 0, "inflight": 0})
        try:
            return self.publish(offline)
        except Exception:
            return False


def wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
