"""Time-of-use windows ("evening peak 18:00–22:00 at 600 kW"), evaluated at a UTC epoch `now` handed in.

A window is given in the site's local wall time (HH:MM) in its time zone (a `tzinfo` handed in, e.g. the
config's IANA zone `Asia/Karachi`: reading the zone database is the caller's I/O, so this stays pure). Tariffs
follow the wall clock, so daylight saving time is applied: 18:00 is 18:00 local in summer and in winter, and on
the day the clocks change a window is as long as the wall clock says. `days` name the local days on which the
window STARTS, so 22:00–06:00 on "fri" covers Friday 22:00 to Saturday 06:00. End "24:00" means midnight; start ==
end is a whole day (24 h of wall clock from start) — an empty window would be a configuration mistake nobody means.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, tzinfo

DAY_NAMES: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_MINUTES_PER_DAY = 24 * 60


def parse_hhmm(text: str, *, allow_24: bool = False) -> int:
    """Minutes after midnight from "HH:MM"; "24:00" only when allow_24."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.isdigit() and len(p) == 2 for p in parts):
        raise ValueError(f"not a HH:MM time: {text!r}")
    hours, minutes = int(parts[0]), int(parts[1])
    total = hours * 60 + minutes
    if minutes > 59 or total > _MINUTES_PER_DAY or (total == _MINUTES_PER_DAY and not allow_24):
        raise ValueError(f"not a valid time of day: {text!r}")
    return total


@dataclass(frozen=True, slots=True)
class ScheduleRule:
    name: str
    start_min: int  # minutes after local midnight, 0..1439
    end_min: int  # 0..1440
    days: frozenset[int]  # 0 = Monday .. 6 = Sunday, local day the window starts on
    target_kw: float
    tz: tzinfo  # the site's zone: start/end/days are its wall clock

    def __post_init__(self) -> None:
        if not 0 <= self.start_min < _MINUTES_PER_DAY or not 0 <= self.end_min <= _MINUTES_PER_DAY:
            raise ValueError(f"window {self.name!r}: start/end out of range")
        if not self.days or not self.days <= frozenset(range(7)):
            raise ValueError(f"window {self.name!r}: days must be a non-empty subset of 0..6")
        if not math.isfinite(self.target_kw) or self.target_kw < 0:
            raise ValueError(f"window {self.name!r}: target_kw must be a finite, non-negative kW")

    @classmethod
    def from_hhmm(  # noqa: PLR0917 -- the config's ScheduleWindow fields in their order, then the site's zone
        cls, name: str, start: str, end: str, days: Iterable[str], target_kw: float, tz: tzinfo
    ) -> ScheduleRule:
        day_set = set()
        for d in days:
            if d not in DAY_NAMES:
                raise ValueError(f"window {name!r}: unknown day {d!r} (use {', '.join(DAY_NAMES)})")
            day_set.add(DAY_NAMES.index(d))
        return cls(
            name=name,
            start_min=parse_hhmm(start),
            end_min=parse_hhmm(end, allow_24=True),
            days=frozenset(day_set),
            target_kw=float(target_kw),
            tz=tz,
        )

    @property
    def length_min(self) -> int:
        length = (self.end_min - self.start_min) % _MINUTES_PER_DAY
        return length or _MINUTES_PER_DAY

    def active_at(self, now: float) -> bool:
        local = datetime.fromtimestamp(now, self.tz)  # the wall clock at the site, DST applied
        weekday = local.weekday()
        minute = local.hour * 60 + local.minute + (local.second + local.microsecond / 1e6) / 60.0
        since_today_start = minute - self.start_min
        if since_today_start >= 0:
            return weekday in self.days and since_today_start < self.length_min
        # before today's start: inside a window that began yesterday and wraps past midnight?
        return (weekday - 1) % 7 in self.days and since_today_start + _MINUTES_PER_DAY < self.length_min
