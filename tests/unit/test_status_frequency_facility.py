"""`hashflex status` (the human view): an under-frequency event while one holds, and the facility loads; and the
target-source metric naming frequency response.

The frequency section comes from a real FrequencyResponse's status document (idle, then with an event's figures
as the agent fills them in), so a renamed key in agent/runtime/frequency.py fails here."""

from __future__ import annotations

import io
import time
from typing import Any

from rich.console import Console

from hashflex.agent.cli.status import explain_target, status_view
from hashflex.agent.config import FrequencyResponseConfig
from hashflex.agent.core.timefmt import iso
from hashflex.agent.io.metrics import Metrics
from hashflex.agent.runtime.frequency import FrequencyResponse


class _Host:
    def __init__(self) -> None:
        self.in_flight: dict[str, Any] = {}

    def fire_shed(self, changes: list[Any], level_kw: float, now: float) -> None:
        pass

    def audit(self, data: dict[str, Any], now: float) -> None:
        pass

    def trigger(self) -> None:
        pass


def frequency_doc(**event: Any) -> dict[str, Any]:
    cfg = FrequencyResponseConfig.model_validate(
        {"stages": [{"below_hz": 49.4, "for_s": 0.2, "shed": "25%"}], "restore_above_hz": 49.8, "restore_after_s": 60}
    )
    host = _Host()
    doc = FrequencyResponse(cfg, host, host, trigger=host.trigger, clock=time.time, meter_fresh=lambda: True).doc()
    missing = set(event) - set(doc)
    assert not missing, f"the status document has no {missing}"
    return {**doc, **event}


def render(doc: dict[str, Any]) -> str:
    text = io.StringIO()
    Console(file=text, width=400).print(status_view(doc))
    return text.getvalue()


def site(**extra: Any) -> dict[str, Any]:
    return {
        "site_id": "s1",
        "version": "1",
        "target_kw": 300.0,
        "cap_kw": 420.0,
        "power_kw_estimated": 290.0,
        "meter": {
            "fresh": True,
            "power_kw": 305.0,
            "non_miner_kw": 15.0,
            "non_miner_counted_kw": 17.0,
            "hz": 49.21,
            "age_s": 0.1,
        },
        **extra,
    }


def test_an_active_frequency_event_shows_stage_held_kw_lowest_hz_since_and_what_restores_it() -> None:
    now = time.time()
    fr = frequency_doc(
        active=True,
        stage=0,
        held_kw=308.2,
        shed_kw=96.8,
        slept=28,
        awaiting_ack=0,
        first_below_at=iso(now - 12.0),
        min_hz=49.197,
        restoring_since=None,
        shed_reached_at=iso(now - 10.0),
    )
    doc = site(target_source="frequency", target_reason="frequency")
    doc["meter"]["frequency_response"] = fr
    out = render(doc)
    line = next(x for x in out.splitlines() if x.startswith("frequency"))
    assert "EVENT stage 1" in line
    assert "held at 308.2" in line, line
    assert "28 asleep" in line
    assert "lowest 49.197 Hz" in line
    assert "below since" in line
    assert "12s ago" in line
    assert "restores after 60 s above 49.8 Hz" in line
    assert "under-frequency response holds the site" in out
    assert explain_target(doc).startswith("under-frequency response")
    # once above the restore threshold: how long is left
    fr["restoring_since"] = iso(now - 45.0)
    line = next(x for x in render(doc).splitlines() if x.startswith("frequency"))
    assert "above since" in line, line
    assert "15s to go" in line, line


def test_no_frequency_row_while_nothing_holds() -> None:
    doc = site()
    doc["meter"]["frequency_response"] = frequency_doc()
    assert "EVENT" not in render(doc)
    assert not any(x.startswith("frequency") for x in render(doc).splitlines())


def test_the_facility_loads_show_setpoint_and_wakes_per_circuit() -> None:
    loads = [
        {
            "circuit": "hall-a",
            "kind": "cooling",
            "device": "fan-a",
            "setpoint_pct": 80.0,
            "acknowledged_pct": 80.0,
            "stepping_down_since": None,
            "miners_on": 40,
            "miners": 60,
            "wakes_held": False,
            "error": None,
            "wakes": "allowed",
        },
        {
            "circuit": "hall-b",
            "kind": "cooling",
            "device": "pump-b",
            "setpoint_pct": 60.0,
            "acknowledged_pct": 40.0,
            "stepping_down_since": None,
            "miners_on": 10,
            "miners": 60,
            "wakes_held": True,
            "error": None,
            "wakes": "held: cooling coming up",
        },
        {
            "circuit": "hall-c",
            "kind": "cooling",
            "device": "fan-c",
            "setpoint_pct": None,
            "acknowledged_pct": None,
            "stepping_down_since": None,
            "miners_on": 0,
            "miners": 60,
            "wakes_held": False,
            "error": "timeout",
            "wakes": "blocked: device not answering",
        },
    ]
    out = render(site(facility=loads))
    lines = out.splitlines()
    a = next(x for x in lines if "hall-a" in x)
    assert a.lstrip().startswith("facility")
    assert "setpoint 80%" in a
    assert "ack" not in a
    assert "miners 40/60 on" in a
    assert "wakes allowed" in a
    b = next(x for x in lines if "hall-b" in x)
    assert "setpoint 60% (ack 40%)" in b
    assert "wakes held: cooling coming up" in b
    c = next(x for x in lines if "hall-c" in x)
    assert "wakes blocked: device not answering" in c
    assert "facility" not in render(site())


def test_the_target_source_metric_names_frequency_response_when_it_holds_the_site() -> None:
    doc = site(target_source="frequency", target_reason="frequency", power_kw=290.0)
    scraped = Metrics(status_provider=lambda: doc).render().decode()
    assert 'hashflex_site_target_source{source="frequency"} 1.0' in scraped
    assert 'hashflex_site_target_source{source="cap"} 0.0' in scraped
