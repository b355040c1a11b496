"""Turning the agent's documents into what a person reads: units with suffixes, times as "12s ago", tables.

Tables are Rich tables on a terminal and tab-separated lines otherwise (easy to pipe into sort, awk, grep).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from agent.core.units import format_kw

DASH = "—"


def num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def epoch(value: Any) -> float | None:
    """Seconds since the epoch from a number or an ISO string."""
    if (n := num(value)) is not None:
        return n
    if isinstance(value, str) and value:
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    return None


def kw(value: Any) -> str:
    return format_kw(num(value))


def watts(value: Any) -> str:
    n = num(value)
    return DASH if n is None else format_kw(n / 1000)


def hashrate(ths: Any) -> str:
    n = num(ths)
    if n is None:
        return DASH
    for unit, scale in (("EH/s", 1e6), ("PH/s", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.1f} TH/s"


def mib(value: Any) -> str:
    n = num(value)
    if n is None:
        return DASH
    return f"{n / 1024:.1f} GB" if n >= 1024 else f"{n:.0f} MB"


def pct(value: Any) -> str:
    n = num(value)
    return DASH if n is None else f"{n:.0f}%"


def clock(value: Any) -> str:
    """`14:03:07Z` today, `2025-01-02 14:03Z` otherwise (UTC, as the logs and the grid use)."""
    ts = epoch(value)
    if ts is None:
        return DASH
    dt = datetime.fromtimestamp(ts, UTC)
    if dt.date() == datetime.now(UTC).date():
        return dt.strftime("%H:%M:%SZ")
    return dt.strftime("%Y-%m-%d %H:%MZ")


def ago(value: Any, now: float | None = None) -> str:
    ts = epoch(value)
    if ts is None:
        return DASH
    delta = (now if now is not None else time.time()) - ts
    if delta < 0:
        return f"in {duration(-delta)}"
    return f"{duration(delta)} ago"


def duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def count(value: Any) -> str:
    n = num(value)
    return DASH if n is None else f"{int(n):,}".replace(",", " ")


def print_table(
    console: Console, columns: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None,
    right: Sequence[str] = (),
) -> None:  # fmt: skip
    """A Rich table on a terminal; tab-separated values (header first) otherwise."""
    if console.is_terminal:
        table = Table(title=title, header_style="bold", title_justify="left")
        for name in columns:
            table.add_column(name, justify="right" if name in right else "left", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    lines = ["\t".join(columns), *("\t".join(row) for row in rows)]
    console.file.write("\n".join(lines) + "\n")  # not console.print: it would expand the tabs
    console.file.flush()


def print_mapping(console: Console, doc: Mapping[str, Any], indent: str = "") -> None:
    """A reply of unknown shape: one `key  value` line per field, units from the key's suffix."""
    width = max((len(str(k)) for k in doc), default=0)
    for key, value in doc.items():
        label = str(key)
        if isinstance(value, Mapping):
            console.print(f"{indent}{label}", markup=False, highlight=False)
            print_mapping(console, value, indent + "  ")
            continue
        if isinstance(value, list):
            shown = f"{len(value)} item(s)" if value and isinstance(value[0], Mapping) else ", ".join(map(str, value))
        elif label.endswith("_kw"):
            shown = kw(value)
        elif label.endswith("_w"):
            shown = watts(value)
        elif label.endswith("_ths"):
            shown = hashrate(value)
        else:
            shown = DASH if value is None else str(value)
        console.print(f"{indent}{label.ljust(width)}  {shown}", markup=False, highlight=False)
