"""Ed25519 signatures over canonical JSON. Pure: keys and documents in, bytes and booleans out.

A signed command is its JSON object with one extra field, `signature`: base64 of the Ed25519 signature over the
canonical form of every other field (keys sorted, no whitespace, UTF-8). Key order and spacing on the wire
therefore do not matter, and any change to any field breaks the signature.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
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
    signed = {k: v for k, v in document.items() if k != SIGNATURE_FIELD}
    signed[SIGNATURE_FIELD] = base64.b64encode(key.sign(canonical_bytes(signed))).decode()
    return signed


def verify(document: Mapping[str, Any], keys: Iterable[Ed25519PublicKey]) -> bool:
    """True when `document` carries a signature by any of `keys` over its other fields."""
    sig_text = document.get(SIGNATURE_FIELD)
    if not isinstance(sig_text, str):
        return False
    try:
        signature = base64.b64decode(sig_text, validate=True)
    except (binascii.Error, ValueError):
        return False
    message = canonical_bytes(document)
    for key in keys:
        try:
            key.verify(signature, message)
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
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
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
