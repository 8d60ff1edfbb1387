"""Private swarms: the key file, HMAC'd DHT RPCs and records on real hivemind DHTs, tokened averaging and requests."""
import subprocess

import pytest
import torch
from hivemind import DHT
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time

from swarm_peer.swarm_key import SwarmKey, SwarmKeyError, SwarmKeyValidator, auth_error
from tests.conftest import PYTHON, ROOT

K1, K2 = SwarmKey(b"k" * 32), SwarmKey(b"x" * 32)


def test_key_file_formats_and_errors(tmp_path):
    (tmp_path / "hex").write_text("ab" * 16 + "\n")
    (tmp_path / "text").write_text("  a long passphrase here  \n")
    (tmp_path / "short").write_text("abc")
    assert SwarmKey.from_file(str(tmp_path / "hex")).fingerprint() == SwarmKey(b"\xab" * 16).fingerprint()
    assert SwarmKey.from_file(str(tmp_path / "text")).fingerprint() == SwarmKey(b"a long passphrase here").fingerprint()
    with pytest.raises(SwarmKeyError, match="at least 16 bytes"):
        SwarmKey.from_file(str(tmp_path / "short"))
    with pytest.raises(SwarmKeyError, match="cannot read"):
        SwarmKey.from_file(str(tmp_path / "missing"))


def test_keygen_cli_and_bad_key_file_exit_2(tmp_path):
    key = tmp_path / "swarm.key"
    done = subprocess.run([PYTHON, "-m", "swarm_peer", "keygen", str(key)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "fingerprint" in done.stdout
    assert len(bytes.fromhex(key.read_text().strip())) == 32 and (key.stat().st_mode & 0o777) == 0o600
    again = subprocess.run([PYTHON, "-m", "swarm_peer", "keygen", str(key)], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwrites a key
    bad = subprocess.run([PYTHON, "-m", "swarm_peer", "--stage", "0", "--swarm-key-file", str(tmp_path / "none")],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--swarm-key-file" in bad.stderr


def test_peer_tokens_are_bound_to_key_and_peer():
    from hivemind.p2p import PeerID

    a, b = PeerID(b"\x12\x20" + b"a" * 32), PeerID(b"\x12\x20" + b"b" * 32)
    assert auth_error(None, None, a) is None  # open swarm
    assert auth_error(K1, K1.peer_token(a), a) is None
    assert "needs its swarm key" in auth_error(K1, None, a)
    assert "bad swarm key token" in auth_error(K1, K1.peer_token(b), a)  # another peer's token: no replay
    assert "bad swarm key token" in auth_error(K1, K2.peer_token(a), a)
    assert auth_error(K1, "not bytes", a)


def test_record_tags_cover_key_subkey_and_value():
    v1, v2 = SwarmKeyValidator(K1), SwarmKeyValidator(K2)
    rec = DHTRecord(key=b"k", subkey=b"s", value=b"payload", expiration_time=get_dht_time() + 10)
    signed = DHTRecord(rec.key, rec.subkey, v1.sign_value(rec), rec.expiration_time)
    assert v1.validate(signed) and v1.strip_value(signed) == b"payload"
    assert not v2.validate(signed)  # another key
    assert not v1.validate(rec)  # untagged
    assert not v1.validate(DHTRecord(b"k", b"other", signed.value, rec.expiration_time))  # moved to another subkey
    assert not v1.validate(DHTRecord(b"k", b"s", b"x", rec.expiration_time))  # shorter than a tag


@pytest.mark.slow
def test_dht_without_the_key_can_neither_read_nor_write():
    from swarm_peer.swarm_key import SwarmKeyAuthorizer

    def keyed(key, **kw):
        return DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], authorizer=SwarmKeyAuthorizer(key),
                   record_validators=[SwarmKeyValidator(key)], **kw)

    a = keyed(K1)
    peers = [str(m) for m in a.get_visible_maddrs()]
    b = keyed(K1, initial_peers=peers)
    outsiders = [DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=peers, client_mode=True,
                     ensure_bootstrap_success=False),
                 keyed(K2, initial_peers=peers, client_mode=True, ensure_bootstrap_success=False)]
    try:
        exp = get_dht_time() + 60
        assert b.store("private", b"members only", exp)
        assert a.get("private", latest=True).value == b"members only"
        for o in outsiders:
            o.store("private", b"forged", exp + 30)  # newer: it would win if any member accepted it
            assert o.get("private", latest=True) is None or o.get("private", latest=True).value == b"forged"
        for member in (a, b):
            assert member.get("private", latest=True).value == b"members only"
    finally:
        for d in outsiders + [b, a]:
            d.shutdown()


@pytest.mark.slow
def test_averager_with_another_key_is_refused_and_members_average():
    from tests.test_averaging import _stop

    from swarm_peer.averaging import StageAverager
    from swarm_peer.compression import compression_strategy

    first = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])  # an open DHT: the averagers' tokens are the test
    dhts = [first] + [DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                          initial_peers=[str(m) for m in first.get_visible_maddrs()]) for _ in range(2)]
    values = [1.0, 3.0, 100.0]
    averagers = [StageAverager([torch.full((1000,), v)], dht, get_state=lambda: ({"round": 0}, []), prefix="keytest",
                               start=True, min_group_size=2, target_group_size=3, min_matchmaking_time=2.0,
                               request_timeout=1.0, compression=compression_strategy("fp32"), allreduce_timeout=20,
                               next_chunk_timeout=5, swarm_key=key)
                 for dht, v, key in zip(dhts, values, [K1, K1, K2])]
    try:
        controls = [a.step(weight=1.0, timeout=15, allow_retries=True, wait=False) for a in averagers]
        members = [c.result(40) for c in controls[:2]]
        assert all(len(g) == 2 for g in members)  # the two key holders, never the outsider
        with pytest.raises(Exception):
            controls[2].result(40)
        for a, want in zip(averagers, [2.0, 2.0, 100.0]):
            with a.get_tensors() as (t,):
                assert torch.all(t == want), (want, t[:3])
        # the state download refuses a caller without the key
        assert averagers[2].download_state([str(dhts[0].peer_id)], 1, timeout=5) is None
    finally:
        _stop(dhts, averagers)
