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

from hashflex.agent.core import timefmt
from hashflex.agent.core.units import format_kw

DASH = "—"


def num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def epoch(value: Any) -> float | None:
    """Seconds since the epoch from a number or an ISO string."""
    n = num(value)
    return n if n is not None else timefmt.epoch(value)


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


def fit_columns(
    console: Console,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    priority: Mapping[str, int],
    *,
    right: Sequence[str] = (),
) -> list[int]:
    """Indices of the columns that fit the console's width, the most important first to stay.

    `priority`: 0 = always shown, higher numbers are dropped first (unlisted columns count as the least important).
    Columns are dropped, never cropped: an IP, a state or a power that is cut short reads as another value."""
    rank = {i: priority.get(name, max(priority.values(), default=0) + 1) for i, name in enumerate(columns)}
    keep = list(range(len(columns)))
    while len(keep) > 1:
        width = natural_width(
            console, _table([columns[i] for i in keep], [[row[i] for i in keep] for row in rows], right=right)
        )
        droppable = [i for i in keep if rank[i] > 0]
        if width <= console.width or not droppable:
            break
        keep.remove(max(droppable, key=lambda i: (rank[i], i)))
    return keep


def natural_width(console: Console, renderable: Any) -> int:
    """The width `renderable` takes when nothing limits it (console.measure alone stops at the console's width)."""
    return console.measure(renderable, options=console.options.update_width(PIPE_WIDTH)).maximum


def _table(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    right: Sequence[str] = (),
    caption: str | None = None,
) -> Table:
    table = Table(title=title, caption=caption, header_style="bold", title_justify="left", caption_justify="left")
    for name in columns:
        table.add_column(name, justify="right" if name in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def fitted_table(
    console: Console,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    right: Sequence[str] = (),
    priority: Mapping[str, int] | None = None,
    wide: bool = False,
) -> Table:
    """The Rich table for `console`'s width: the columns that fit by `priority`, the others named in its caption."""
    keep = list(range(len(columns)))
    if priority is not None and not wide:
        keep = fit_columns(console, columns, rows, priority, right=right)
    hidden = [columns[i] for i in range(len(columns)) if i not in keep]
    caption = f"not shown at this width: {', '.join(hidden)} (--wide shows them)" if hidden else None
    return _table(
        [columns[i] for i in keep], [[row[i] for i in keep] for row in rows], title=title, right=right, caption=caption
    )


def print_table(
    console: Console,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    right: Sequence[str] = (),
    priority: Mapping[str, int] | None = None,
    wide: bool = False,
) -> None:
    """A Rich table on a terminal; tab-separated values (header first, every column) otherwise.

    On a terminal narrower than the table, the least important columns (by `priority`) are left out and named
    under the table; `wide` shows them all (the terminal may then wrap the lines)."""
    if console.is_terminal:
        table = fitted_table(console, columns, rows, title=title, right=right, priority=priority, wide=wide)
        if wide:  # as wide as the table is: the terminal wraps the lines, nothing is cut short
            width = max(console.width, natural_width(console, table))
            console = Console(file=console.file, width=width, force_terminal=True, no_color=console.no_color)
        console.print(table, crop=False)
        return
    lines = ["\t".join(columns), *("\t".join(row) for row in rows)]
    console.file.write("\n".join(lines) + "\n")  # not console.print: it would expand the tabs
    console.file.flush()


class SoftConsole(Console):
    """Rich's console, except that where it is not a terminal (a pipe, a file) a printed line is never wrapped:
    scripts and grep read whole lines, and a phrase broken at column 80 defeats both."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if not self.is_terminal:
            kwargs.setdefault("soft_wrap", True)
        super().print(*objects, **kwargs)


class _PipeConsole(Console):
    """A console as wide as any line needs, for output that is not a terminal; the padding Rich gives a table's
    cells is taken off the end of each line."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        with self.capture() as captured:
            super().print(*objects, **kwargs)
        self.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
        self.file.flush()


def unwrapped(console: Console) -> Console:
    """`console` on a terminal; otherwise one that never wraps: a view of grids and tables (`status`) is laid out
    as wide as its longest line, never broken mid-phrase at 80 columns."""
    if console.is_terminal:
        return console
    return _PipeConsole(file=console.file, width=PIPE_WIDTH, no_color=True, highlight=False)


PIPE_WIDTH = 1000  # wider than any line hashflex prints


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
