"""The flexibility document: what a site can do for the grid right now, retained on `<root>/<site>/flex` (schema
`FLEX_SCHEMA`) for the program coordinator.

`Flexibility` is the value (the agent computes it: agent.core.flexibility), `Flexibility.to_dict()` the document
(`FlexDoc`), `parse_flex()` reads one back, checked (the coordinator uses it: one wire contract, not a copy). Every
power is site-level W (what the meter reads when there is one, else the miners' sum); times are epoch seconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, TypedDict


class ReachDoc(TypedDict):
    within_s: float
    floor_w: float


class RampDoc(TypedDict):
    up_w_per_s: float | None
    down_w_per_s: float | None
    wake_max_per_interval: int
    wake_interval_s: float
    min_on_s: float
    min_off_s: float


class LossDoc(TypedDict):
    depth: float
    shed_w: float
    lost_ths: float
    ths_per_mw: float


class HashrateDoc(TypedDict):
    ths_at_cap: float
    ths_now: float
    loss: list[LossDoc]


class FlexFailsafeDoc(TypedDict):
    active: bool
    reason: str
    level_w: float | None


class ReadingsDoc(TypedDict):
    at: float | None
    age_s: float | None
    stale: bool


class MinerCountsDoc(TypedDict):
    total: int
    unreachable: int


class FlexDoc(TypedDict):
    """`Flexibility.to_dict()`: the retained document."""

    schema: str
    site: str
    at: float
    present_w: float
    metered: bool
    reach: list[ReachDoc]
    most_w: float
    cap_w: float
    fleet_max_w: float
    target_w: float
    ramp: RampDoc
    hashrate: HashrateDoc
    failsafe: FlexFailsafeDoc
    readings: ReadingsDoc
    miners: MinerCountsDoc


FLEX_SCHEMA = "hashflex.flex/1"


def finite(value: object, name: str, *, minimum: float | None = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be ≥ {minimum:g}, got {value!r}")
    return number


def optional_finite(value: object, name: str) -> float | None:
    return None if value is None else finite(value, name)


@dataclass(frozen=True, slots=True)
class Reach:
    """Within `within_s` seconds the site can be down to `floor_w` (worst-case accounting)."""

    within_s: float
    floor_w: float


@dataclass(frozen=True, slots=True)
class LossPoint:
    """`shed_w` below the cap loses `lost_ths` TH/s against the hashrate at the cap."""

    depth: float  # share of the cap shed (0–1)
    shed_w: float
    lost_ths: float

    @property
    def ths_per_mw(self) -> float:
        return self.lost_ths / (self.shed_w / 1e6) if self.shed_w > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Flexibility:
    site_id: str
    at: float  # epoch seconds this was computed
    present_w: float
    metered: bool  # present_w is the site meter's reading (else the miners' sum)
    reach: tuple[Reach, ...]  # ascending within_s; floors non-increasing
    most_w: float  # the most it may draw (cap, healthy fleet); ≥ present_w
    cap_w: float  # the effective cap in force
    fleet_max_w: float  # the healthy fleet at full power plus the non-miner load
    target_w: float  # the target in force (the lowest binding input)
    ramp_up_w_per_s: float | None  # configured limit on rises (None: none)
    ramp_down_w_per_s: float | None  # decreases are immediate (None) unless a dispatch asks for a ramp
    wake_max_per_interval: int
    wake_interval_s: float
    min_on_s: float
    min_off_s: float
    ths_at_cap: float  # the planner's expected hashrate at the cap (steady state)
    ths_now: float  # the planner's expected hashrate at the present target
    loss: tuple[LossPoint, ...]  # ascending depth; lost_ths non-decreasing
    failsafe_active: bool
    failsafe_reason: str
    failsafe_level_w: float | None
    readings_at: float | None  # when the readings this is built from were taken (None: none yet)
    readings_age_s: float | None
    stale: bool  # readings older than the stale limit (or none): count this site at its worst case
    miners: int
    unreachable: int

    def floor_within(self, seconds: float) -> float:
        """The least reachable within `seconds` (the present power when no published reach is that quick)."""
        return min([self.present_w, *(r.floor_w for r in self.reach if r.within_s <= seconds)])

    def to_dict(self) -> FlexDoc:
        """The retained document on `hashflex/<site_id>/flex` (times as epoch seconds, powers in W)."""
        return {
            "schema": FLEX_SCHEMA,
            "site": self.site_id,
            "at": self.at,
            "present_w": self.present_w,
            "metered": self.metered,
            "reach": [{"within_s": r.within_s, "floor_w": r.floor_w} for r in self.reach],
            "most_w": self.most_w,
            "cap_w": self.cap_w,
            "fleet_max_w": self.fleet_max_w,
            "target_w": self.target_w,
            "ramp": {
                "up_w_per_s": self.ramp_up_w_per_s,
                "down_w_per_s": self.ramp_down_w_per_s,
                "wake_max_per_interval": self.wake_max_per_interval,
                "wake_interval_s": self.wake_interval_s,
                "min_on_s": self.min_on_s,
                "min_off_s": self.min_off_s,
            },
            "hashrate": {
                "ths_at_cap": self.ths_at_cap,
                "ths_now": self.ths_now,
                "loss": [
                    {"depth": p.depth, "shed_w": p.shed_w, "lost_ths": p.lost_ths, "ths_per_mw": p.ths_per_mw}
                    for p in self.loss
                ],
            },
            "failsafe": {
                "active": self.failsafe_active,
                "reason": self.failsafe_reason,
                "level_w": self.failsafe_level_w,
            },
            "readings": {"at": self.readings_at, "age_s": self.readings_age_s, "stale": self.stale},
            "miners": {"total": self.miners, "unreachable": self.unreachable},
        }


def parse_flex(doc: Mapping[str, Any]) -> Flexibility:
    """A `Flexibility` from its document (`to_dict`), checked: the schema, every number finite, the reach floors
    non-increasing and the loss curve non-decreasing. Raises ValueError naming the field."""
    if not isinstance(doc, Mapping):
        raise ValueError("the flex document must be a JSON object")
    if doc.get("schema") != FLEX_SCHEMA:
        raise ValueError(f"schema must be {FLEX_SCHEMA!r}, got {doc.get('schema')!r}")

    def obj(value: object, name: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise ValueError(f"{name} must be an object")
        return value

    def flag(value: object, name: str) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false")
        return value

    def items(value: object, name: str) -> list[Mapping[str, Any]]:
        if not isinstance(value, list) or len(value) > 32:
            raise ValueError(f"{name} must be a list of at most 32 objects")
        return [obj(x, f"{name}[{i}]") for i, x in enumerate(value)]

    site = doc.get("site")
    if not isinstance(site, str) or not site or len(site) > 128:
        raise ValueError("site must be the site id")
    ramp, rate = obj(doc.get("ramp"), "ramp"), obj(doc.get("hashrate"), "hashrate")
    fs, readings = obj(doc.get("failsafe"), "failsafe"), obj(doc.get("readings"), "readings")
    miners = obj(doc.get("miners"), "miners")
    reach = tuple(
        Reach(finite(r.get("within_s"), f"reach[{i}].within_s"), finite(r.get("floor_w"), f"reach[{i}].floor_w"))
        for i, r in enumerate(items(doc.get("reach"), "reach"))
    )
    for r0, r1 in pairwise(reach):
        if r1.within_s <= r0.within_s or r1.floor_w > r0.floor_w:
            raise ValueError("reach must be in rising within_s with non-increasing floor_w")
    loss = tuple(
        LossPoint(
            finite(p.get("depth"), f"loss[{i}].depth"),
            finite(p.get("shed_w"), f"loss[{i}].shed_w"),
            finite(p.get("lost_ths"), f"loss[{i}].lost_ths"),
        )
        for i, p in enumerate(items(rate.get("loss"), "hashrate.loss"))
    )
    for p0, p1 in pairwise(loss):
        if p1.shed_w <= p0.shed_w or p1.lost_ths < p0.lost_ths:
            raise ValueError("hashrate.loss must be in rising shed_w with non-decreasing lost_ths")
    present = finite(doc.get("present_w"), "present_w")
    most = finite(doc.get("most_w"), "most_w")
    if most < present:
        raise ValueError("most_w must not be below present_w")
    wake_n = ramp.get("wake_max_per_interval")
    if isinstance(wake_n, bool) or not isinstance(wake_n, int) or wake_n < 1:
        raise ValueError("ramp.wake_max_per_interval must be an integer ≥ 1")
    counts = [miners.get("total"), miners.get("unreachable")]
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise ValueError("miners.total and miners.unreachable must be integers ≥ 0")
    reason = fs.get("reason")
    if not isinstance(reason, str):
        raise ValueError("failsafe.reason must be a string")
    read_at = readings.get("at")
    age = readings.get("age_s")
    return Flexibility(
        site_id=site,
        at=finite(doc.get("at"), "at", minimum=None),
        present_w=present,
        metered=flag(doc.get("metered"), "metered"),
        reach=reach,
        most_w=most,
        cap_w=finite(doc.get("cap_w"), "cap_w"),
        fleet_max_w=finite(doc.get("fleet_max_w"), "fleet_max_w"),
        target_w=finite(doc.get("target_w"), "target_w"),
        ramp_up_w_per_s=optional_finite(ramp.get("up_w_per_s"), "ramp.up_w_per_s"),
        ramp_down_w_per_s=optional_finite(ramp.get("down_w_per_s"), "ramp.down_w_per_s"),
        wake_max_per_interval=wake_n,
        wake_interval_s=finite(ramp.get("wake_interval_s"), "ramp.wake_interval_s"),
        min_on_s=finite(ramp.get("min_on_s"), "ramp.min_on_s"),
        min_off_s=finite(ramp.get("min_off_s"), "ramp.min_off_s"),
        ths_at_cap=finite(rate.get("ths_at_cap"), "hashrate.ths_at_cap"),
        ths_now=finite(rate.get("ths_now"), "hashrate.ths_now"),
        loss=loss,
        failsafe_active=flag(fs.get("active"), "failsafe.active"),
        failsafe_reason=reason[:64],
        failsafe_level_w=optional_finite(fs.get("level_w"), "failsafe.level_w"),
        readings_at=None if read_at is None else finite(read_at, "readings.at", minimum=None),
        readings_age_s=optional_finite(age, "readings.age_s"),
        stale=flag(readings.get("stale"), "readings.stale"),
        miners=counts[0],  # type: ignore[arg-type]  # checked to be int above
        unreachable=counts[1],  # type: ignore[arg-type]
    )
