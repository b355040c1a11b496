"""The names a site and the programs that read it share: what a miner is doing and who set the site's target.

The status document counts miners by `MinerState` (`miners.<state>`), the `miners` verb filters by it, the metrics
label by it; `target_source` in the status document is a `Source`. Both are string enums: the value is the wire form.
"""

from __future__ import annotations

from enum import StrEnum


class Source(StrEnum):
    """Who asked for a limit. Order matters only for reporting; the lowest target always wins."""

    CAP = "cap"  # the licensed site cap (config, or lowered at run time)
    GRID = "grid"  # a signed grid-operator dispatch
    OPERATOR = "operator"  # an override from the local CLI or operator MQTT
    SCHEDULE = "schedule"  # a time-of-use window from config
    FAILSAFE = "failsafe"  # the grid link is lost or was never heard
    FREQUENCY = "frequency"  # under-frequency response holds a stage's shed (agent.core.frequency)


class MinerState(StrEnum):
    HASHING = "hashing"  # running at full (nominal or highest preset) power
    THROTTLED = "throttled"  # running under a power limit below nominal
    SLEEPING = "sleeping"
    WAKING = "waking"  # woken, ramping to power: counted at full power
    UNREACHABLE = "unreachable"  # no fresh reading: counted at worst case


MINER_STATES: tuple[str, ...] = tuple(s.value for s in MinerState)
TARGET_SOURCES: tuple[str, ...] = tuple(s.value for s in Source)
