"""Plain-data forms of what the store keeps: identities, miner control memory, dispatches and their progress.

No SQLite here (agent/io/store/ owns it); these are the JSON shapes, shared with the export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hashflex.agent.core import timefmt
from hashflex.agent.core.model import Dispatch, Source
from hashflex.contract.status import DispatchDoc
from hashflex.drivers.base import Capability, Family, Identity, OnOff, PowerRange, Presets

# a dispatch in one of these statuses (and never closed) may still bind; any other status is closed for good
OPEN_STATUSES = frozenset({"pending", "active"})
PROGRESS_FIELDS = (
    "received_at",
    "accepted_at",
    "commands_sent_at",
    "target_met_at",
    "max_overshoot_kw",
    "closed_at",
    "close_reason",
    "channel",
)
_TEXT_PROGRESS = frozenset({"close_reason", "channel"})


@dataclass(slots=True)
class DispatchRecord:
    """A dispatch with its status and progress: what the controller's dispatch book holds and the store keeps (the
    one record type: the store reads and writes it, agent.runtime.dispatches changes it)."""

    dispatch: Dispatch
    status: str  # pending | active (open); expired | cancelled | failed (closed)
    received_at: float  # this revision's arrival
    channel: str = "mqtt"
    accepted_at: float | None = None  # when its first revision was accepted (a revision keeps it)
    commands_sent_at: float | None = None
    target_met_at: float | None = None
    max_overshoot_kw: float = 0.0
    closed_at: float | None = None
    close_reason: str | None = None

    @property
    def open(self) -> bool:
        """Can it still bind? Only a pending or active one that was never closed."""
        return self.status in OPEN_STATUSES and self.closed_at is None

    def progress(self) -> dict[str, Any]:
        """PROGRESS_FIELDS, as the store writes them."""
        return {
            "received_at": self.received_at,
            "accepted_at": self.accepted_at,
            "channel": self.channel,
            "commands_sent_at": self.commands_sent_at,
            "target_met_at": self.target_met_at,
            "max_overshoot_kw": self.max_overshoot_kw,
            "closed_at": self.closed_at,
            "close_reason": self.close_reason,
        }

    @classmethod
    def from_stored(cls, dispatch: Dispatch, status: str, progress: Mapping[str, Any]) -> DispatchRecord:
        def num(key: str) -> float | None:
            v = progress.get(key)
            return float(v) if isinstance(v, int | float) else None

        return cls(
            dispatch=dispatch,
            status=status,
            received_at=num("received_at") or dispatch.issued_at,
            channel=str(progress.get("channel") or "mqtt"),
            accepted_at=num("accepted_at"),
            commands_sent_at=num("commands_sent_at"),
            target_met_at=num("target_met_at"),
            max_overshoot_kw=num("max_overshoot_kw") or 0.0,
            closed_at=num("closed_at"),
            close_reason=progress.get("close_reason"),
        )

    def moved(self, by_s: float) -> DispatchRecord:
        """This record on a time `by_s` ahead of the one it was stored on (core.timeline): its window and the times
        of its progress move with it; the issue time stays as the sender stamped it."""
        if not by_s:
            return self

        def move(t: float | None) -> float | None:
            return None if t is None else t + by_s

        d = self.dispatch
        return dataclasses.replace(
            self,
            dispatch=dataclasses.replace(d, start=d.start + by_s, end=move(d.end)),
            received_at=self.received_at + by_s,
            accepted_at=move(self.accepted_at),
            commands_sent_at=move(self.commands_sent_at),
            target_met_at=move(self.target_met_at),
            closed_at=move(self.closed_at),
        )

    def to_dict(self) -> dict[str, Any]:
        """The export's form: times as epoch seconds, time to target from acceptance."""
        d = self.dispatch
        out: dict[str, Any] = {
            "id": d.id,
            "rev": d.rev,
            "source": d.source.value,
            "issued_at": d.issued_at,
            "start": d.start,
            "end": d.end,
            "target_kw": d.target_kw,
            "curtail_kw": d.curtail_kw,
            "baseline_kw": d.baseline_kw,
            "ramp_kw_per_min": d.ramp_kw_per_min,
            "status": self.status,
        }
        out.update(self.progress())
        met, start = self.target_met_at, self.accepted_at
        start = start if start is not None else self.received_at
        out["time_to_target_s"] = met - start if met is not None else None
        return out

    def doc(self) -> DispatchDoc:
        """The status document's and the CLI's form: ISO times, time to target from this revision's arrival."""
        d = self.dispatch
        level = None
        if d.target_kw is not None or d.baseline_kw is not None:
            level = round(d.level_kw(), 3)
        return {
            "id": d.id,
            "rev": d.rev,
            "source": d.source.value,
            "target_kw": d.target_kw,
            "curtail_kw": d.curtail_kw,
            "baseline_kw": d.baseline_kw,
            "level_kw": level,
            "ramp_kw_per_min": d.ramp_kw_per_min,
            "issued_at": timefmt.iso_ms(d.issued_at),
            "start": timefmt.iso_ms(d.start),
            "end": timefmt.iso_ms(d.end),
            "status": self.status,
            "received_at": timefmt.iso_ms(self.received_at),
            "accepted_at": timefmt.iso_ms(self.accepted_at),
            "commands_sent_at": timefmt.iso_ms(self.commands_sent_at),
            "target_met_at": timefmt.iso_ms(self.target_met_at),
            "time_to_target_s": (
                round(self.target_met_at - self.received_at, 3) if self.target_met_at is not None else None
            ),
            "max_overshoot_kw": round(self.max_overshoot_kw, 3),
            "closed_at": timefmt.iso_ms(self.closed_at),
            "close_reason": self.close_reason,
        }


def check_progress(fields: dict[str, Any]) -> dict[str, Any]:
    """Validate progress fields by name and type; raises ValueError naming the bad one."""
    unknown = sorted(set(fields) - set(PROGRESS_FIELDS))
    if unknown:
        raise ValueError(f"unknown dispatch progress field(s) {unknown}; known: {list(PROGRESS_FIELDS)}")
    for key, value in fields.items():
        if value is None:
            continue
        if key in _TEXT_PROGRESS:
            if not isinstance(value, str):
                raise ValueError(f"dispatch {key} must be text, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"dispatch {key} must be a number, got {value!r}")
    return {k: (float(v) if isinstance(v, int) and k not in _TEXT_PROGRESS else v) for k, v in fields.items()}


def dispatch_values(d: Dispatch) -> dict[str, Any]:
    if not d.id:
        raise ValueError("a dispatch needs an id")
    if (d.target_kw is None) == (d.curtail_kw is None):
        raise ValueError(f"dispatch {d.id!r}: exactly one of target_kw and curtail_kw must be set")
    return {
        "id": d.id,
        "source": Source(d.source).value,
        "issued_at": d.issued_at,
        "start_ts": d.start,
        "end_ts": d.end,
        "target_kw": d.target_kw,
        "curtail_kw": d.curtail_kw,
        "ramp_kw_per_min": d.ramp_kw_per_min,
        # a retired column (dispatches have no priority since contract 1.0), NOT NULL in every existing database
        "priority": 0,
        "rev": d.rev,
        "baseline_kw": d.baseline_kw,
    }


def dispatch_from_values(v: dict[str, Any]) -> Dispatch:
    return Dispatch(
        id=v["id"],
        source=Source(v["source"]),
        issued_at=v["issued_at"],
        start=v["start_ts"],
        end=v["end_ts"],
        target_kw=v["target_kw"],
        curtail_kw=v["curtail_kw"],
        ramp_kw_per_min=v["ramp_kw_per_min"],
        rev=int(v["rev"]),
        baseline_kw=v["baseline_kw"],
    )


# ---------------------------------------------------------------------------------------------- identity
def capability_to_dict(cap: Capability) -> dict[str, Any]:
    if isinstance(cap, PowerRange):
        return {"type": "range", "min_w": cap.min_w, "max_w": cap.max_w, "step_w": cap.step_w}
    if isinstance(cap, Presets):
        return {"type": "presets", "watts": list(cap.watts)}
    return {"type": "onoff"}


def capability_from_dict(raw: dict[str, Any]) -> Capability:
    kind = raw.get("type")
    if kind == "range":
        return PowerRange(int(raw["min_w"]), int(raw["max_w"]), int(raw.get("step_w", 1)))
    if kind == "presets":
        return Presets(tuple(int(w) for w in raw["watts"]))
    if kind == "onoff":
        return OnOff()
    raise ValueError(f"unknown capability type {kind!r}")


def identity_to_dict(ident: Identity) -> dict[str, Any]:
    return {
        "ip": ident.ip,
        "family": ident.family.value,
        "make": ident.make,
        "model": ident.model,
        "firmware": ident.firmware,
        "driver_class": ident.driver_class,
        "capability": capability_to_dict(ident.capability),
        "nominal_w": ident.nominal_w,
        "nominal_ths": ident.nominal_ths,
        "mac": ident.mac,
        "serial": ident.serial,
        "reports_power": ident.reports_power,
    }


def identity_from_dict(raw: dict[str, Any]) -> Identity:
    return Identity(
        ip=raw["ip"],
        family=Family(raw["family"]),
        make=raw["make"],
        model=raw["model"],
        firmware=raw["firmware"],
        driver_class=raw["driver_class"],
        capability=capability_from_dict(raw["capability"]),
        nominal_w=float(raw["nominal_w"]),
        nominal_ths=float(raw["nominal_ths"]),
        mac=raw.get("mac"),
        serial=raw.get("serial"),
        reports_power=bool(raw.get("reports_power", True)),
    )


# ---------------------------------------------------------------------------------------------- control memory
@dataclass(frozen=True, slots=True)
class MinerControl:
    """What the agent itself did to a miner, so a restart neither wakes everything nor forgets a curtailment."""

    asleep_by_us: bool = False  # the agent put it to sleep
    commanded_w: float | None = None  # the power limit the agent set and the miner accepted
    since: float = 0.0  # when the agent last put it to sleep, woke it or limited it
    limits_unsupported: bool = False  # its firmware refused a power limit: on/off only
    ignores_commands: bool = False  # it acknowledged commands and did not act on them
    overdraws_limit: bool = False  # it took limits and drew above them: on/off until it reads under one again
    woken_to_w: float | None = None  # the limit it was told before its last wake: it comes up at it
    # a wake sent (or about to be: written ahead of the command) and not yet seen through: a restart counts the
    # miner as waking at full power, whatever it reads like (a booting miner draws little and does not hash)
    wake_pending: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "asleep_by_us": self.asleep_by_us,
            "commanded_w": self.commanded_w,
            "since": self.since,
            "limits_unsupported": self.limits_unsupported,
            "ignores_commands": self.ignores_commands,
            "overdraws_limit": self.overdraws_limit,
            "woken_to_w": self.woken_to_w,
            "wake_pending": self.wake_pending,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MinerControl:
        cw, ww = raw.get("commanded_w"), raw.get("woken_to_w")
        return cls(
            asleep_by_us=bool(raw.get("asleep_by_us", False)),
            commanded_w=float(cw) if isinstance(cw, int | float) and not isinstance(cw, bool) else None,
            since=float(raw.get("since", 0.0) or 0.0),
            limits_unsupported=bool(raw.get("limits_unsupported", False)),
            ignores_commands=bool(raw.get("ignores_commands", False)),
            overdraws_limit=bool(raw.get("overdraws_limit", False)),
            woken_to_w=float(ww) if isinstance(ww, int | float) and not isinstance(ww, bool) else None,
            wake_pending=bool(raw.get("wake_pending", False)),
        )
