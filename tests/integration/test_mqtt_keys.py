"""`hashflex keygen` and `hashflex sign`, run as the grid side would: real processes, real files, and a signed
command piped into mosquitto_pub that reaches a site's MQTT link intact."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hashflex.agent.commands import Command, parse_heartbeat, parse_request
from hashflex.agent.config import DispatchRules
from hashflex.agent.protocol import Channel
from hashflex.contract import signing
from hashflex.contract.reply import Reply
from tests.broker import HOST, REPO, Mosquitto
from tests.mqtt_support import Observer, make_link, running, site_config

pytestmark = pytest.mark.timeout(60)
SCOPE = ("--site", "lhr-07", "--verb", "dispatch")  # what every signed command now names (hashflex-sig-v2)


def hashflex(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hashflex", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )


@pytest.fixture
def keypair(tmp_path: Path) -> Path:
    key = tmp_path / "grid"
    result = hashflex("keygen", "--out", str(key))
    assert result.returncode == 0, result.stderr
    return key


def test_keygen_writes_a_private_key_only_its_owner_can_read_and_a_public_key(keypair: Path) -> None:
    pub = keypair.with_name("grid.pub")
    assert stat.S_IMODE(keypair.stat().st_mode) == 0o600
    private = signing.load_private_key(keypair)
    public = signing.load_public_key(pub)
    assert private.public_key() == public


def test_keygen_refuses_to_overwrite_a_key_unless_forced(keypair: Path) -> None:
    before = keypair.read_bytes(), keypair.with_name("grid.pub").read_bytes()
    refused = hashflex("keygen", "--out", str(keypair))
    assert refused.returncode == 1
    assert "--force" in refused.stderr
    assert (keypair.read_bytes(), keypair.with_name("grid.pub").read_bytes()) == before
    forced = hashflex("keygen", "--out", str(keypair), "--force")
    assert forced.returncode == 0
    assert keypair.read_bytes() != before[0]
    assert stat.S_IMODE(keypair.stat().st_mode) == 0o600


def test_sign_round_trip_verifies_and_any_changed_field_fails(keypair: Path, tmp_path: Path) -> None:
    public = signing.load_public_key(keypair.with_name("grid.pub"))
    result = hashflex("sign", "--key", str(keypair), *SCOPE, stdin='{"target_kw": 800, "end": "2030-01-01T00:00:00Z"}')
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1  # one line, ready for mosquitto_pub -s
    signed = json.loads(result.stdout)
    assert signing.verify_command(signed, [public])
    assert (signed["site"], signed["verb"]) == ("lhr-07", "dispatch")  # under the signature
    # filled in because they were missing
    uuid.UUID(signed["id"])
    issued = datetime.fromisoformat(signed["issued_at"].replace("Z", "+00:00"))
    assert signed["issued_at"].endswith("Z")
    assert abs((datetime.now(UTC) - issued).total_seconds()) < 60
    # any change to any field breaks it; so does another key
    for field, value in (
        ("target_kw", 801),
        ("id", str(uuid.uuid4())),
        ("issued_at", "2030-01-01T00:00:00Z"),
        ("site", "ams-01"),
        ("verb", "cancel"),
    ):
        assert not signing.verify_command({**signed, field: value}, [public])
    assert not signing.verify_command({**signed, "extra": 1}, [public])
    assert not signing.verify(signed, [public])  # a v2 signature is not a plain (v1) one
    other = tmp_path / "other"
    assert hashflex("keygen", "--out", str(other)).returncode == 0
    assert not signing.verify_command(signed, [signing.load_public_key(other.with_name("other.pub"))])


def test_sign_keeps_an_existing_id_and_issue_time(keypair: Path) -> None:
    request = {"id": "d-1", "issued_at": "2025-06-01T12:00:00Z", "target_kw": 5, "signature": "old"}
    result = hashflex("sign", "--key", str(keypair), *SCOPE, stdin=json.dumps(request))
    signed = json.loads(result.stdout)
    assert (signed["id"], signed["issued_at"], signed["target_kw"]) == ("d-1", "2025-06-01T12:00:00Z", 5)
    assert signed["signature"] != "old"
    assert signing.verify_command(signed, [signing.load_public_key(keypair.with_name("grid.pub"))])


@pytest.mark.parametrize("missing", ["--site", "--verb"])
def test_sign_needs_the_site_and_the_verb(keypair: Path, missing: str) -> None:
    args = [a for pair in (("--site", "lhr-07"), ("--verb", "dispatch")) if pair[0] != missing for a in pair]
    result = hashflex("sign", "--key", str(keypair), *args, stdin='{"target_kw": 5}')
    assert result.returncode == 1
    assert result.stdout == ""
    assert missing in result.stderr


@pytest.mark.parametrize(
    ("verb", "doc"),
    [
        ("dispatch", {"target_kw": 5}),
        ("cancel", {"dispatch_id": "d-1"}),
        ("cap", {"cap_kw": 5}),
        ("curtail", {"to_kw": 5}),
        ("resume", {}),
        ("heartbeat", {"seq": 1}),
    ],
)
def test_sign_makes_what_the_agent_accepts_for_each_verb(keypair: Path, verb: str, doc: dict[str, object]) -> None:
    """The README's pipeline, verb by verb: what `hashflex sign --site --verb` prints passes the agent's gate."""
    result = hashflex("sign", "--key", str(keypair), "--site", "lhr-07", "--verb", verb, stdin=json.dumps(doc))
    assert result.returncode == 0, result.stderr
    payload = result.stdout.encode()
    key = signing.load_public_key(keypair.with_name("grid.pub"))
    now = datetime.now(UTC).timestamp()
    if verb == "heartbeat":
        accepted = parse_heartbeat(
            payload, grid_keys=[key], site_id="lhr-07", now=now, max_age_s=60, max_skew_s=5, newest=None
        )
        assert isinstance(accepted, float), accepted
        return
    parsed = parse_request(
        verb,
        payload,
        Channel.MQTT,
        grid_keys=[key],
        operator_keys=[key],
        now=now,
        rules=DispatchRules(),
        max_bytes=65_536,
        cap_kw=1000,
        site_id="lhr-07",
    )
    assert isinstance(parsed, Command), parsed
    elsewhere = parse_request(
        verb,
        payload,
        Channel.MQTT,
        grid_keys=[key],
        operator_keys=[key],
        now=now,
        rules=DispatchRules(),
        max_bytes=65_536,
        cap_kw=1000,
        site_id="ams-01",
    )
    assert isinstance(elsewhere, Reply)
    assert elsewhere.error_code == "wrong_scope"


@pytest.mark.parametrize("stdin", ["not json", "[1, 2]", ""])
def test_sign_refuses_what_is_not_a_json_object(keypair: Path, stdin: str) -> None:
    result = hashflex("sign", "--key", str(keypair), *SCOPE, stdin=stdin)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "error" in result.stderr


def test_sign_refuses_a_file_that_is_not_a_private_key(keypair: Path) -> None:
    result = hashflex("sign", "--key", str(keypair.with_name("grid.pub")), *SCOPE, stdin="{}")
    assert result.returncode == 1
    assert result.stdout == ""


async def test_signed_command_piped_to_mosquitto_pub_reaches_the_site_intact(
    keypair: Path, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    cfg = site_config(tmp_path, mosquitto.plain_port)
    root = cfg.mqtt_root
    link, handler, _ = make_link(cfg)
    signed = hashflex(
        "sign", "--key", str(keypair), "--site", cfg.site.id, "--verb", "dispatch", stdin='{"target_kw": 750}'
    ).stdout
    async with running(link), Observer(mosquitto, f"{root}/reply/#") as grid:
        # the README's recipe: hashflex sign --key grid < cmd.json | mosquitto_pub -t …/cmd/dispatch -q 1 -s
        published = await asyncio.to_thread(
            subprocess.run,
            ["mosquitto_pub", "-h", HOST, "-p", str(mosquitto.plain_port), "-t", f"{root}/cmd/echo", "-q", "1", "-s"],
            input=signed,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert published.returncode == 0, published.stderr
        request_id = json.loads(signed)["id"]
        assert (await grid.wait_reply(root, "echo", request_id))["status"] == "ok"
    [call] = handler.calls
    assert signing.verify_command(json.loads(call.payload), [signing.load_public_key(keypair.with_name("grid.pub"))])
