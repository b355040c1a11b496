"""Time-of-use windows: local wall time in the site's zone (DST applied), days, wrapping midnight."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from hashflex.agent.core.schedule import ScheduleRule, parse_hhmm


def local(day: str, hhmm: str, offset_h: float) -> float:
    """Epoch seconds of local time `hhmm` on the given weekday of the week of Monday 2024-01-01."""
    days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    h, m = (int(x) for x in hhmm.split(":"))
    when = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(days=days.index(day), hours=h, minutes=m)
    return (when - timedelta(hours=offset_h)).timestamp()


KARACHI = ZoneInfo("Asia/Karachi")  # UTC+5, no DST
PEAK = ScheduleRule.from_hhmm("peak", "18:00", "22:00", ["mon", "tue", "wed", "thu", "fri"], 600.0, KARACHI)
NIGHT = ScheduleRule.from_hhmm("night", "22:00", "06:00", ["fri"], 300.0, KARACHI)


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


def test_schedule_uses_the_site_zone() -> None:
    utc_18 = local("mon", "18:00", 0.0)  # 18:00 UTC is 23:00 in Pakistan: outside the window there
    assert not PEAK.active_at(utc_18)
    assert ScheduleRule.from_hhmm("peak", "18:00", "22:00", ["mon"], 1.0, UTC).active_at(utc_18)
    st_johns = ZoneInfo("America/St_Johns")  # UTC-3:30 in January
    assert ScheduleRule.from_hhmm("p", "18:00", "22:00", ["mon"], 1.0, st_johns).active_at(local("mon", "19:00", -3.5))


def _wall(zone: str, when: str) -> float:
    """Epoch seconds of a local wall-clock time `YYYY-MM-DD HH:MM` in `zone`."""
    return datetime.fromisoformat(when).replace(tzinfo=ZoneInfo(zone)).timestamp()


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York", "Australia/Sydney"])
@pytest.mark.parametrize("date", ["2024-01-15", "2024-07-15"])  # Mondays, one on each side of DST
def test_windows_follow_the_wall_clock_across_daylight_saving_time(zone: str, date: str) -> None:
    peak = ScheduleRule.from_hhmm("peak", "18:00", "22:00", ["mon"], 1.0, ZoneInfo(zone))
    assert not peak.active_at(_wall(zone, f"{date} 17:59"))
    assert peak.active_at(_wall(zone, f"{date} 18:00"))
    assert peak.active_at(_wall(zone, f"{date} 21:59"))
    assert not peak.active_at(_wall(zone, f"{date} 22:00"))


def test_a_fixed_offset_would_be_an_hour_off_in_summer() -> None:
    """The retired `utc_offset_h: 1` for Berlin was right in January and an hour late in July; the zone is right."""
    berlin = ScheduleRule.from_hhmm("peak", "18:00", "22:00", ["mon"], 1.0, ZoneInfo("Europe/Berlin"))
    assert berlin.active_at(datetime(2024, 7, 15, 16, 0, tzinfo=UTC).timestamp())  # 18:00 CEST (17:00 at UTC+1)
    assert not berlin.active_at(datetime(2024, 7, 15, 20, 30, tzinfo=UTC).timestamp())  # 22:30 CEST (21:30)


def test_the_day_the_clocks_change_the_window_is_as_long_as_the_wall_clock_says() -> None:
    berlin = ZoneInfo("Europe/Berlin")  # 2024-03-31 02:00 → 03:00 (spring), 2024-10-27 03:00 → 02:00 (autumn)
    night = ScheduleRule.from_hhmm("night", "01:00", "04:00", ["sun"], 1.0, berlin)
    spring_start = _wall("Europe/Berlin", "2024-03-31 01:00")
    assert night.active_at(spring_start)
    assert night.active_at(spring_start + 2 * 3600 - 1)  # 03:59:59 CEST
    assert not night.active_at(spring_start + 2 * 3600)  # 04:00 CEST: two real hours on this day
    autumn_start = _wall("Europe/Berlin", "2024-10-27 01:00")
    assert night.active_at(autumn_start + 4 * 3600 - 1)  # 03:59:59 CET
    assert not night.active_at(autumn_start + 4 * 3600)  # 04:00 CET: four real hours on this day


def test_end_24_00_is_midnight_and_equal_start_end_is_a_whole_day() -> None:
    evening = ScheduleRule.from_hhmm("e", "20:00", "24:00", ["sun"], 1.0, UTC)
    assert evening.active_at(local("sun", "23:59", 0))
    assert not evening.active_at(local("mon", "00:00", 0))
    whole = ScheduleRule.from_hhmm("w", "06:00", "06:00", ["tue"], 1.0, UTC)
    assert whole.length_min == 24 * 60
    assert whole.active_at(local("wed", "05:59", 0))
    assert not whole.active_at(local("wed", "06:00", 0))


@pytest.mark.parametrize("text", ["7:00", "24:01", "12:60", "ab:cd", "24:00"])
def test_bad_times_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="time"):
        parse_hhmm(text)


def test_bad_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown day"):
        ScheduleRule.from_hhmm("x", "01:00", "02:00", ["funday"], 1.0, UTC)
    with pytest.raises(ValueError, match="non-negative"):
        ScheduleRule.from_hhmm("x", "01:00", "02:00", ["mon"], -1.0, UTC)
    with pytest.raises(ValueError, match="finite"):
        ScheduleRule.from_hhmm("x", "01:00", "02:00", ["mon"], float("nan"), UTC)
    with pytest.raises(ValueError, match="days"):
        ScheduleRule("x", 60, 120, frozenset(), 1.0, UTC)
