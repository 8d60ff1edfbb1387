"""DHT records: signed (owner-only subkeys) and schema-validated, on real hivemind DHTs."""
import pytest
from hivemind import DHT
from hivemind.utils import get_dht_time

from swarm_peer.identity import Identity, IdentityError, load_identity, signer_peer_id
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


def _dht(identity: Identity, **kwargs) -> DHT:
    """A DHT whose peer id is `identity`'s, as the CLI starts them (its key signs its records too)."""
    with identity.p2pd_file() as path:
        return DHT(start=True, record_validators=make_validators(RUN, 2, identity.key), identity_path=path,
                   check_if_identity_free=False, host_maddrs=["/ip4/127.0.0.1/tcp/0"], **kwargs)


@pytest.fixture
def two_dhts():
    ia, ib = Identity(), Identity()
    a = _dht(ia)
    b = _dht(ib, initial_peers=[str(m) for m in a.get_visible_maddrs()])
    va, vb = make_validators(RUN, 2, ia.key), make_validators(RUN, 2, ib.key)
    assert (str(a.peer_id), str(b.peer_id)) == (ia.peer_id, ib.peer_id)
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


def test_a_record_counts_only_for_the_peer_whose_key_signed_it(two_dhts):
    """An outsider (its own valid key) re-publishes a copy of A's record, and one claiming a made-up peer id, with a
    huge round and a fake hash: both are stored (its signature is fine) but every reader ignores them."""
    (a, va), (b, vb) = two_dhts
    key, exp = stage_key(RUN, 1), get_dht_time() + 30
    assert a.store(key, _record(str(a.peer_id)).dict(), exp, subkey=local_public_key(va))
    forged = dict(round=10**6, round_ok=True, global_hash="feedfacefeedface", throughput=1e6)
    assert b.store(key, _record(str(a.peer_id), **forged).dict(), exp + 1, subkey=local_public_key(vb))
    for reader in (a, b):
        records = read_stage_records(reader, RUN, 1)
        assert [(p.peer_id, p.record.round) for p in records] == [(str(a.peer_id), 0)]
    assert b.store(key, _record("12D3KooWMadeUpPeerIdMadeUpPeerIdMadeUpPeerIdMade", **forged).dict(), exp + 2,
                   subkey=local_public_key(vb))  # supersedes its copy (one value per subkey)
    for reader in (a, b):
        records = read_stage_records(reader, RUN, 1)
        assert [(p.peer_id, p.record.round) for p in records] == [(str(a.peer_id), 0)]
    assert signer_peer_id(local_public_key(vb)) == str(b.peer_id) and signer_peer_id(b"[owner:garbage]") is None


def test_identity_files(tmp_path):
    path = tmp_path / "id.key"
    first = Identity(str(path))  # created: a stable peer id from then on
    assert path.exists() and Identity(str(path)).peer_id == first.peer_id
    assert load_identity(str(path)).to_bytes() == first.key.to_bytes()
    (tmp_path / "junk.key").write_bytes(b"not a key")
    with pytest.raises(IdentityError, match="not a libp2p private key"):
        Identity(str(tmp_path / "junk.key"))
    with pytest.raises(IdentityError, match="cannot create"):
        Identity(str(tmp_path / "missing-dir" / "id.key"))


def test_unknown_keys_of_the_run_are_rejected_and_run_id_checked(two_dhts):
    (a, va), _ = two_dhts
    assert not a.store(stage_key(RUN, 1), _record(str(a.peer_id)).dict(), get_dht_time() + 30)  # no subkey
    with pytest.raises(ValueError):
        make_validators("bad.run.id", 2)
