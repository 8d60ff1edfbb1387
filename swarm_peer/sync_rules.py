"""The pure decisions of same-stage sync (sync.py): who takes part in rounds, when a round is due, which hash the
stage agrees on and whom to download it from, which run clock a group goes on at. No I/O, no clocks: tested alone
(tests/test_sync_logic.py)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from swarm_peer.records import StageRecord
from swarm_peer.validation import all_finite, valid_clock


@dataclass
class Progress:
    """This peer's place in its stage's rounds (published in its StageRecord)."""
    global_hash: str
    round: int = 0
    round_steps: int = 0
    round_samples: int = 0
    syncing: bool = False
    round_ok: bool = True


@dataclass(frozen=True)
class StageView:
    """One look at the stage's other peers, taken whole by the worker's refresh (an executor thread) and replaced
    whole: a reader on any thread sees one consistent look, never the live mates of one read with the silent ones of
    another."""
    others: tuple[StageRecord, ...] = ()  # live mates that take part in rounds (stage_peers)
    silent: tuple[StageRecord, ...] = ()  # mates whose records stopped being refreshed (gone, or just slow)
    departed: tuple[StageRecord, ...] = ()  # mates whose fresh records say finished/offline
    unreadable: bool = False  # the read failed (our own live record was missing): `silent` holds the last known mates


# --------------------------------------------------------------------------------------------- pure decisions
def stage_peers(me: str, records: list[StageRecord], mates_fingerprint: str) -> list[StageRecord]:
    """The stage's other peers that take part in rounds: training (online) or done training but syncing (idle), with
    the settings stage mates must share (model.mates_fingerprint)."""
    return [r for r in records
            if r.peer_id != me and r.state in ("online", "idle") and r.mates_fingerprint == mates_fingerprint]


def mismatched_mates(me: str, records: list[StageRecord], fingerprint: str, mates_fingerprint: str) -> list[StageRecord]:
    """Live stage peers running the same model with other training settings: never averaged, named in a warning."""
    return [r for r in records if r.peer_id != me and r.state in ("online", "idle") and r.fingerprint == fingerprint
            and r.mates_fingerprint != mates_fingerprint]


def round_due(me: Progress, others: list[StageRecord], every: int, samples_target: int | None,
              lookahead: int = 0, training: bool = True) -> bool:
    """Is my round due? `others`: the stage's other peers (stage_peers). Only training peers count towards H;
    `lookahead` inner steps per peer: "almost due" (then the worker publishes and re-reads progress at every
    step, so the trigger lags by less than a step)."""
    if any(r.syncing and r.round == me.round for r in others):
        return True  # someone has started this round: join it now
    same = [r for r in others if r.round == me.round and r.state == "online"]
    n = len(same) + int(training)
    if n == 0:
        return False
    if samples_target:
        samples = me.round_samples + sum(r.round_samples for r in same)
        return samples + lookahead * n * max(1, me.round_samples // max(1, me.round_steps)) >= samples_target
    return me.round_steps + sum(r.round_steps for r in same) + lookahead * n >= every * n


def max_round_weight(mode: str, batch_size: int, every: int, samples_target: int | None, group_size: int) -> float:
    """The most samples an honest peer can weigh in one round of a group of `group_size` (with a 2x margin): an inner
    step holds at most `batch_size` samples; a DiLoCo round is due once the group's peers did `every` steps on average
    (or `samples_target` samples together), so one peer did at most every x group size steps (+1 for the step that
    crossed it); a sync-mode round averages one step. A larger claim is a lie that would outweigh its groupmates."""
    if mode == "sync":
        return 2.0 * batch_size
    if samples_target:
        return 2.0 * (samples_target + batch_size * group_size)
    return 2.0 * batch_size * (every * group_size + 1)


def averaging_buffer_dtype(mode: str, codec: str) -> torch.dtype:
    """What the averager's shared input buffers hold. DiLoCo with the fp16 codec: float16, half the size and lossless,
    since the wire rounds every pseudo-gradient part to fp16 and every groupmate decodes fp16 averages (a lone round's
    own update is rounded the same way). Sync mode keeps fp32: a lone step applies its own gradients unrounded."""
    return torch.float16 if mode == "diloco" and codec == "fp16" else torch.float32


def majority_hash(votes: list[tuple[str, str]]) -> str:
    """votes: (hash, peer id). The most held hash; a tie goes to the hash held by the smallest peer id."""
    counts = Counter(h for h, _ in votes)
    return min(counts, key=lambda h: (-counts[h], min(p for v, p in votes if v == h)))


def group_hash(gathered: dict) -> str | None:
    """The hash a group started from, by majority of the members that held the stage's model (`ok`: their last round
    agreed): a member whose end of the previous all-reduce failed joins with other weights and must not outvote,
    nor tie, the rest. All members count when none says so (None: nobody sent a hash)."""
    members = [(v.get("hash", ""), p, v.get("ok") is not False) for p, v in gathered.items() if isinstance(v, dict)]
    if not members:
        return None
    return majority_hash([(h, p) for h, p, ok in members if ok] or [(h, p) for h, p, _ in members])


def choose_donors(me_id: str, me: Progress, others: list[StageRecord],
                  fallback: tuple[int, str] | None = None) -> list[str]:
    """Peers to download the stage state from; [] when mine is the stage's (or nobody can tell). `fallback`: the
    (round, hash) the stage ends on when nobody holds an agreed state (end_fallback)."""
    voters = [r for r in others if r.round_ok]
    if not voters:
        if fallback is None or (me.round, me.global_hash) == fallback:
            return []
        return sorted(r.peer_id for r in others if (r.round, r.global_hash) == fallback)
    top = max(r.round for r in voters)
    if top < me.round:
        return []  # I am ahead; they catch up from me
    at_top = [r for r in voters if r.round == top]
    votes = [(r.global_hash, r.peer_id) for r in at_top]
    if me.round == top and me.round_ok:
        votes.append((me.global_hash, me_id))
    best = majority_hash(votes)
    if me.round == top and me.global_hash == best:
        return []
    return sorted(r.peer_id for r in at_top if r.global_hash == best)


def end_fallback(me_id: str, me: Progress, others: list[StageRecord], idle: bool) -> tuple[int, str] | None:
    """The (round, hash) a stage ends on when nobody holds an agreed state: every live stage peer, me included, is
    done training (idle), none is in a round, none's last round agreed (e.g. each side of the last all-reduce failed,
    or one failure followed another). Nobody would serve or download then, and the run would end on several models;
    instead: the hash most of them hold at the newest round, ties to the smallest peer id (the same for everyone who
    reads the same records). None otherwise: while anyone trains, the next round's group_hash settles it."""
    if not idle or me.syncing or me.round_ok or any(r.state != "idle" or r.syncing or r.round_ok for r in others):
        return None
    top = max([me.round, *(r.round for r in others)])
    votes = [(r.global_hash, r.peer_id) for r in others if r.round == top]
    if me.round == top:
        votes.append((me.global_hash, me_id))
    return top, majority_hash(votes)


def group_clock(gathered: dict, own: float, limit: float) -> float:
    """The run clock a group continues from: the median of its members' (a stray or hostile value moves it by at
    most one rank; an even group takes the middle two's mean, exactly, so aligning neither gains nor loses steps),
    at most `limit` (the run's end: stage mates that are done pull a late peer to it); `own` when no member sent a
    valid one."""
    clocks = sorted(min(float(v["clock"]), limit) for v in gathered.values()
                    if isinstance(v, dict) and valid_clock(v.get("clock")))
    if not clocks:
        return own
    mid = len(clocks) // 2
    return clocks[mid] if len(clocks) % 2 else (clocks[mid - 1] + clocks[mid]) / 2


# where a round's seconds go (each None when the round never got there): writing the contributions into the
# averager's buffers, finding the group, the all-reduce itself (over a standing group: "waiting", the part of it
# until the last member's contribution came in), the outer step (or gradients) on the compute thread
ROUND_PHASES = ("prepare_s", "matchmaking_s", "allreduce_s", "waiting_s", "apply_s")


def format_round(m: dict) -> str:
    """One log line for a round's metrics."""
    norm = m.get("pseudo_grad_norm", m.get("grad_norm", 0.0))
    spent = [f"{k[:-2].replace('allreduce', 'all-reduce')} {m[k]:.2f}s" for k in ROUND_PHASES if m.get(k) is not None]
    allreduce = f" ({', '.join(spent)})" if spent else ""
    return (f"round {m['round']} -> {m['round'] + 1}: group {m['group_size']}, "
            f"{'ok' if m['ok'] else 'NOT agreed'} ({m['outcome']}), norm {norm:.4f}, "
            f"sent {m['bytes_sent'] / 2**20:.2f} MiB, received {m['bytes_received'] / 2**20:.2f} MiB, "
            f"{m['seconds']:.2f}s{allreduce}, weights {m['weights_hash']}")


def round_bits(r: int) -> str:
    """Group key bits: only peers in the same round (mod 2^16) can form a group."""
    return format(r % 65536, "016b")


MAX_COUNTER = 10**12  # adam_steps / inner_step a downloaded state may claim


def state_problem(meta, tensors: list, shapes: list, mode: str) -> str | None:
    """Why a downloaded stage state must not be applied (None: it may): exactly the stage's tensors (diloco: global
    weights + momentum; sync: weights + AdamW moments), all finite, the weights hashing to the hash it came with,
    counters in range, second moments non-negative. `shapes`: this stage's parameter shapes."""
    from swarm_peer.diloco import tensors_hash

    if not isinstance(meta, dict) or meta.get("mode") != mode:
        return "metadata of another sync mode"
    if type(meta.get("round")) is not int or not 0 <= meta["round"] <= MAX_COUNTER:
        return f"round {meta.get('round')!r}"
    want = [*shapes] * (2 if mode == "diloco" else 3)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != len(want) or any(
            not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != tuple(s)
            for t, s in zip(tensors, want)):
        return "tensors of the wrong number, type or shape"
    if not all(all_finite(t) for t in tensors):
        return "non-finite values"
    n = len(shapes)
    if tensors_hash(list(tensors[:n])) != meta.get("hash"):
        return "weights that do not match the hash they came with"
    if mode == "sync":
        for name in ("adam_steps", "inner_step"):
            if type(meta.get(name, 0)) is not int or not 0 <= meta.get(name, 0) <= MAX_COUNTER:
                return f"{name} out of range"
        if any(bool((t < 0).any()) for t in tensors[2 * n:]):
            return "negative second moments"
    return None


def remember_agreements(history: dict[int, dict[str, float]], records: list[StageRecord], now: float,
                        keep_s: float) -> None:
    """Note, per round, the majority hash the believed records agree on now (history: round -> hash -> when last
    seen), and forget what is older than `keep_s`: a state downloaded from a donor that has since moved on (records
    lag by up to an announce period, a lone fast peer runs a round in a fraction of one) is checked against it."""
    for rnd in {r.round for r in records}:
        votes = votes_at(rnd, records)
        if votes:
            history.setdefault(rnd, {})[majority_hash(votes)] = now
    for rnd in list(history):
        history[rnd] = {h: t for h, t in history[rnd].items() if now - t <= keep_s}
        if not history[rnd]:
            del history[rnd]


def vouched_recently(meta: dict, history: dict[int, dict[str, float]]) -> bool:
    """Was the downloaded state's (round, hash) the stage's majority at that round in a recent look?"""
    return meta.get("hash") in history.get(meta.get("round"), {})


def votes_at(rnd, records: list[StageRecord]) -> list[tuple[str, str]]:
    """(hash, peer id) of each record that agreed at round `rnd`: as its current round, or as one of its recent ones."""
    votes = []
    for r in records:
        if r.round == rnd:
            if r.round_ok:
                votes.append((r.global_hash, r.peer_id))
            continue
        held = [h for past, h in r.recent if past == rnd]
        if held:
            votes.append((held[-1], r.peer_id))
    return votes


def vouched(meta: dict, records: list[StageRecord]) -> bool:
    """Is a downloaded state (its round and weights hash) what the stage agreed on: the majority hash of the believed
    records (each bound to its signer) at that round, now or among their recent rounds? One donor's word is not
    enough."""
    votes = votes_at(meta.get("round"), records)
    return bool(votes) and majority_hash(votes) == meta.get("hash")
