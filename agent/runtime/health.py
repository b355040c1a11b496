"""The gateway's health, for the status doc, `hashflex status` and metrics: CPU, memory, disk, the agent's RSS.

Cheap enough to call every tick (a few /proc reads, no sleeping): CPU percentages are measured since the
previous call, so the first value after start-up covers the time since this module was imported.
A value that cannot be read (a sandbox hiding /proc/meminfo, say) is None, never a made-up zero.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import psutil

from hashflex.contract.status import GatewayDoc

_MIB = 1024 * 1024
_PROCESS = psutil.Process()
psutil.cpu_percent(interval=None)  # prime: the first call only starts the measurement


def existing_ancestor(path: Path) -> Path:
    """The path itself or its nearest existing parent (the state dir may not exist before the first start)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def gateway_health(state_dir: Path, disk_alarm_mb: float) -> GatewayDoc:
    """{cpu_pct, mem_pct, disk_free_mb, rss_mb, low_disk}; low_disk when free space < disk_alarm_mb."""
    out: GatewayDoc = {"cpu_pct": None, "mem_pct": None, "disk_free_mb": None, "rss_mb": None, "low_disk": False}
    with contextlib.suppress(OSError):
        out["cpu_pct"] = round(psutil.cpu_percent(interval=None), 1)
    with contextlib.suppress(OSError):
        out["mem_pct"] = round(psutil.virtual_memory().percent, 1)
    try:
        free_mb = psutil.disk_usage(str(existing_ancestor(state_dir))).free / _MIB
        out["disk_free_mb"] = round(free_mb, 1)
        out["low_disk"] = free_mb < disk_alarm_mb
    except OSError:
        pass
    with contextlib.suppress(OSError, psutil.Error):
        out["rss_mb"] = round(_PROCESS.memory_info().rss / _MIB, 1)
    return out
