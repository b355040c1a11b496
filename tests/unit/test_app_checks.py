"""Start-up checks of `hashflex run` that must fail before any miner is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.app import check_time_scale, configured_addresses, load_keys
from agent.config import AgentConfig, ConfigError
from agent.core.signing import generate_keypair


def config(tmp_path: Path, addresses: list[str], keys: list[str] | None = None, **extra: object) -> AgentConfig:
    pub = tmp_path / "grid.pub"
    pub.write_bytes(generate_keypair()[1])
    return AgentConfig.model_validate({
        "site": {"id": "t", "cap_kw": 10}, "miners": {"addresses": addresses, **extra},
        "grid": {"public_keys": keys if keys is not None else [str(pub)]}, "mqtt": {"enabled": False},
    })  # fmt: skip


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
