"""The site meter section (site.meter): validated like the rest of the config, every error naming the field and
the value; absent (or the old `none` placeholder), the site runs on the miners' reports exactly as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hashflex.agent.app import check_time_scale
from hashflex.agent.config import ConfigError, load_config
from hashflex.agent.preflight import preflight

GOOD = {"host": "127.0.0.1", "non_miner_allowance_kw": 40, "cooling_pct": 5}


def write(tmp_path: Path, meter: object, cap_kw: float = 1000) -> Path:
    site: dict[str, object] = {"id": "m", "cap_kw": cap_kw}
    if meter is not None:
        site["meter"] = meter
    doc = {
        "site": site,
        "miners": {"addresses": ["127.0.0.1"]},
        "state_dir": str(tmp_path / "state"),
        "metrics": {"enabled": False},
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def refused(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


@pytest.mark.parametrize("meter", [None, "none"])
def test_no_meter_is_the_site_as_before(tmp_path: Path, meter: object) -> None:
    cfg = load_config(write(tmp_path, meter))
    assert cfg.site.meter is None
    assert cfg.model_dump(mode="json")["site"]["meter"] == "none"  # `config dump` unchanged


def test_a_meter_section_loads_with_its_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {**GOOD, "map": "eastron-sdm630", "stale_after_s": "10s"}))
    m = cfg.site.meter
    assert m is not None
    assert (m.port, m.unit, m.map, m.poll_s, m.stale_after_s) == (502, 1, "eastron-sdm630", 1.0, 10.0)
    assert m.cooling_share == pytest.approx(0.05)
    assert m.non_miner_window_s == 900.0
    # a dumped config loads back to the same section
    again = write(tmp_path, json.loads(json.dumps(cfg.model_dump(mode="json")["site"]["meter"])))
    assert load_config(again).site.meter == m


@pytest.mark.parametrize(
    ("meter", "expected"),
    [
        ({**GOOD, "map": "eastron-sdm63"}, "site.meter.map = 'eastron-sdm63': did you mean 'eastron-sdm630'?"),
        (
            {**GOOD, "non_miner_allowance_kw": 1000},
            "site.meter: non_miner_allowance_kw = 1000.0: not below site.cap_kw",
        ),
        ({**GOOD, "max_kw": 900}, "site.meter: max_kw = 900.0: not above site.cap_kw"),
        ({"host": "127.0.0.1"}, "site.meter.non_miner_allowance_kw: required field is missing"),
        ({**GOOD, "cooling_pct": 120}, "site.meter.cooling_pct = 120: Input should be less than or equal to 100"),
        ({**GOOD, "poll_s": "2m"}, "site.meter.poll_s = '2m': Input should be less than or equal to 60 (seconds)"),
        ({**GOOD, "sunspec_model": 205}, "site.meter.sunspec_model = 205: a SunSpec meter model is one of"),
        ({**GOOD, "port": 0}, "site.meter.port = 0:"),
        ({**GOOD, "hots": "x"}, "site.meter.hots: unknown key, did you mean 'host'?"),
        (
            {
                **GOOD,
                "map": {
                    "name": "x",
                    "total_w": {"address": 0},
                    "import_wh": {"address": 2},
                    "hz": {"address": 4, "scael": 1},
                },
            },
            "site.meter.map.hz.scael: unknown key",
        ),
    ],
)
def test_errors_name_the_field_and_the_value(tmp_path: Path, meter: object, expected: str) -> None:
    message = refused(write(tmp_path, meter))
    assert expected in message, message
    assert "<registers>" not in message
    assert "<name>" not in message


@pytest.mark.parametrize("raw", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("field", ["non_miner_allowance_kw", "cooling_pct", "non_miner_window_s", "max_kw"])
def test_non_finite_refused(tmp_path: Path, field: str, raw: str) -> None:
    path = write(tmp_path, {**GOOD, field: "__V__"})
    path.write_text(path.read_text().replace("__V__", raw).replace("'", ""))
    message = refused(path)
    assert f"site.meter.{field} = " in message, message


def test_preflight_refuses_a_meter_host_that_does_not_resolve_and_time_scale_wants_loopback(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {**GOOD, "host": "meter.invalid"}))
    errors = preflight(cfg).errors
    assert any("site.meter.host = 'meter.invalid': not a known host name" in e for e in errors), errors
    assert not preflight(load_config(write(tmp_path, GOOD))).errors
    with pytest.raises(ConfigError, match=r"site\.meter\.host 10\.0\.0\.50 is not a loopback address"):
        check_time_scale(load_config(write(tmp_path, {**GOOD, "host": "10.0.0.50"})), 10.0)
    check_time_scale(load_config(write(tmp_path, GOOD)), 10.0)
