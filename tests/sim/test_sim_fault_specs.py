"""Fault specs are validated completely before anything changes, and selections are deterministic."""

from __future__ import annotations

from typing import Any

import pytest

from hashflex.sim.faults import FaultSpecError, parse

IPS = [f"127.10.0.{i}" for i in range(1, 41)]
FAMILIES = {ip: ("luxos" if i < 20 else "whatsminer" if i < 30 else "antminer") for i, ip in enumerate(IPS)}


def p(spec: Any, seed: int = 7) -> list[Any]:
    return parse(spec, all_ips=IPS, families=FAMILIES, site_seed=seed)


def test_share_selects_that_share_deterministically_and_seed_changes_it() -> None:
    a = p({"mode": "refuse", "share": 0.25})[0].ips
    assert len(a) == 10
    assert a == p({"mode": "refuse", "share": 0.25})[0].ips
    assert a != p({"mode": "refuse", "share": 0.25}, seed=8)[0].ips
    assert a != p({"mode": "refuse", "share": 0.25, "seed": 99})[0].ips
    assert a == sorted(a, key=IPS.index)


def test_family_filter_count_and_explicit_ips() -> None:
    picked = p({"mode": "slow", "family": "antminer", "count": 3, "min_ms": 10, "max_ms": 20})[0]
    assert len(picked.ips) == 3
    assert all(FAMILIES[ip] == "antminer" for ip in picked.ips)
    assert picked.params == {"min_ms": 10, "max_ms": 20}
    assert p({"mode": "blackhole", "ips": [IPS[3], IPS[3], IPS[1]]})[0].ips == [IPS[3], IPS[1]]
    assert p({"mode": "ignore"})[0].ips == IPS  # no selector: every eligible miner


def test_luxos_only_modes_select_only_luxos() -> None:
    assert all(FAMILIES[ip] == "luxos" for ip in p({"mode": "atm"})[0].ips)
    assert len(p({"mode": "session_held", "share": 1.0})[0].ips) == 20
    with pytest.raises(FaultSpecError, match="not eligible"):
        p({"mode": "atm", "ips": [IPS[35]]})


def test_several_specs_in_one_body_and_clear() -> None:
    actions = p({"faults": [{"mode": "drift", "pct": 12, "count": 2}, {"mode": "clear", "modes": ["slow"]}]})
    assert [a.mode for a in actions] == ["drift", "clear"]
    assert actions[0].params == {"pct": 12}
    assert actions[1].modes == ["slow"]
    assert actions[1].ips == IPS
    assert p([{"mode": "clear"}])[0].modes[0] == "refuse"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("refuse", "is an object"),
        ([1], "not an object"),
        ({"mode": "explode"}, "unknown mode"),
        ({"mode": "slow", "latency": 5}, "unknown keys"),
        ({"mode": "slow", "min_ms": "5"}, "wrong type"),
        ({"mode": "slow", "min_ms": 500, "max_ms": 10}, "min_ms <= max_ms"),
        ({"mode": "error", "code": True}, "wrong type"),
        ({"mode": "reboot", "duration_s": 0}, "duration_s"),
        ({"mode": "atm", "direction": "sideways"}, "direction"),
        ({"mode": "drift", "pct": 1000}, "pct"),
        ({"mode": "refuse", "share": 1.5}, "share"),
        ({"mode": "refuse", "count": 41}, "count"),
        ({"mode": "refuse", "share": 0.5, "count": 2}, "only one of"),
        ({"mode": "refuse", "ips": ["10.0.0.1"]}, "not simulated here"),
        ({"mode": "refuse", "ips": "127.10.0.1"}, "list of strings"),
        ({"mode": "refuse", "family": "avalon"}, "no miner of family"),
        ({"mode": "clear", "modes": ["nope"]}, "modes must be"),
        ({"mode": "refuse", "seed": "x", "share": 0.1}, "seed"),
    ],
)
def test_bad_specs_are_refused_with_a_clear_message(spec: Any, message: str) -> None:
    with pytest.raises(FaultSpecError, match=message):
        p(spec)


def test_one_bad_item_refuses_the_whole_body() -> None:
    with pytest.raises(FaultSpecError, match="fault #1"):
        p([{"mode": "refuse", "count": 1}, {"mode": "nope"}])
