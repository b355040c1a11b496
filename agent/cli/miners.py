"""`hashflex miners`: every miner with what it is and what it does, sortable and filterable.

Rows come from the agent (verb `miners`): {ip, model, firmware, state, power_w, limit_w, hashrate_ths,
efficiency_j_th?, temp_c, last_seen}. Filtering and sorting happen here too, so they behave the same whatever
the agent supports; --state is also sent to the agent to keep the reply small on a large site.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console

from hashflex.agent.cli import render as r
from hashflex.agent.cli.agentclient import call
from hashflex.agent.cli.common import DEFAULT_CONFIG, ConfigOpt, JsonOpt, WideOpt, emit_json, fail
from hashflex.agent.core.addresses import expand, validate_spec
from hashflex.contract.vocabulary import MinerState


class SortKey(StrEnum):
    ip = "ip"
    model = "model"
    firmware = "firmware"
    state = "state"
    power = "power"
    limit = "limit"
    hashrate = "hashrate"
    efficiency = "efficiency"
    temp = "temp"
    last_seen = "last-seen"


def _first(row: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    return None


def efficiency(row: Mapping[str, Any]) -> float | None:
    """J/TH: as reported, else power over hashrate (unknown when either is)."""
    given = r.num(row.get("efficiency_j_th"))
    if given is not None:
        return given
    power, ths = r.num(row.get("power_w")), r.num(row.get("hashrate_ths"))
    if power is None or not ths:
        return None
    return power / ths


def _ip_key(row: Mapping[str, Any]) -> tuple[int, int | str]:
    try:
        return (0, int(ipaddress.ip_address(str(row.get("ip")))))
    except ValueError:
        return (1, str(row.get("ip")))


SORT_VALUE: dict[SortKey, Callable[[Mapping[str, Any]], Any]] = {
    SortKey.ip: _ip_key,
    SortKey.model: lambda row: str(row.get("model") or ""),
    SortKey.firmware: lambda row: str(row.get("firmware") or ""),
    SortKey.state: lambda row: str(row.get("state") or ""),
    SortKey.power: lambda row: r.num(row.get("power_w")),
    SortKey.limit: lambda row: r.num(_first(row, "limit_w", "power_limit_w")),
    SortKey.hashrate: lambda row: r.num(row.get("hashrate_ths")),
    SortKey.efficiency: efficiency,
    SortKey.temp: lambda row: r.num(_first(row, "temp_c", "temperature_c")),
    SortKey.last_seen: lambda row: r.epoch(row.get("last_seen")),
}
COLUMNS = ("ip", "model", "firmware", "state", "power", "limit", "hashrate", "J/TH", "temp", "last seen")
RIGHT = ("power", "limit", "hashrate", "J/TH", "temp")
# which columns stay on a narrow terminal: IP, state and power always, then the rest in this order (--wide: all)
PRIORITY = {
    "ip": 0,
    "state": 0,
    "power": 0,
    "limit": 1,
    "hashrate": 2,
    "model": 3,
    "temp": 4,
    "last seen": 5,
    "J/TH": 6,
    "firmware": 7,
}


def sort_rows(rows: list[dict[str, Any]], key: SortKey, desc: bool) -> list[dict[str, Any]]:
    """Sorted by `key`; rows without a value go last either way (unknown is not zero)."""
    value = SORT_VALUE[key]
    known = [row for row in rows if value(row) is not None]
    unknown = [row for row in rows if value(row) is None]
    known.sort(key=lambda row: (value(row), _ip_key(row)), reverse=desc)
    return known + sorted(unknown, key=_ip_key)


def filter_rows(
    rows: list[dict[str, Any]], state: MinerState | None, model: str | None, ips: set[str] | None
) -> list[dict[str, Any]]:
    out = rows
    if state is not None:
        out = [row for row in out if row.get("state") == state.value]
    if model:
        needle = model.lower()
        out = [row for row in out if needle in str(row.get("model") or "").lower()]
    if ips is not None:
        out = [row for row in out if str(row.get("ip")) in ips]
    return out


def row_cells(row: Mapping[str, Any]) -> list[str]:
    eff, temp = efficiency(row), r.num(_first(row, "temp_c", "temperature_c"))
    return [
        str(row.get("ip") or r.DASH),
        str(row.get("model") or r.DASH),
        str(row.get("firmware") or r.DASH),
        str(row.get("state") or r.DASH),
        r.watts(row.get("power_w")),
        r.watts(_first(row, "limit_w", "power_limit_w")),
        r.hashrate(row.get("hashrate_ths")),
        r.DASH if eff is None else f"{eff:.1f}",
        r.DASH if temp is None else f"{temp:.0f}°C",
        r.ago(row.get("last_seen")),
    ]


def miners(
    *,
    config: ConfigOpt = DEFAULT_CONFIG,
    as_json: JsonOpt = False,
    state: Annotated[MinerState | None, typer.Option("--state", "-s", help="Only miners in this state.")] = None,
    sort: Annotated[SortKey, typer.Option("--sort", help="Column to sort by.")] = SortKey.ip,
    desc: Annotated[bool, typer.Option("--desc", help="Largest first.")] = False,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Show at most this many rows.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Only models containing this text.")] = None,
    ip: Annotated[str | None, typer.Option("--ip", help="Only these addresses: an IP, a range a-b or a CIDR.")] = None,
    wide: WideOpt = False,
) -> None:
    """Miners: IP, model, firmware, state, power, limit, hashrate, J/TH, temperature, last seen."""
    ips: set[str] | None = None
    if ip is not None:
        try:
            ips = set(expand([validate_spec(ip)]))
        except ValueError as exc:
            fail(f"--ip: {exc}", as_json=as_json)
    payload: dict[str, Any] = {"state": state.value} if state is not None else {}
    data = call(config, "miners", payload, as_json=as_json, timeout=30.0)
    rows = [dict(row) for row in data.get("miners") or [] if isinstance(row, Mapping)]
    rows = sort_rows(filter_rows(rows, state, model, ips), sort, desc)
    shown = rows[:limit] if limit else rows
    if as_json:
        emit_json({"miners": shown, "total": len(rows)})
        return
    console = Console()
    r.print_table(
        console,
        COLUMNS,
        [row_cells(row) for row in shown],
        right=RIGHT,
        priority=PRIORITY,
        wide=wide,
        title=f"{len(shown)} of {len(rows)} miners" if limit and len(rows) > limit else None,
    )


def register(app: typer.Typer) -> None:
    app.command("miners")(miners)
