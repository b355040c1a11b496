"""Time-of-use windows: local time at a fixed offset, days, wrapping midnight."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agent.core.schedule import ScheduleRule, parse_hhmm


def local(day: str, hhmm: str, offset_h: float) -> float:
    """Epoch seconds of local time `hhmm` on the given weekday of the week of Monday 2024-01-01."""
    days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    h, m = (int(x) for x in hhmm.split(":"))
    when = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(days=days.index(day), hours=h, minutes=m)
    return (when - timedelta(hours=offset_h)).timestamp()


PEAK = ScheduleRule.from_hhmm("peak", "18:00", "22:00", ["mon", "tue", "wed", "thu", "fri"], 600.0, 5.0)
NIGHT = ScheduleRule.from_hhmm("night", "22:00", "06:00", ["fri"], 300.0, 5.0)


@pytest.mark.parametrize(
    ("rule", "day", "hhmm", "active"),
    [
        (PEAK, "mon", "17:59", False),
        (PEAK, "mon", "18:00", True),
        (PEAK, "mon", "21:59", True),
        (PEAK, "mon", "22:00", False),
        (PEAK, "sat", "19:00", False),
        (NIGHT, "fri", "21:59", False),
        (NIGHT, "fri", "22:00", True),
        (NIGHT, "sat", "00:30", True),  # wrapped past midnight: belongs to Friday's window
        (NIGHT, "sat", "05:59", True),
        (NIGHT, "sat", "06:00", False),
        (NIGHT, "fri", "03:00", False),  # Thursday's night is not configured
        (NIGHT, "sat", "22:30", False),
    ],
)
def test_schedule_window_wrapping_midnight_and_days(rule: ScheduleRule, day: str, hhmm: str, active: bool) -> None:
    assert rule.active_at(local(day, hhmm, 5.0)) is active


def test_schedule_uses_the_configured_utc_offset() -> None:
    utc_18 = local("mon", "18:00", 0.0)  # 18:00 UTC is 23:00 in Pakistan: outside the +5 window
    assert not PEAK.active_at(utc_18)
    assert ScheduleRule.from_hhmm("peak", "18:00", "22:00", ["mon"], 1.0, 0.0).active_at(utc_18)
    assert ScheduleRule.from_hhmm("p", "18:00", "22:00", ["mon"], 1.0, -3.5).active_at(local("mon", "19:00", -3.5))


def test_end_24_00_is_midnight_and_equal_start_end_is_a_whole_day() -> None:
    evening = ScheduleRule.from_hhmm("e", "20:00", "24:00", ["sun"], 1.0)
    assert evening.active_at(local("sun", "23:59", 0))
    assert not evening.active_at(local("mon", "00:00", 0))
    whole = ScheduleRule.from_hhmm("w", "06:00", "06:00", ["tue"], 1.0)
    assert whole.length_min == 24 * 60
    assert whole.active_at(local("wed", "05:59", 0))
    assert not whole.active_at(local("wed", "06:00", 0))


@pytest.mark.parametrize("text", ["7:00", "24:01", "12:60", "ab:cd", "24:00"])
def test_bad_times_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="time"):
        parse_hhmm(text)


def test_bad_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown day"):
        ScheduleRule.from_hhmm("x", "01:00", "02:00", ["funday"], 1.0)
    with pytest.raises(ValueError, match="negative"):
        ScheduleRule.from_hhmm("x", "01:00", "02:00", ["mon"], -1.0)
    with pytest.raises(ValueError, match="days"):
        ScheduleRule("x", 60, 120, frozenset(), 1.0)
