"""Ed25519 signatures over canonical JSON. Pure: keys and documents in, bytes and booleans out.

A signed document is its JSON object with one extra field, `signature`: base64 of the Ed25519 signature over the
canonical form of every other field (keys sorted, no whitespace, UTF-8). Key order and spacing on the wire
therefore do not matter, and any change to any field breaks the signature.

Commands and heartbeats use the versioned format `hashflex-sig-v2` (`sign_command` / `verify_command`):

    message   = b"hashflex-sig-v2\n" + canonical JSON of the document without `signature`
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    signature = base64(Ed25519.sign(private key, message))

and the document must carry `site` (the site id it is for), `verb` (the verb of the topic it is published on:
`dispatch`, `cancel`, `cap`, `curtail`, `resume`, or `heartbeat`), `id` and `issued_at`, so a signature is only good
for one site, one verb and one moment. The prefix keeps a v2 signature from ever verifying as another kind of
signed document (the audit's signed day heads use plain `sign`), and names the version a future format replaces.
Numbers are canonicalised as Python's json renders them: a grid implementation should send integers, or decimal
strings with units ("850kW"), or sign with `hashflex sign`, so both sides render the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_FIELD = "signature"


def canonical_bytes(document: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in document.items() if k != SIGNATURE_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(document: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """`document` with a plain signature over its other fields (audit day heads)."""
    return _signed(document, key, canonical_bytes)


def verify(document: Mapping[str, Any], keys: Iterable[Ed25519PublicKey]) -> bool:
    """True when `document` carries a plain signature by any of `keys` over its other fields. Never raises."""
    return _verified(document, keys, canonical_bytes)


COMMAND_FORMAT = "hashflex-sig-v2"
_COMMAND_PREFIX = COMMAND_FORMAT.encode() + b"\n"


def command_message(document: Mapping[str, Any]) -> bytes:
    """The bytes a `hashflex-sig-v2` signature covers."""
    return _COMMAND_PREFIX + canonical_bytes(document)


def sign_command(document: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """`document` with a `hashflex-sig-v2` signature. The caller puts `site`, `verb`, `id` and `issued_at` in it."""
    return _signed(document, key, command_message)


def verify_command(document: Mapping[str, Any], keys: Iterable[Ed25519PublicKey]) -> bool:
    """True when `document` carries a `hashflex-sig-v2` signature by any of `keys`. Never raises."""
    return _verified(document, keys, command_message)


def _signed(
    document: Mapping[str, Any], key: Ed25519PrivateKey, message: Callable[[Mapping[str, Any]], bytes]
) -> dict[str, Any]:
    signed = {k: v for k, v in document.items() if k != SIGNATURE_FIELD}
    signed[SIGNATURE_FIELD] = base64.b64encode(key.sign(message(signed))).decode()
    return signed


def _verified(
    document: Mapping[str, Any], keys: Iterable[Ed25519PublicKey], message: Callable[[Mapping[str, Any]], bytes]
) -> bool:
    sig_text = document.get(SIGNATURE_FIELD)
    if not isinstance(sig_text, str) or len(sig_text) > 512:  # an Ed25519 signature is 88 base64 characters
        return False
    try:
        signature = base64.b64decode(sig_text, validate=True)
        body = message(document)
    except (binascii.Error, ValueError, TypeError, RecursionError):
        return False
    for key in keys:
        try:
            key.verify(signature, body)
        except InvalidSignature:
            continue
        return True
    return False


def generate_keypair() -> tuple[bytes, bytes]:
    """(private PEM, public PEM) for a new key."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def parse_public_key(data: bytes, name: str = "key") -> Ed25519PublicKey:
    """A public key from PEM or from base64 of the 32 raw bytes."""
    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(text)
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"{name}: not an Ed25519 public key (PEM or base64): {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{name}: is a public key, but not Ed25519")
    return key


def parse_private_key(data: bytes, name: str = "key") -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data.strip(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{name}: is a private key, but not Ed25519")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    return parse_public_key(path.read_bytes(), str(path))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    return parse_private_key(path.read_bytes(), str(path))
