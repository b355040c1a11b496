"""A bad site config is refused with a message naming the file, the field and the value, and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hashflex.agent.cli.main import app
from hashflex.agent.config import ConfigError, load_config

GOOD = """\
site: {id: demo, cap_kw: 1000}
miners: {addresses: ["127.1.0.1-127.1.1.44", "10.20.0.0/22"]}
mqtt: {host: 127.0.0.1, port: 1883}
grid: {public_keys: [keys/grid.pub]}
state_dir: ./state
"""
NO_MQTT = "mqtt: {enabled: false}\n"

# (name, file text, fragments the message must contain: field, value, and the hint a user needs)
CASES: list[tuple[str, str, list[str]]] = [
    ("not_yaml", "site: {id: demo, cap_kw: 1000\nmqtt: [\n", ["line 2 column 5", "not valid YAML"]),
    ("tabs", "site:\n\tid: demo\n", ["line 2", "not valid YAML", "spaces, not tabs"]),
    ("empty", "", ["the file is empty", "site:", "cap_kw"]),
    ("a_list", "- site\n- mqtt\n", ["top level must be a mapping", "'site'"]),
    ("no_site", NO_MQTT, ["site: required field is missing"]),
    ("misspelt_section", GOOD.replace("miners:", "miner:"), ["miner: unknown key", "did you mean 'miners'?"]),
    ("misspelt_field", GOOD.replace("cap_kw", "capkw"), ["site.capkw: unknown key", "did you mean 'cap_kw'?"]),
    ("negative_cap", GOOD.replace("cap_kw: 1000", "cap_kw: -5"), ["site.cap_kw = -5", "greater than 0"]),
    ("unit_in_cap", GOOD.replace("cap_kw: 1000", "cap_kw: 1MW"), ["site.cap_kw = '1MW'", "plain number in kW"]),
    ("bad_site_id", GOOD.replace("id: demo", "id: 'my site!'"), ["site.id = 'my site!'", "letters, digits"]),
    (
        "bad_octet",
        GOOD.replace('"10.20.0.0/22"', '"10.20.0.300"'),
        ["miners.addresses[1] = '10.20.0.300'", "not an IPv4 address, range a-b or CIDR", "Octet 300"],
    ),
    (
        "backwards_range",
        GOOD.replace("127.1.0.1-127.1.1.44", "127.1.1.44-127.1.0.1"),
        ["miners.addresses[0] = '127.1.1.44-127.1.0.1'", "ends before it starts"],
    ),
    ("huge_cidr", GOOD.replace("10.20.0.0/22", "10.0.0.0/8"), ["miners.addresses[1]", "more than 65536 addresses"]),
    ("port_range", GOOD.replace("port: 1883", "port: 70000"), ["mqtt.port = 70000", "less than or equal to 65535"]),
    ("no_grid_key", GOOD.replace("grid: {public_keys: [keys/grid.pub]}\n", ""), ["grid.public_keys", "grid key"]),
    (
        "bad_duration",
        GOOD + "polling: {interval_s: 5 minutes}\n",
        ["polling.interval_s = '5 minutes'", "use e.g. 30s, 5m, 2h"],
    ),
    (
        "timeout_not_below_stale",
        GOOD + "polling: {read_timeout_s: 60s, stale_after_s: 30s}\n",
        ["polling.read_timeout_s must be shorter than polling.stale_after_s"],
    ),
    (
        "zero_concurrency",
        GOOD + "polling: {concurrency: 0}\n",
        ["polling.concurrency = 0", "greater than or equal to 1"],
    ),
    ("unknown_driver", GOOD.replace("miners: {", "miners: {driver: luxos, "), ["miners.driver = 'luxos'", "'pyasic'"]),
    (
        "circuit_over_site",
        GOOD.replace("cap_kw: 1000}", "cap_kw: 1000, circuits: [{id: t1, cap_kw: 2000}]}"),
        ["circuit 't1' cap_kw=2000.0 exceeds its parent's cap (1000.0 kW)"],
    ),
    (
        "circuit_unknown_parent",
        GOOD.replace("cap_kw: 1000}", "cap_kw: 1000, circuits: [{id: t1, parent: tx9, cap_kw: 200}]}"),
        ["circuit 't1' names parent 'tx9', which is not defined"],
    ),
    # values that would switch a cap off (issue 11, finding 5); tests/unit/test_config_limits.py covers every field
    ("infinite_cap", GOOD.replace("cap_kw: 1000", "cap_kw: .inf"), ["site.cap_kw = inf", "finite number"]),
    ("huge_cap", GOOD.replace("cap_kw: 1000", "cap_kw: 1e400"), ["site.cap_kw = '1e400'", "finite number"]),
    (
        "nan_failsafe_level",
        GOOD + "failsafe: {level: .nan}\n",
        ["failsafe.level = nan", "should be 'hold' or a finite number"],
    ),
    (
        "window_with_an_offset",
        GOOD.replace("cap_kw: 1000}", "cap_kw: 1000, timezone: Asia/Karachi}")
        + 'schedule: [{name: p, start: "18:00", end: "22:00", target_kw: 5, utc_offset_h: 5}]\n',
        ["schedule[0].utc_offset_h = 5", "set site.timezone", "Asia/Karachi"],
    ),
    (
        "unknown_zone",
        GOOD.replace("cap_kw: 1000}", "cap_kw: 1000, timezone: Mars/Olympus}"),
        ["site.timezone = 'Mars/Olympus'", "not an IANA time zone"],
    ),
    (
        "sibling_circuits",
        GOOD.replace(
            "cap_kw: 1000}",
            "cap_kw: 1000, circuits: [{id: a, cap_kw: 9, miners: [10.20.0.0/24]},"
            " {id: b, cap_kw: 9, miners: [10.20.0.5]}]}",
        ),
        ["site.circuits", "'a' and 'b' both list 10.20.0.5"],
    ),
    (
        "addresses_past_the_total",
        GOOD.replace('"10.20.0.0/22"', ", ".join(f'"10.{i}.0.0/16"' for i in range(2))),
        ["miners.addresses", "more than 65536 addresses in total"],
    ),
]


@pytest.mark.parametrize(("name", "text", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_refused_with_a_message_a_user_can_act_on(
    tmp_path: Path, name: str, text: str, expected: list[str]
) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:"), message  # the file comes first, so the user knows which one
    for fragment in expected:
        assert fragment in message, f"{fragment!r} missing from:\n{message}"
    # one line per problem, none of them a dump of a whole section
    assert "{'site'" not in message, message
    assert "{'id'" not in message, message


def test_the_good_file_behind_the_cases_loads(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    cfg = load_config(path)
    assert cfg.site.cap_kw == 1000
    assert cfg.miners.addresses[1] == "10.20.0.0/22"


def test_missing_file_says_how_to_pass_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no such file \(pass --config FILE\)"):
        load_config(tmp_path / "nope.yaml")


def test_every_error_of_a_file_is_listed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(GOOD.replace("cap_kw: 1000", "cap_kw: -1").replace("port: 1883", "port: 0"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "2 error(s)" in message
    assert "site.cap_kw = -1" in message
    assert "mqtt.port = 0" in message


def test_cli_exits_non_zero_on_a_bad_config_before_touching_a_miner(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace("port: 1883", "port: 70000"))
    # 127.20.0.1 is in this suite's range; nothing listens there, and discovery must not even start
    result = CliRunner().invoke(app, ["discover", "127.20.0.1", "--config", str(path), "--json"])
    assert result.exit_code == 2, result.output
    assert "mqtt.port = 70000" in result.output
    assert '"status": "error"' in result.output
