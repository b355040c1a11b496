"""Start-up checks of `hashflex run` that must fail before any miner is touched."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from hashflex.agent.app import Agent, check_time_scale, configured_addresses, load_keys, site_left_as
from hashflex.agent.config import AgentConfig, ConfigError, LoggingConfig
from hashflex.agent.logging import configure_logging
from hashflex.contract.signing import generate_keypair


def config(tmp_path: Path, addresses: list[str], keys: list[str] | None = None, **extra: object) -> AgentConfig:
    pub = tmp_path / "grid.pub"
    pub.write_bytes(generate_keypair()[1])
    return AgentConfig.model_validate(
        {
            "site": {"id": "t", "cap_kw": 10},
            "miners": {"addresses": addresses, **extra},
            "grid": {"public_keys": keys if keys is not None else [str(pub)]},
            "mqtt": {"enabled": False},
        }
    )


def test_time_scale_is_refused_for_a_real_site(tmp_path: Path) -> None:
    real = config(tmp_path, ["10.0.0.1-10.0.0.5"])
    with pytest.raises(ConfigError, match=r"simulator only.*10\.0\.0\.1"):
        check_time_scale(real, 10.0)
    check_time_scale(real, None)  # wall time: fine anywhere
    check_time_scale(real, 1.0)
    check_time_scale(config(tmp_path, ["127.70.0.1-127.70.0.9"]), 10.0)


def test_unreadable_keys_are_config_errors(tmp_path: Path) -> None:
    cfg = config(tmp_path, [], keys=[str(tmp_path / "missing.pub")])
    with pytest.raises(ConfigError, match=r"grid.public_keys: .*missing.pub: no such file"):
        load_keys(cfg)
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key")
    with pytest.raises(ConfigError, match="not an Ed25519 public key"):
        load_keys(config(tmp_path, [], keys=[str(garbage)]))
    grid, operator = load_keys(config(tmp_path, []))
    assert (len(grid), len(operator)) == (1, 0)


def test_excluded_addresses_are_not_controlled(tmp_path: Path) -> None:
    cfg = config(tmp_path, ["127.70.0.1-127.70.0.4"], exclude=["127.70.0.2"])
    assert configured_addresses(cfg) == ["127.70.0.1", "127.70.0.3", "127.70.0.4"]


@pytest.mark.parametrize(
    ("on_shutdown", "said"),
    [
        ("leave", "miners left as they are; hashflex no longer holds the cap"),
        ("sleep", "miners put to sleep (those that could be reached); hashflex no longer holds the cap"),
        (
            "wake",
            "miners woken (those that could be reached), free to draw full power; hashflex no longer holds the cap",
        ),
    ],
)
def test_stop_says_what_the_site_is_left_with(on_shutdown: str, said: str) -> None:
    """Issue 16 item 10: Ctrl-C/stop said "agent stopped" and nothing of the miners or the cap."""
    assert site_left_as(on_shutdown, controlled=True) == said
    assert "failed" in site_left_as(on_shutdown, controlled=True, failed=True)
    assert "before it controlled them" in site_left_as(on_shutdown, controlled=False)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_a_stop_at_a_terminal_prints_it_and_logs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log, terminal = io.StringIO(), _Terminal()
    configure_logging(LoggingConfig(), force_json=True, stream=log)
    monkeypatch.setattr(sys, "stderr", terminal)
    try:
        await Agent(config(tmp_path, [])).close()  # stopped before it controlled anything
    finally:
        configure_logging(LoggingConfig(), force_json=True, stream=io.StringIO())
    stopped = [json.loads(line) for line in log.getvalue().splitlines() if '"agent stopped"' in line]
    assert [line["left"] for line in stopped] == [site_left_as("leave", controlled=False)]
    assert terminal.getvalue() == f"hashflex stopped: {site_left_as('leave', controlled=False)}\n"
