"""agent.logging: the shape of a line, contextvars, per-component levels, pyasic's root records, redaction."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime

import pytest

from hashflex.agent.config import LoggingConfig
from hashflex.agent.logging import (
    REDACTED,
    bind_context,
    bound_context,
    clear_context,
    configure_logging,
    get_logger,
    is_secret_name,
    redact,
)


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    clear_context()
    yield buf
    clear_context()
    configure_logging(LoggingConfig(), force_json=True, stream=io.StringIO())  # leave no handler on the test's buffer


def lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_json_line_has_event_level_component_and_utc_iso_timestamp(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(), force_json=True, stream=stream)
    get_logger("controller").info("tick", n=3, target_kw=41200.0, planned=12)
    [line] = lines(stream)
    assert line["event"] == "tick"
    assert line["level"] == "info"
    assert line["component"] == "controller"
    assert line["n"] == 3
    assert line["target_kw"] == 41200.0
    assert line["planned"] == 12
    stamp = str(line["timestamp"])
    assert stamp.endswith("Z")
    assert datetime.fromisoformat(stamp.replace("Z", "+00:00")).utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_context_vars_ride_along_until_unbound(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(), force_json=True, stream=stream)
    log = get_logger("controller")
    bind_context(site_id="site-a", tick=8123)
    with bound_context(dispatch_id="d-17"):
        log.info("commands sent")
    log.info("tick")
    first, second = lines(stream)
    assert (first["site_id"], first["tick"], first["dispatch_id"]) == ("site-a", 8123, "d-17")
    assert second["site_id"] == "site-a"
    assert "dispatch_id" not in second


def test_per_component_levels_with_dotted_parents(stream: io.StringIO) -> None:
    cfg = LoggingConfig(level="info", levels={"drivers": "warning", "mqtt": "debug"})
    configure_logging(cfg, force_json=True, stream=stream)
    get_logger("drivers.pyasic").info("dropped: drivers is at warning")
    get_logger("drivers.pyasic").warning("kept: warning")
    get_logger("mqtt").debug("kept: mqtt is at debug")
    get_logger("controller").debug("dropped: default is info")
    get_logger("controller").info("kept: info")
    assert [line["event"] for line in lines(stream)] == ["kept: warning", "kept: mqtt is at debug", "kept: info"]


def test_stdlib_records_share_the_shape_and_follow_levels(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(level="info", levels={"aiomqtt": "warning"}), force_json=True, stream=stream)
    logging.getLogger("asyncio").info("loop note %s", 1)
    logging.getLogger("aiomqtt").info("dropped by the aiomqtt level")
    logging.getLogger("aiomqtt").warning("reconnecting")
    got = lines(stream)
    assert [(line["component"], line["event"], line["level"]) for line in got] == [
        ("asyncio", "loop note 1", "info"),
        ("aiomqtt", "reconnecting", "warning"),
    ]
    assert all(str(line["timestamp"]).endswith("Z") for line in got)


def test_pyasic_root_logger_records_are_kept_from_warning_only(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(level="debug"), force_json=True, stream=stream)
    # pyasic calls logging.info(...) on the ROOT logger from its own files: run such calls from a pyasic path
    code = (
        "import logging\nlogging.info('pyasic chatter')\nlogging.debug('more chatter')\nlogging.warning('pyasic warns')"
    )
    exec(compile(code, "/venv/lib/python3.11/site-packages/pyasic/miners/base.py", "exec"), {})
    logging.getLogger().info("our own root info is kept at debug level")
    got = lines(stream)
    assert [(line["component"], line["event"]) for line in got] == [
        ("pyasic", "pyasic warns"),
        ("root", "our own root info is kept at debug level"),
    ]


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("password", True),
        ("mqtt_password", True),
        ("apiKey", True),
        ("private_key", True),
        ("token", True),
        ("signature", True),
        ("Authorization", True),
        ("secret", True),
        ("credentials", True),
        ("password_file", False),
        ("public_keys", False),
        ("key_id", False),
        ("keyboard", False),
        ("site_id", False),
        ("dispatch_id", False),
        ("target_kw", False),
        ("n", False),
    ],
)
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_redaction_in_log_lines(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(), force_json=True, stream=stream)
    get_logger("mqtt").info(
        "connecting to mqtt://hashflex:s3cr3t@broker:1883",
        password="hunter2",
        api_token="tok-123",
        signature="c2lnbmF0dXJl",
        url="mqtts://user:pa55@host/x",
        nested={"auth": {"password": "inner", "user": "ops"}, "items": [{"private_key": "PEM"}]},
        public_keys=["/etc/hashflex/keys/grid.pub"],
        password_file="/etc/hashflex/credentials/mqtt-password",
        site_id="s1",
    )
    [line] = lines(stream)
    text = json.dumps(line)
    for secret in ("hunter2", "tok-123", "c2lnbmF0dXJl", "s3cr3t", "pa55", "inner", "PEM"):
        assert secret not in text
    assert line["password"] == REDACTED
    assert line["api_token"] == REDACTED
    assert line["signature"] == REDACTED
    assert line["event"] == f"connecting to mqtt://hashflex:{REDACTED}@broker:1883"
    assert line["url"] == f"mqtts://user:{REDACTED}@host/x"
    assert line["nested"] == {"auth": {"password": REDACTED, "user": "ops"}, "items": [{"private_key": REDACTED}]}
    assert line["public_keys"] == ["/etc/hashflex/keys/grid.pub"]
    assert line["password_file"] == "/etc/hashflex/credentials/mqtt-password"
    assert line["site_id"] == "s1"


def test_redaction_of_stdlib_records(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(), force_json=True, stream=stream)
    logging.getLogger("paho").warning("auth failed for mqtt://u:topsecret@127.0.0.1:1883")
    [line] = lines(stream)
    assert "topsecret" not in json.dumps(line)


def test_redact_keeps_none_and_structure() -> None:
    assert redact({"password": None, "a": [1, "x"], "b": ("y",)}) == {"password": None, "a": [1, "x"], "b": ("y",)}


def test_console_format_is_not_json_and_still_redacts(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(format="console"), stream=stream)
    get_logger("cli").info("hello operator", password="hunter2", count=2)
    text = stream.getvalue()
    assert "hello operator" in text
    assert "count" in text
    assert "hunter2" not in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_auto_format_is_json_when_not_a_tty(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(format="auto"), stream=stream)
    get_logger("x").warning("w")
    assert lines(stream)[0]["level"] == "warning"


def test_reconfiguring_reaches_loggers_made_before(stream: io.StringIO) -> None:
    early = get_logger("early")
    configure_logging(LoggingConfig(level="error"), force_json=True, stream=stream)
    early.warning("dropped at error level")
    other = io.StringIO()
    configure_logging(LoggingConfig(level="info"), force_json=True, stream=other)
    early.info("now visible")
    assert stream.getvalue() == ""
    assert lines(other)[0]["event"] == "now visible"


def test_exceptions_are_structured_in_json(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(), force_json=True, stream=stream)
    try:
        raise ValueError("bad thing")
    except ValueError:
        get_logger("controller").exception("tick failed")
    [line] = lines(stream)
    assert line["level"] == "error"
    assert "bad thing" in json.dumps(line["exception"])


def test_http_client_chatter_is_kept_from_warning_only_unless_asked_for(stream: io.StringIO) -> None:
    # pyasic's stock-Antminer and Whatsminer calls go through httpx: one INFO line per request would bury the
    # agent's own lines (90 % of a 200-miner site's log)
    configure_logging(LoggingConfig(level="info"), force_json=True, stream=stream)
    logging.getLogger("httpx").info("HTTP Request: POST http://127.0.0.1/cgi-bin/get_miner_conf.cgi")
    logging.getLogger("httpcore.connection").debug("connect_tcp.started")
    logging.getLogger("httpx").warning("kept: a warning")
    configure_logging(LoggingConfig(level="info", levels={"httpx": "info"}), force_json=True, stream=stream)
    logging.getLogger("httpx").info("kept: asked for")
    assert [line["event"] for line in lines(stream)] == ["kept: a warning", "kept: asked for"]


PEM_KEY = (
    "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIBvUZ7x1o9Xw4ZkqgF2iY0pF3hXv9m4d1sT6cQe8bN2L\n"
    + "-----END PRIVATE KEY-----"
)
B64_KEY = "MCowBQYDK2VwAyEAq3v6Xz0b8v1h2nB5c9QeW0sWJq9mX7a3xYp0t8kZJ0s="


def test_alarm_names_stay_readable_and_key_material_is_still_hidden(stream: io.StringIO) -> None:
    """Issue 16 item 13: `alarm cleared key=store_unavailable` was logged as `key=***` (any field named "key" was
    taken for a secret). A plain `key` holding a name is shown; one holding key material is not, nor is any
    qualified key name."""
    configure_logging(LoggingConfig(), force_json=True, stream=stream)
    log = get_logger("controller")
    log.info("alarm cleared", key="store_unavailable")
    log.warning("alarm", alarm="cannot_meet:PDU-3", message="cannot meet the cap")
    log.info("event", data={"type": "alarm", "key": "safe_start"}, key="cannot_meet:site")
    log.info("loaded", key=PEM_KEY, private_key="store_unavailable", api_key="abc")
    log.info("loaded", key=B64_KEY, nested={"key": "0123456789abcdef" * 4})
    cleared, alarm, event, pem, b64 = lines(stream)
    assert cleared["key"] == "store_unavailable"
    assert alarm["alarm"] == "cannot_meet:PDU-3"
    assert event["data"] == {"type": "alarm", "key": "safe_start"}
    assert event["key"] == "cannot_meet:site"
    assert (pem["key"], pem["private_key"], pem["api_key"]) == (REDACTED, REDACTED, REDACTED)
    assert (b64["key"], b64["nested"]) == (REDACTED, {"key": REDACTED})
    assert "BEGIN PRIVATE KEY" not in stream.getvalue()
