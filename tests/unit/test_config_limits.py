"""Config that would defeat the caps is refused (issue 11, finding 5).

No non-finite number anywhere (every float field, found by walking the models, so a field added later is covered
without touching this file), upper bounds on powers and durations, a total address limit, circuit membership that
cannot leave a miner uncounted, and time-of-use windows in the site's IANA zone. Every refusal names the file,
the field and the value, and `hashflex config check` prints it as one line per problem (no traceback).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import typing
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import AfterValidator, BaseModel, ValidationError
from typer.testing import CliRunner

from hashflex.agent.cli.main import app
from hashflex.agent.config import MAX_DURATION_S, MAX_POWER_KW, AgentConfig, ConfigError, _Model, load_config
from hashflex.agent.io.store import Store
from hashflex.agent.runtime.actuator import Actuator
from hashflex.agent.runtime.assembly import build_controller
from hashflex.agent.runtime.events import EventLog
from hashflex.agent.runtime.fleet import Fleet, driver_from_config

MARK = "__VALUE__"


def base_doc(tmp_path: Path) -> dict[str, Any]:
    """A valid config with at least one element in every list of sections, so every float field has a place."""
    return {
        "site": {
            "id": "limits",
            "cap_kw": 1000,
            "timezone": "Asia/Karachi",
            "circuits": [
                {
                    "id": "tx1",
                    "cap_kw": 800,
                    "miners": ["10.0.0.0/25"],
                    "cooling": {
                        "kind": "drive",
                        "host": "10.0.1.2",
                        "setpoint_register": 1,
                        "full_kw": 40,
                        "min_pct": 30,
                        "curve": [[0, 30], [100, 100]],
                    },
                },
                {"id": "tx2", "cap_kw": 800, "miners": ["10.0.0.128/25"]},
            ],
            "meter": {
                "host": "10.0.1.1",
                "non_miner_allowance_kw": 50,
                "max_kw": 2000,
                "cooling_pct": 5,
                "map": {
                    "name": "custom",
                    "total_w": {"address": 0},
                    "import_wh": {"address": 2},
                    "hz": {"address": 4},
                    "phase_w": [{"address": a} for a in (6, 8, 10)],
                    "volts": [{"address": a} for a in (12, 14, 16)],
                },
            },
        },
        "miners": {
            "addresses": ["10.0.0.0/24"],
            "priority_groups": [{"name": "g", "priority": 1, "addresses": ["10.0.0.5"]}],
        },
        "control": {"ramp_up_kw_per_min": 600, "tolerance_kw": 5},
        "dispatch": {"max_event_s": "2h"},
        "failsafe": {"level": 500},
        "mqtt": {"enabled": False, "miner_detail_interval_s": "30s"},
        "schedule": [{"name": "peak", "start": "18:00", "end": "22:00", "target_kw": 600}],
        "frequency_response": {
            "stages": [{"below_hz": 49.4, "for_s": 0.2, "shed": "25%"}],
            "restore_above_hz": 49.9,
            "restore_after_s": 30,
        },
        "state_dir": str(tmp_path / "state"),
    }


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _has_float(annotation: Any) -> bool:
    if annotation is float:
        return True
    return any(_has_float(arg) for arg in typing.get_args(annotation))


def _is_list(annotation: Any) -> bool:
    # a tuple of models (a meter map's three phases) is walked as a list: its first element stands for all
    return typing.get_origin(annotation) in (list, tuple) or any(_is_list(a) for a in typing.get_args(annotation))


def float_fields(model: type[BaseModel] = AgentConfig, prefix: tuple[str | int, ...] = ()) -> list[tuple[Any, ...]]:
    """The path of every float-typed field in the config, unions and optional fields included."""
    found: list[tuple[Any, ...]] = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        annotation = field.annotation
        subs = _models_in(annotation)
        if subs:
            here = (*prefix, name, 0) if _is_list(annotation) else (*prefix, name)
            for sub in subs:
                found += float_fields(sub, here)
        elif _has_float(annotation):
            found.append((*prefix, name, *_element_path(annotation)))
    return found


def _element_path(annotation: Any) -> tuple[int, ...]:
    """Where the float is inside a field of lists or tuples of floats (a cooling curve's points): its first
    element, as deep as it goes; () for a plain float."""
    if annotation is float:
        return ()
    for arg in typing.get_args(annotation):
        if _has_float(arg):
            inner = _element_path(arg)
            return (0, *inner) if typing.get_origin(annotation) in (list, tuple) else inner
    return ()


FLOAT_FIELDS = float_fields()


def loc_text(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def set_path(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = doc
    for part in path[:-1]:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    node[path[-1]] = value


def write_with(tmp_path: Path, path: tuple[Any, ...], raw: str, name: str = "site.yaml") -> Path:
    """The base config with the field at `path` set to `raw`, exactly as typed into the YAML file."""
    doc = base_doc(tmp_path)
    set_path(doc, path, MARK)
    out = tmp_path / name
    out.write_text(yaml.safe_dump(doc, sort_keys=False).replace(MARK, raw))
    return out


def refused(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:"), message
    assert "Traceback" not in message
    return message


def test_the_walk_finds_the_fields_that_defeat_the_caps(tmp_path: Path) -> None:
    names = {loc_text(p) for p in FLOAT_FIELDS}
    for expected in (
        "site.cap_kw",
        "site.circuits[0].cap_kw",
        "failsafe.heartbeat_timeout_s",
        "failsafe.level",
        "control.tolerance_kw",
        "control.ramp_up_kw_per_min",
        "schedule[0].target_kw",
        "dispatch.max_event_s",
        "mqtt.miner_detail_interval_s",
        "control.wake.interval_s",
    ):
        assert expected in names, sorted(names)
    cfg = load_config(write_with(tmp_path, ("site", "id"), "limits"))  # the base itself is valid
    assert cfg.site.cap_kw == 1000


# ---------------------------------------------------------------------------------------------- non-finite
NON_FINITE = [(".inf", "inf"), ("-.inf", "-inf"), (".nan", "nan"), ("1e400", "'1e400'"), ("1.0e+400", "inf")]


@pytest.mark.parametrize("field", FLOAT_FIELDS, ids=[loc_text(p) for p in FLOAT_FIELDS])
def test_every_float_field_refuses_a_non_finite_value(tmp_path: Path, field: tuple[Any, ...]) -> None:
    for raw, shown in NON_FINITE:
        message = refused(write_with(tmp_path, field, raw))
        assert f"{loc_text(field)} = {shown}" in message, f"{raw}:\n{message}"
        if raw in (".inf", ".nan", "1.0e+400"):  # "1e400" may be "not a duration"; "-.inf" may be "negative"
            assert "finite" in message, f"{raw}:\n{message}"


def _all_floats(value: Any, path: str = "") -> list[tuple[str, float]]:
    if isinstance(value, float):
        return [(path, value)]
    if isinstance(value, dict):
        return [f for k, v in value.items() for f in _all_floats(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list):
        return [f for i, v in enumerate(value) for f in _all_floats(v, f"{path}[{i}]")]
    return []


def _is_power(path: str) -> bool:
    return path.endswith(("_kw", "_kw_per_min")) or path == "failsafe.level"


def _is_duration(path: str) -> bool:
    return path.endswith("_s")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(FLOAT_FIELDS),
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(min_value=-1e12, max_value=1e12),
        st.sampled_from([r for r, _ in NON_FINITE] + ["1e308", "9e15", "1e999d", "99999999999d", "1e6h"]),
    ),
)
def test_any_value_in_any_float_field_loads_only_finite_and_bounded(
    tmp_path: Path, field: tuple[Any, ...], value: float | str
) -> None:
    raw = value if isinstance(value, str) else yaml.safe_dump(value).removesuffix("\n...\n").strip()
    path = write_with(tmp_path, field, raw)
    if isinstance(value, float) and not math.isfinite(value):
        assert f"{loc_text(field)} = " in refused(path)
        return
    try:
        cfg = load_config(path)
    except ConfigError:
        return  # a finite value may be refused for other reasons (bounds, cross-checks); loading is what matters
    for where, number in _all_floats(cfg.model_dump(mode="python", exclude={"source"})):
        assert math.isfinite(number), (where, number)
        if _is_power(where):
            assert number <= MAX_POWER_KW, (where, number)
        if _is_duration(where):
            assert number <= MAX_DURATION_S, (where, number)


# ---------------------------------------------------------------------------------------------- bounds
POWER_FIELDS = [p for p in FLOAT_FIELDS if _is_power(loc_text(p))]
DURATION_FIELDS = [p for p in FLOAT_FIELDS if _is_duration(loc_text(p))]


def test_there_are_powers_and_durations_to_bound() -> None:
    assert len(POWER_FIELDS) >= 5
    assert len(DURATION_FIELDS) >= 15


@pytest.mark.parametrize("field", POWER_FIELDS, ids=[loc_text(p) for p in POWER_FIELDS])
def test_every_power_is_bounded(tmp_path: Path, field: tuple[Any, ...]) -> None:
    message = refused(write_with(tmp_path, field, "2000000"))  # 2,000 MW: a typo (W for kW), not a site
    assert loc_text(field) in message, message


@pytest.mark.parametrize("field", DURATION_FIELDS, ids=[loc_text(p) for p in DURATION_FIELDS])
def test_every_duration_is_bounded(tmp_path: Path, field: tuple[Any, ...]) -> None:
    message = refused(write_with(tmp_path, field, "30d"))
    assert f"{loc_text(field)} = '30d'" in message, message


def test_the_documented_maxima_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "max.yaml"
    doc = base_doc(tmp_path)
    doc["site"] = {"id": "big", "cap_kw": MAX_POWER_KW}
    doc["dispatch"] = {"max_event_s": MAX_DURATION_S}
    doc.pop("frequency_response")  # it needs the site meter, which this site has not
    doc["schedule"] = []
    path.write_text(yaml.safe_dump(doc))
    cfg = load_config(path)
    assert cfg.site.cap_kw == MAX_POWER_KW == 1_000_000.0  # 1,000 MW, as the docs say
    assert cfg.dispatch.max_event_s == MAX_DURATION_S == 7 * 86400.0


def test_a_tolerance_that_would_hide_an_overshoot_of_the_cap_is_refused(tmp_path: Path) -> None:
    message = refused(write_with(tmp_path, ("control", "tolerance_kw"), "150"))  # 15 % of a 1,000 kW cap
    assert "control.tolerance_kw" in message
    assert "10 % of site.cap_kw" in message
    assert load_config(write_with(tmp_path, ("control", "tolerance_kw"), "100")).control.tolerance_kw == 100


def test_a_heartbeat_timeout_longer_than_an_hour_is_refused(tmp_path: Path) -> None:
    message = refused(write_with(tmp_path, ("failsafe", "heartbeat_timeout_s"), "2h"))
    assert "failsafe.heartbeat_timeout_s = '2h'" in message
    assert load_config(write_with(tmp_path, ("failsafe", "heartbeat_timeout_s"), "1h")).failsafe.heartbeat_timeout_s


# ---------------------------------------------------------------------------------------------- addresses
def test_many_specs_that_add_up_past_the_total_are_refused(tmp_path: Path) -> None:
    slash16s = json.dumps([f"10.{i}.0.0/16" for i in range(256)])  # each passes alone; together a /8
    message = refused(write_with(tmp_path, ("miners", "addresses"), slash16s))
    assert "miners.addresses" in message
    assert "more than 65536 addresses in total" in message
    assert message.count("\n") <= 1, message  # one line, not 256 values


def test_a_circuit_list_is_limited_too(tmp_path: Path) -> None:
    specs = json.dumps([f"10.{i}.0.0/16" for i in range(2)])
    message = refused(write_with(tmp_path, ("site", "circuits", 0, "miners"), specs))
    assert "site.circuits[0].miners" in message
    assert "in total" in message


def test_a_whole_slash_16_still_passes(tmp_path: Path) -> None:
    cfg = load_config(write_with(tmp_path, ("miners", "addresses"), '["10.0.0.0/16"]'))
    assert cfg.miners.addresses == ["10.0.0.0/16"]


# ---------------------------------------------------------------------------------------------- circuits
def test_a_miner_in_two_sibling_circuits_is_refused(tmp_path: Path) -> None:
    message = refused(write_with(tmp_path, ("site", "circuits", 1, "miners"), '["10.0.0.100-10.0.0.200"]'))
    assert "'tx1' and 'tx2'" in message, message
    assert "10.0.0.100" in message  # the first address both name, so the user can find it
    assert "site.circuits" in message


def test_a_miner_in_a_circuit_and_its_descendant_is_allowed(tmp_path: Path) -> None:
    doc = base_doc(tmp_path)
    doc["site"]["circuits"].append({"id": "pdu1", "parent": "tx1", "cap_kw": 100, "miners": ["10.0.0.1-10.0.0.20"]})
    path = tmp_path / "nested.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert [c.id for c in load_config(path).site.circuits] == ["tx1", "tx2", "pdu1"]


# ---------------------------------------------------------------------------------------------- time zone
def test_a_window_with_a_utc_offset_points_to_site_timezone(tmp_path: Path) -> None:
    message = refused(write_with(tmp_path, ("schedule", 0, "utc_offset_h"), "5"))
    assert "schedule[0].utc_offset_h = 5" in message
    assert "site.timezone" in message
    assert "Asia/Karachi" in message


def test_windows_without_a_site_timezone_are_refused(tmp_path: Path) -> None:
    doc = base_doc(tmp_path)
    del doc["site"]["timezone"]
    path = tmp_path / "nozone.yaml"
    path.write_text(yaml.safe_dump(doc))
    message = refused(path)
    assert "site.timezone" in message
    assert "IANA" in message


def test_an_unknown_time_zone_is_refused(tmp_path: Path) -> None:
    message = refused(write_with(tmp_path, ("site", "timezone"), "Asia/Karachy"))
    assert "site.timezone = 'Asia/Karachy'" in message
    assert "IANA" in message


def test_the_site_zone_is_loaded(tmp_path: Path) -> None:
    cfg = load_config(write_with(tmp_path, ("site", "timezone"), "Europe/Berlin"))
    assert cfg.site.timezone == "Europe/Berlin"
    assert str(cfg.site.tzinfo) == "Europe/Berlin"


# ---------------------------------------------------------------------------------------------- the CLI
runner = CliRunner(env={"COLUMNS": "200"})

CLI_CASES: list[tuple[str, tuple[Any, ...], str, str]] = [
    ("cap_inf", ("site", "cap_kw"), ".inf", "site.cap_kw = inf"),
    ("cap_1e400", ("site", "cap_kw"), "1e400", "site.cap_kw = '1e400'"),
    ("circuit_cap_inf", ("site", "circuits", 0, "cap_kw"), ".inf", "site.circuits[0].cap_kw = inf"),
    ("heartbeat_inf", ("failsafe", "heartbeat_timeout_s"), ".inf", "failsafe.heartbeat_timeout_s = inf"),
    ("level_nan", ("failsafe", "level"), ".nan", "failsafe.level = nan"),
    ("tolerance_inf", ("control", "tolerance_kw"), ".inf", "control.tolerance_kw = inf"),
    ("siblings", ("site", "circuits", 1, "miners"), '["10.0.0.1"]', "'tx1' and 'tx2'"),
    ("slash8", ("miners", "addresses"), json.dumps([f"10.{i}.0.0/16" for i in range(256)]), "miners.addresses"),
    ("utc_offset", ("schedule", 0, "utc_offset_h"), "5", "schedule[0].utc_offset_h = 5"),
]


@pytest.mark.parametrize(("name", "field", "raw", "expected"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_config_check_refuses_with_one_line(
    tmp_path: Path, name: str, field: tuple[Any, ...], raw: str, expected: str
) -> None:
    path = write_with(tmp_path, field, raw, f"{name}.yaml")
    result = runner.invoke(app, ["config", "check", "--config", str(path)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # the whole answer is one line: file, field, value, what is wrong
    assert str(path) in lines[0]
    assert expected in lines[0], lines[0]
    result = runner.invoke(app, ["config", "check", "--config", str(path), "--json"])
    doc = json.loads(result.stdout)
    assert doc["ok"] is False
    assert len(doc["errors"]) == 1, doc["errors"]
    assert expected in doc["errors"][0], doc["errors"]


def test_config_check_accepts_the_base(tmp_path: Path) -> None:
    path = write_with(tmp_path, ("site", "id"), "limits")
    result = runner.invoke(app, ["config", "check", "--config", str(path)])
    assert result.exit_code == 0, result.output


def test_all_address_lists_together_are_limited(tmp_path: Path) -> None:
    doc = base_doc(tmp_path)
    doc["miners"]["addresses"] = ["10.0.0.0/16"]
    doc["site"]["circuits"] = [{"id": f"tx{i}", "cap_kw": 200, "miners": [f"10.{i}.0.0/16"]} for i in range(1, 5)]
    path = tmp_path / "lists.yaml"
    path.write_text(yaml.safe_dump(doc))
    message = refused(path)  # each list passes alone; five /16s (and a group of one) do not
    assert "the address lists name 327671 addresses together, more than 262144" in message


def test_the_finite_net_catches_a_value_a_validator_made_infinite() -> None:
    """`allow_inf_nan=False` checks input; a custom validator could still produce inf. The base model refuses it."""

    class Probe(_Model):
        scaled: Annotated[float, AfterValidator(lambda v: v * 1e300)]

    assert Probe(scaled=1.0).scaled == 1e300
    with pytest.raises(ValidationError, match=r"scaled = inf: Input should be a finite number"):
        Probe(scaled=1e10)


# ---------------------------------------------------------------------------------------------- the runtime
async def test_the_controller_counts_a_nested_miner_on_the_deepest_circuit_and_windows_in_the_zone(
    tmp_path: Path,
) -> None:
    """What `run` builds from the file: a miner listed by a transformer and its PDU counts on the PDU (first-listed
    -wins put it on the transformer, so the PDU's cap never saw it), and the window follows Berlin's DST."""
    doc = base_doc(tmp_path)
    doc["site"]["timezone"] = "Europe/Berlin"
    doc["site"]["circuits"].append({"id": "pdu1", "parent": "tx1", "cap_kw": 100, "miners": ["10.0.0.1-10.0.0.20"]})
    doc["miners"] = {"addresses": []}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(doc))
    cfg = load_config(path)
    cfg.state_path.mkdir(parents=True, exist_ok=True)
    store = Store.open(cfg.db_path)
    try:
        fleet = Fleet.from_config(driver_from_config(cfg), cfg.polling, clock=time.time)
        actuator = Actuator(fleet.handle, concurrency=1, command_timeout_s=1.0)
        ctl = build_controller(
            cfg,
            fleet=fleet,
            store=store,
            actuator=actuator,
            clock=_WallClock(),
            events=EventLog(time.time),
            grid_link=False,
        )
        assert ctl.rules.circuit_of["10.0.0.5"] == "pdu1"
        assert ctl.rules.circuit_of["10.0.0.100"] == "tx1"
        assert ctl.rules.circuit_of["10.0.0.200"] == "tx2"
        (peak,) = ctl.rules.schedule
        assert peak.active_at(datetime(2024, 7, 15, 16, 30, tzinfo=UTC).timestamp())  # 18:30 CEST
        assert not peak.active_at(datetime(2024, 7, 15, 20, 30, tzinfo=UTC).timestamp())  # 22:30 CEST
        assert peak.active_at(datetime(2024, 1, 15, 17, 30, tzinfo=UTC).timestamp())  # 18:30 CET
    finally:
        store.close()


class _WallClock:
    scale = 1.0

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def to_wall(self, seconds: float) -> float:
        return seconds
