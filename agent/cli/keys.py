"""`hashflex keygen` and `hashflex sign`: Ed25519 keys for the grid side, and signed commands to publish.

    hashflex keygen --out /etc/hashflex/keys/grid        # writes grid (private, 0600) and grid.pub
    echo '{"target_kw": 800}' | hashflex sign --key grid --site lhr-07 --verb dispatch \
        | mosquitto_pub -t hashflex/lhr-07/cmd/dispatch -s -q 1

`sign` sets `site` and `verb` (what the signature is good for: one site, one verb), fills `id` (a UUID) and
`issued_at` (now, UTC, ISO 8601 with milliseconds) only when the command has none, then adds `signature`
(contract.signing, format hashflex-sig-v2) and prints one line. `--verb heartbeat` signs a heartbeat.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from hashflex.agent.cli.common import EXIT_REFUSED, err, fail
from hashflex.agent.core import timefmt
from hashflex.contract import signing
from hashflex.contract.requests import SIGNED_VERBS


def register(app: typer.Typer) -> None:
    app.command("keygen")(keygen)
    app.command("sign")(sign)


def public_path(private: Path) -> Path:
    return private.with_name(private.name + ".pub")


def keygen(
    out: Annotated[Path, typer.Option("--out", help="Private key file; the public key goes to OUT.pub.")],
    force: Annotated[bool, typer.Option("--force", help="Replace existing key files.")] = False,
) -> None:
    """Make an Ed25519 key pair: OUT (private PEM, mode 0600) and OUT.pub (public PEM)."""
    pub = public_path(out)
    existing = [p for p in (out, pub) if p.exists()]
    if existing and not force:
        fail(f"{', '.join(map(str, existing))} already exists; pass --force to replace (the old key stops working)")
    if not out.parent.is_dir():
        fail(f"{out.parent} is not a directory; create it first")
    private_pem, public_pem = signing.generate_keypair()
    try:
        # created 0600 from the start: the private key is never readable by others, not even briefly
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # an existing file keeps its old mode through O_CREAT
            f.write(private_pem)
        pub.write_bytes(public_pem)
        pub.chmod(0o644)
    except OSError as exc:
        fail(f"cannot write the key pair: {exc}")
    message = f"wrote {out} (private, keep it secret) and {pub} (list it in grid.public_keys)"
    err.print(message, highlight=False, soft_wrap=True)


def sign(
    key: Annotated[Path, typer.Option("--key", help="Private key file (from hashflex keygen).")],
    site: Annotated[
        str | None, typer.Option("--site", help="The site id the command is for (site.id in its config).")
    ] = None,
    verb: Annotated[
        str | None, typer.Option("--verb", help=f"The verb it is published as: {', '.join(SIGNED_VERBS)}.")
    ] = None,
) -> None:
    """Sign the command JSON read on stdin (format hashflex-sig-v2) and print it, signed, on one line.

    Sets `site` and `verb` (from --site/--verb, or kept from the document); adds `id` (a UUID) and `issued_at`
    (now, UTC) when they are missing; an existing `signature` is replaced.
    """
    try:
        private = signing.load_private_key(key)
    except OSError as exc:
        fail(f"cannot read {key}: {exc.strerror}")
    except ValueError as exc:
        fail(str(exc))
    text = sys.stdin.read()
    try:
        document = json.loads(text)
    except ValueError as exc:
        fail(f"stdin is not JSON: {exc}", EXIT_REFUSED)
    if not isinstance(document, dict):
        fail('a command is a JSON object, e.g. {"target_kw": 800}', EXIT_REFUSED)
    scoped = dict(document)
    for name, value in (("site", site), ("verb", verb)):
        if value is not None:
            scoped[name] = value
        if not isinstance(scoped.get(name), str) or not scoped[name]:
            fail(f"--{name} is required (the {name} the command is for; it is covered by the signature)", EXIT_REFUSED)
    if scoped["verb"] not in SIGNED_VERBS:
        fail(f"--verb {scoped['verb']!r}: signed verbs are {', '.join(SIGNED_VERBS)}", EXIT_REFUSED)
    signed = signing.sign_command(fill_defaults(scoped, datetime.now(UTC)), private)
    sys.stdout.write(json.dumps(signed, separators=(",", ":"), ensure_ascii=False) + "\n")


def fill_defaults(document: dict[str, Any], now: datetime) -> dict[str, Any]:
    """`id` and `issued_at` added only when the command has none."""
    filled = dict(document)
    if "id" not in filled:
        filled["id"] = str(uuid.uuid4())
    if "issued_at" not in filled:
        # milliseconds: two commands signed within one second still have an order (see commands.check_order)
        filled["issued_at"] = timefmt.iso(now.timestamp(), ms=True)
    return filled
