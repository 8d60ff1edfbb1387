"""DHT records: signed (owner-only subkeys) and schema-validated, on real hivemind DHTs."""
import pytest
from hivemind import DHT
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm_peer.records import StageRecord, local_public_key, make_validators, read_stage_records, stage_key

pytestmark = pytest.mark.slow

RUN = "recordtest"


def _record(peer_id: str, **changes) -> StageRecord:
    fields = dict(peer_id=peer_id, stage=1, fingerprint="0123456789abcdef", mates_fingerprint="0123456789abcdef",
                  config_summary="test", state="online",
                  client_mode=False, queue=0, inflight=0, max_inflight=4, throughput=10.0, inner_step=0, samples=0, clock=0.0,
                  round=0, round_steps=0, round_samples=0, syncing=False, global_hash="0123456789abcdef", round_ok=True,
                  address="/ip4/127.0.0.1/tcp/1")
    fields.update(changes)
    return StageRecord(**fields)


@pytest.fixture
def two_dhts():
    va = make_validators(RUN, 2, RSAPrivateKey())
    vb = make_validators(RUN, 2, RSAPrivateKey())
    a = DHT(start=True, record_validators=va, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    b = DHT(start=True, record_validators=vb, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            initial_peers=[str(m) for m in a.get_visible_maddrs()])
    try:
        yield (a, va), (b, vb)
    finally:
        b.shutdown()
        a.shutdown()


def test_forged_and_malformed_records_are_rejected(two_dhts):
    (a, va), (b, vb) = two_dhts
    key, exp = stage_key(RUN, 1), get_dht_time() + 30
    a_sub, b_sub = local_public_key(va), local_public_key(vb)
    assert a.store(key, _record(str(a.peer_id)).dict(), exp, subkey=a_sub)

    # B writes under A's subkey: the signature check fails everywhere, A's record stays
    assert not b.store(key, _record(str(b.peer_id), throughput=1e6).dict(), exp + 1, subkey=a_sub)
    # malformed records under B's own subkey: wrong type, extra field, missing-but-required-by-us, bad state
    bad = [
        {**_record(str(b.peer_id)).dict(), "queue": "many"},
        {**_record(str(b.peer_id)).dict(), "queue": 1.0},
        {**_record(str(b.peer_id)).dict(), "evil": 1},
        {**_record(str(b.peer_id)).dict(), "state": "hacked"},
        {**_record(str(b.peer_id)).dict(), "fingerprint": "not-hex"},
        "just a string",
    ]
    for value in bad:
        assert not b.store(key, value, exp, subkey=b_sub), value
    # a well-formed record of B's own is accepted
    assert b.store(key, _record(str(b.peer_id)).dict(), exp, subkey=b_sub)

    for reader in (a, b):
        peers = {p.peer_id: p.record for p in read_stage_records(reader, RUN, 1)}
        assert set(peers) == {str(a.peer_id), str(b.peer_id)}
        assert peers[str(a.peer_id)].throughput == 10.0  # the forgery did not land


def test_unknown_keys_of_the_run_are_rejected_and_run_id_checked(two_dhts):
    (a, va), _ = two_dhts
    assert not a.store(stage_key(RUN, 1), _record(str(a.peer_id)).dict(), get_dht_time() + 30)  # no subkey
    with pytest.raises(ValueError):
        make_validators("bad.run.id", 2)
