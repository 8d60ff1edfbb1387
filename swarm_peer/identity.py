"""One key per peer: its libp2p identity (the peer id every connection authenticates) is also the key that signs its
DHT records. So a record speaks only for the peer id derived from the key that signed it: `speaks_for(record's
subkey, claimed peer id)`. A record whose `peer_id` is not its signer's (a copy of an honest peer's record
re-published under another key, or a made-up peer id) is ignored by every reader (records.py), never counted in a
group size, a vote, a route or an upstream "online".

The key is hivemind's RSA key (RSAPrivateKey, what RSASignatureValidator signs with); the peer id is libp2p's for an
RSA key: the sha2-256 multihash of the protobuf-encoded DER public key (hivemind's PeerID.from_identity). The identity
file is the one p2pd reads (`--identity-path`; hivemind's format: a protobuf PrivateKey holding the DER key).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Optional

import multihash
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

_OWNER_RE = re.compile(rb"^\[owner:(.+?)\]$", re.DOTALL)  # RSASignatureValidator's subkey marker


class IdentityError(ValueError):
    """An identity file that cannot be this peer's key."""


def _peer_id_of(public_key: rsa.RSAPublicKey) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))).to_base58()


def peer_id_of_key(key: RSAPrivateKey) -> str:
    return _peer_id_of(key.get_public_key()._public_key)


@functools.lru_cache(maxsize=4096)
def signer_peer_id(subkey: bytes) -> Optional[str]:
    """The peer id of the key that signed a record stored under `subkey` ("[owner:ssh-rsa ...]"); None if malformed."""
    match = _OWNER_RE.match(subkey) if isinstance(subkey, bytes) and len(subkey) <= 4096 else None
    if match is None:
        return None
    try:
        public_key = serialization.load_ssh_public_key(match.group(1))
    except Exception:
        return None
    return _peer_id_of(public_key) if isinstance(public_key, rsa.RSAPublicKey) else None


def speaks_for(subkey: bytes, peer_id: str) -> bool:
    """Was a record claiming `peer_id` signed by that peer's own key?"""
    return signer_peer_id(subkey) == peer_id


def _write(key: RSAPrivateKey, path: Path) -> None:
    data = crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=key.to_bytes()).SerializeToString()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def load_identity(path: str) -> RSAPrivateKey:
    try:
        pb = crypto_pb2.PrivateKey.FromString(Path(path).read_bytes())
        if pb.key_type != crypto_pb2.RSA:
            raise IdentityError(f"{path}: a {crypto_pb2.KeyType.Name(pb.key_type)} key; swarm_peer needs an RSA one "
                                f"(remove the file to have one generated there)")
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key._private_key = serialization.load_der_private_key(pb.data, password=None)
    except IdentityError:
        raise
    except Exception as e:
        raise IdentityError(f"{path}: not a libp2p private key file ({type(e).__name__})") from None
    if not isinstance(key._private_key, rsa.RSAPrivateKey):
        raise IdentityError(f"{path}: not an RSA key")
    return key


class Identity:
    """This peer's key. `path=None`: a fresh key (a new peer id at every start), handed to p2pd in a private temporary
    file that `p2pd_file()` removes once the DHT has started. An existing `path` is loaded; a missing one is created
    (a stable peer id from then on)."""

    def __init__(self, path: Optional[str] = None):
        self.path = path
        if path is None:
            self.key = RSAPrivateKey()
        elif os.path.exists(path):
            self.key = load_identity(path)
        else:
            self.key = RSAPrivateKey()
            try:
                _write(self.key, Path(path))
            except OSError as e:
                raise IdentityError(f"{path}: cannot create the identity file ({e.strerror})") from None
        self.peer_id = peer_id_of_key(self.key)

    @contextlib.contextmanager
    def p2pd_file(self):
        """The identity file's path while p2pd starts."""
        if self.path is not None:
            yield self.path
            return
        with tempfile.TemporaryDirectory(prefix="swarm_peer_id_") as tmp:
            path = Path(tmp) / "identity.key"
            _write(self.key, path)
            yield str(path)
