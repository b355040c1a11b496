"""The units a request (and a config file) may write powers and durations in: "30s", "2h", "12MW", "850 kW"."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_POWER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(w|kw|mw)?\s*$", re.IGNORECASE)
_POWER_UNITS_KW = {"w": 0.001, "kw": 1.0, "mw": 1000.0}


def parse_duration_s(value: str | float | int) -> float:
    """Seconds from a number (already seconds) or a string like "30s", "5m", "2h", "250ms"."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 5m, 2h)")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    if seconds < 0:
        raise ValueError(f"duration must not be negative: {value!r}")
    return seconds


def parse_power_kw(value: str | float | int, default_unit: str = "kw") -> float:
    """Kilowatts from a number (in `default_unit`) or a string like "12MW", "850 kW", "3000W"."""
    if isinstance(value, bool):
        raise ValueError(f"not a power: {value!r}")
    if isinstance(value, int | float):
        return float(value) * _POWER_UNITS_KW[default_unit.lower()]
    match = _POWER.match(value)
    if not match:
        raise ValueError(f"not a power: {value!r} (use e.g. 12MW, 850kW, 3000W)")
    unit = (match.group(2) or default_unit).lower()
    return float(match.group(1)) * _POWER_UNITS_KW[unit]
