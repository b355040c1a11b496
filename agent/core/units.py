"""Formatting of powers and the joining of unit words on a command line. The parsers of "30s", "2h", "12MW",
"850 kW" are the wire contract's (hashflex.contract.units): a request and a config file read units the same way."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")
_UNIT_WORD = re.compile(r"^(?:w|kw|mw|ms|s|m|min|h|d)$", re.IGNORECASE)


def join_unit_words(args: list[str]) -> list[str]:
    """Command-line words with a number and the unit after it joined: `--to 12 MW` reads as `--to "12 MW"`.

    The shell splits "12 MW" in two; the unit alone would then be an unexpected argument. No hashflex argument is
    ever a bare unit, so the join cannot take one away (`--to=12 MW` joins too)."""
    out: list[str] = []
    for word in args:
        if out and _UNIT_WORD.match(word) and _NUMBER.match(out[-1].rpartition("=")[2]):
            out[-1] = f"{out[-1]} {word}"
        else:
            out.append(word)
    return out


def format_kw(kw: float | None) -> str:
    """`41.20 MW`, `3.45 kW`, `—` for unknown."""
    if kw is None:
        return "—"
    if abs(kw) >= 1000:
        return f"{kw / 1000:.2f} MW"
    if abs(kw) >= 1:
        return f"{kw:.2f} kW"
    return f"{kw * 1000:.0f} W"
