"""Private swarms: a pre-shared swarm key (`--swarm-key-file`) that every member holds and outsiders don't.

p2pd as hivemind ships it has no libp2p pre-shared-key ("pnet") option, so the key works one level up, at three
doors, each with HMAC-SHA256 under the key:
  1. DHT RPCs (store / find / ping): `SwarmKeyAuthorizer`, hivemind's AuthorizerBase hook. Requests carry a time,
     a nonce and a tag; replies echo the nonce. A keyless process can neither read nor write the run's DHT.
  2. DHT records: `SwarmKeyValidator` appends a tag over (key, subkey, value) to every value we store and rejects
     untagged ones, so a record is never accepted from a keyless writer even if it reached a node some other way.
  3. Our own RPCs (forward/backward, eval, sample, state download, averaging group joins) carry a *peer token*:
     HMAC(key, the caller's libp2p peer id). libp2p authenticates the peer id of every connection (Noise/TLS with
     the peer's private key) and encrypts it, so a token can be neither sniffed nor replayed by another peer.
The all-reduce itself (rpc_aggregate_part) needs a group id that only the members of an authenticated group learn.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path
from typing import Optional

from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.auth import AuthorizerBase
from hivemind.utils.timed_storage import TimedStorage, get_dht_time

MIN_KEY_BYTES = 16
TAG_BYTES = 32
MAX_CLOCK_SKEW = 60.0  # seconds a DHT request may be early or late (also bounds the nonce memory)


class SwarmKeyError(ValueError):
    """An unusable key file (missing, unreadable, too short)."""


class SwarmKey:
    """The shared secret; picklable (DHT and averager run in child processes)."""

    def __init__(self, secret: bytes):
        if len(secret) < MIN_KEY_BYTES:
            raise SwarmKeyError(f"a swarm key needs at least {MIN_KEY_BYTES} bytes of secret, got {len(secret)}")
        self._secret = secret

    @classmethod
    def from_file(cls, path: str) -> "SwarmKey":
        """The file holds the secret as text (hex or any string, surrounding whitespace ignored) or raw bytes."""
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise SwarmKeyError(f"cannot read swarm key file {path!r}: {e.strerror or e}") from None
        secret = raw.strip()
        if re.fullmatch(rb"[0-9a-fA-F]+", secret) and len(secret) % 2 == 0:
            secret = bytes.fromhex(secret.decode())
        try:
            return cls(secret)
        except SwarmKeyError as e:
            raise SwarmKeyError(f"swarm key file {path!r}: {e}") from None

    def tag(self, purpose: bytes, *parts: bytes) -> bytes:
        """HMAC over length-prefixed parts, domain-separated by `purpose` (no two messages share an encoding)."""
        mac = hmac.new(self._secret, purpose, hashlib.sha256)
        for part in parts:
            mac.update(len(part).to_bytes(8, "big"))
            mac.update(part)
        return mac.digest()

    def peer_token(self, peer_id) -> bytes:
        """Proof that the holder of this libp2p identity holds the key (bind it to the connection's remote id)."""
        return self.tag(b"swarm_peer/peer-token/1", peer_id.to_bytes())

    def check_peer_token(self, token, peer_id) -> bool:
        return isinstance(token, bytes) and hmac.compare_digest(token, self.peer_token(peer_id))

    def fingerprint(self) -> str:
        """Safe to print: tells two operators whether they hold the same key."""
        return self.tag(b"swarm_peer/fingerprint/1").hex()[:12]


def generate_key_file(path: str) -> None:
    """Write 32 random bytes as hex, readable by the owner only; never overwrite an existing key."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")


def auth_error(key: Optional[SwarmKey], token, peer_id) -> Optional[str]:
    """None when the request may proceed; else the one-line reason for the error reply."""
    if key is None or key.check_peer_token(token, peer_id):
        return None
    return "unauthorized: this swarm needs its swarm key" if token is None else "unauthorized: bad swarm key token"


class SwarmKeyAuthorizer(AuthorizerBase):
    """DHT RPC authentication: tag(request with empty signature) + time window + fresh nonce; replies echo it."""

    def __init__(self, key: SwarmKey):
        self.key = key
        self._recent_nonces = TimedStorage()

    def _mac(self, message) -> bytes:
        return self.key.tag(b"swarm_peer/dht-rpc/1", type(message).__name__.encode(), message.SerializeToString())

    async def sign_request(self, request, service_public_key) -> None:
        request.auth.time = get_dht_time()
        request.auth.nonce = secrets.token_bytes(16)
        request.auth.signature = b""
        request.auth.signature = self._mac(request)

    async def validate_request(self, request) -> bool:
        auth = request.auth
        signature, auth.signature = auth.signature, b""
        ok = hmac.compare_digest(signature, self._mac(request))
        auth.signature = signature
        now = get_dht_time()
        if not ok or abs(auth.time - now) > MAX_CLOCK_SKEW or len(auth.nonce) < 8:
            return False
        with self._recent_nonces.freeze():
            if auth.nonce in self._recent_nonces:
                return False  # a replay
        self._recent_nonces.store(auth.nonce, None, now + 3 * MAX_CLOCK_SKEW)
        return True

    async def sign_response(self, response, request) -> None:
        response.auth.nonce = request.auth.nonce
        response.auth.signature = b""
        response.auth.signature = self._mac(response)

    async def validate_response(self, response, request) -> bool:
        auth = response.auth
        signature, auth.signature = auth.signature, b""
        ok = hmac.compare_digest(signature, self._mac(response))
        auth.signature = signature
        return ok and auth.nonce == request.auth.nonce


class SwarmKeyValidator(RecordValidatorBase):
    """Every stored value ends with tag(key, subkey, value); untagged or mistagged values are invalid."""

    def __init__(self, key: SwarmKey):
        self.key = key

    def _tag(self, record: DHTRecord, value: bytes) -> bytes:
        return self.key.tag(b"swarm_peer/dht-record/1", record.key, record.subkey, value)

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value + self._tag(record, record.value)

    def validate(self, record: DHTRecord) -> bool:
        value, tag = record.value[:-TAG_BYTES], record.value[-TAG_BYTES:]
        return len(record.value) >= TAG_BYTES and hmac.compare_digest(tag, self._tag(record, value))

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value[:-TAG_BYTES]

    @property
    def priority(self) -> int:
        return 100  # outermost: signed last, checked and stripped first (covers the RSA signature too)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SwarmKeyValidator) and other.key.fingerprint() == self.key.fingerprint()


def main(argv: list[str]) -> int:
    """`python -m swarm_peer keygen PATH`: write a new random swarm key (never overwrites)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="swarm-peer keygen", description=main.__doc__)
    parser.add_argument("path", help="where to write the key (hand it to every member, e.g. over ssh)")
    args = parser.parse_args(argv)
    try:
        generate_key_file(args.path)
    except FileExistsError:
        print(f"error: {args.path} exists; remove it first or pick another path", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.path}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote swarm key {args.path} (fingerprint {SwarmKey.from_file(args.path).fingerprint()}); "
          f"start every peer and tool with --swarm-key-file {args.path}")
    return 0
