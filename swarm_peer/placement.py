"""`--stage auto`: which stage a joining peer takes, and how peers starting at once avoid all taking the same one.

Every sample passes every stage, so the pipeline moves at the pace of the stage whose peers together compute the
fewest samples per second. A joining peer therefore takes an empty stage first (the lowest), else the stage with
the least served throughput: the sum of its training peers' published compute throughput (samples/s EMA), a peer
not measured yet counted at the median of those measured (`stage_loads`, `choose_stage`: pure).

Peers that start together would all see the same loads, so each one claims its choice in the DHT
(`{run_id}_placement`, records.PlacementClaim), waits a moment, and chooses again counting the claims made before its
own (earlier DHT time first, then peer id): the earliest keeps its stage, the next ones move on (`place`, a few
rounds at most). A peer resuming from `--checkpoint-dir` takes the stage of its checkpoint.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from swarm_peer.config import Config, ConfigError

CLAIM_TTL = 120.0  # a claim lasts while its peer downloads its stage's state; its stage record counts after that
SETTLE_S = (1.0, 2.0)  # wait between claiming and looking again: long enough for other claims to be stored
ROUNDS = 4  # claim -> look again, at most this many times


@dataclass(frozen=True)
class StageLoad:
    stage: int
    peers: int  # training peers with this stage's model, plus claims made before ours
    served: float  # their samples/s


def stage_loads(num_stages: int, records: dict[int, list], fingerprints: dict[int, str], claims: list,
                me: str) -> list[StageLoad]:
    """Loads per stage from StageRecords (online, this run's model of that stage) and earlier PlacementClaims of
    peers without a record yet."""
    live = {s: [r for r in records.get(s, []) if r.state == "online" and r.fingerprint == fingerprints[s]
                and r.peer_id != me] for s in range(num_stages)}
    measured = [r.throughput for rs in live.values() for r in rs if r.throughput > 0]
    typical = statistics.median(measured) if measured else 1.0
    placed = {r.peer_id for rs in live.values() for r in rs}
    loads = []
    for s in range(num_stages):
        claimed = {c.peer_id for c in claims if c.stage == s and c.peer_id != me and c.peer_id not in placed}
        served = sum(r.throughput if r.throughput > 0 else typical for r in live[s]) + typical * len(claimed)
        loads.append(StageLoad(s, len(live[s]) + len(claimed), served))
    return loads


def choose_stage(loads: list[StageLoad], fits: set[int]) -> int:
    """An empty stage first (the lowest), else the least served one (then the fewest peers, the lowest index)."""
    candidates = [load for load in loads if load.stage in fits]
    if not candidates:
        raise ConfigError("--stage auto: no stage fits this machine's memory")
    empty = [load for load in candidates if load.peers == 0]
    if empty:
        return empty[0].stage
    return min(candidates, key=lambda load: (load.served, load.peers, load.stage)).stage


def describe(loads: list[StageLoad]) -> str:
    return ", ".join(f"stage {load.stage}: {load.peers} peer(s), {load.served:.1f} samples/s" for load in loads)


def checkpointed_stage(directory: str | None, num_stages: int) -> int | None:
    """The stage of the newest checkpoint in `directory` (a resumed peer keeps its stage)."""
    from swarm_peer.checkpoint import checkpoint_path

    if not directory:
        return None
    found = [(checkpoint_path(directory, s).stat().st_mtime, s) for s in range(num_stages)
             if Path(checkpoint_path(directory, s)).exists()]
    return max(found)[1] if found else None


def place(dht, cfg: Config, run_id: str, subkey: bytes, fits: set[int], rng: random.Random | None = None,
          sleep: Callable[[float], None] = time.sleep) -> tuple[int, list[StageLoad]]:
    """Claim, look again, settle: the stage this peer takes and the loads it chose from."""
    from hivemind.utils import get_dht_time

    from swarm_peer.model import stage_fingerprint
    from swarm_peer.records import PlacementClaim, read_placement_claims, read_stage_records, store_placement_claim

    rng = rng or random.Random()
    S, me = cfg.swarm.num_stages, str(dht.peer_id)
    fingerprints = {s: stage_fingerprint(cfg, s) for s in range(S)}
    at = get_dht_time()

    def look() -> list[StageLoad]:
        records = {s: [p.record for p in read_stage_records(dht, run_id, s)] for s in range(S)}
        earlier = [c for c in read_placement_claims(dht, run_id) if (c.at, c.peer_id) < (at, me)]
        return stage_loads(S, records, fingerprints, earlier, me)

    def claim(stage: int) -> None:
        store_placement_claim(dht, run_id, PlacementClaim(peer_id=me, stage=stage, at=at), subkey, CLAIM_TTL)

    loads = look()
    stage = choose_stage(loads, fits)
    for _ in range(ROUNDS):
        claim(stage)
        sleep(rng.uniform(*SETTLE_S))
        loads = look()
        again = choose_stage(loads, fits)
        if again == stage:
            break
        stage = again
    else:
        claim(stage)  # the last change: later peers count it
    return stage, loads


def fitting_stages(cfg: Config, device) -> set[int]:
    """The stages this machine can hold (all with run.memory_check false); ConfigError when none."""
    from swarm_peer.memory import check_fits

    fits, problems = set(), []
    for s in range(cfg.swarm.num_stages):
        try:
            check_fits(cfg, s, device)
            fits.add(s)
        except ConfigError as e:
            problems.append(str(e))
    if not fits:
        raise ConfigError(f"--stage auto: no stage fits; {min(problems, key=len)}")
    return fits
