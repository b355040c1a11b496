"""Site configuration: YAML validated by pydantic. Unknown keys are errors; every error names file, field, value.

Durations accept "30s", "5m", "2h"; powers are in the unit their name says (`cap_kw`). Secrets (miner
passwords, MQTT password) live in a separate file or a systemd credential, never in the main file.

Nothing in the file can defeat the caps: no number anywhere may be infinite or NaN (`_Model`, for every float
field, unions included), powers are at most `MAX_POWER_KW` and durations at most `MAX_DURATION_S`, an address
list names at most `MAX_ADDRESSES_TOTAL` addresses, circuits follow the rules of `agent.core.circuits` (the same
code the runtime uses), and time-of-use windows are in the site's IANA zone (`site.timezone`).
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import re
from datetime import UTC, tzinfo
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from hashflex.agent.core.addresses import MAX_ADDRESSES_TOTAL, size, validate_spec, validate_specs
from hashflex.agent.core.circuits import Circuit, CircuitTree, check_membership
from hashflex.contract.units import parse_duration_s
from hashflex.drivers.base import Family
from hashflex.drivers.meter_maps import FLOAT_METERS, INT_METERS, PRESETS, MeterMap

DEFAULT_CONFIG_PATH = Path("/etc/hashflex/site.yaml")

# The largest power any field may hold (1,000 MW): far above any mining site, so a bigger number is a typo (W
# typed for kW) or an attempt to switch the cap off, never a site.
MAX_POWER_KW = 1_000_000.0
# The longest duration any field may hold (a week): a timer longer than that is a timer that never fires.
MAX_DURATION_S = 7 * 86400.0
# Without a grid heartbeat for this long the link is down, whatever the file says (the fail-safe must act).
MAX_HEARTBEAT_TIMEOUT_S = 3600.0
# control.tolerance_kw at most this share of the site cap: meter noise, not a licence to run over the cap.
MAX_TOLERANCE_SHARE = 0.10
# All address lists of a file together (fleet, exclusions, circuits, groups name the same miners again).
MAX_ADDRESSES_CONFIG = 4 * MAX_ADDRESSES_TOTAL

Seconds = Annotated[float, BeforeValidator(parse_duration_s), Field(le=MAX_DURATION_S)]
PowerKw = Annotated[float, Field(le=MAX_POWER_KW)]  # each field states its own lower bound
AddressSpec = Annotated[str, BeforeValidator(lambda v: validate_spec(str(v)))]
AddressList = Annotated[list[AddressSpec], AfterValidator(validate_specs)]


def _non_finite(value: Any) -> float | None:
    """The first infinite or NaN float in a plain value (lists, dicts), else None. Models check themselves."""
    if isinstance(value, float):
        return None if math.isfinite(value) else value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else ()
    for item in items:
        found = _non_finite(item)
        if found is not None:
            return found
    return None


class _Model(BaseModel):
    # allow_inf_nan=False: every float field of every section, inside unions too, refuses inf and nan (".inf",
    # ".nan", "1e400" in YAML) at validation; the after-check below is the net for a value a custom validator made
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _all_finite(self) -> Any:
        for name in type(self).model_fields:
            bad = _non_finite(getattr(self, name))
            if bad is not None:
                raise ValueError(f"{name} = {bad!r}: Input should be a finite number")
        return self


class CoolingConfig(_Model):
    """Cooling that follows a circuit's miners (agent.core.facility): a fan or pump drive (speed reference in a
    holding register) or a relay (a coil), over Modbus TCP. Stepped down `down_after_s` after its miners sleep;
    a wake on the circuit waits until it has been running for `up_lead_s`."""

    kind: Literal["drive", "relay"] = Field(description="drive: a speed reference; relay: on/off.")
    host: str = Field(min_length=1, description="The drive's (or its Modbus gateway's) address.")
    port: int = Field(502, ge=1, le=65535)
    unit: int = Field(1, ge=0, le=255, description="Modbus unit (device) id.")
    setpoint_register: int = Field(ge=0, le=65535, description="drive: speed reference holding register; relay: coil.")
    full_scale: int = Field(10000, ge=1, le=65535, description="drive: the reference's value at 100 % speed.")
    speed_register: int | None = Field(None, ge=0, le=65535, description="drive: input register, actual speed.")
    power_register: int | None = Field(
        None, ge=0, le=65534, description="Input registers (uint32, high word first): the load's power in W."
    )
    full_kw: PowerKw = Field(gt=0, description="The load's power at full speed (or on), in kW.")
    min_pct: float | None = Field(None, ge=0, le=100, description="drive: lowest speed while any miner runs.")
    idle_pct: float = Field(0.0, ge=0, le=100, description="drive: speed with every miner asleep.")
    curve: list[tuple[float, float]] | None = Field(
        None,
        description="drive: [share of the circuit's miners on %, speed %] points, ascending; default from "
        "min_pct at none to 100 at all.",
    )
    down_after_s: Seconds = Field(300.0, ge=0, description="Step down only after the miners slept this long.")
    up_lead_s: Seconds = Field(60.0, ge=0, description="Cooling runs this long before a miner wakes.")
    timeout_s: Seconds = Field(1.0, gt=0, le=30, description="Modbus connect and reply timeout.")

    @model_validator(mode="after")
    def _consistent(self) -> CoolingConfig:
        if self.kind == "relay":
            for name in ("min_pct", "curve", "speed_register"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} = {getattr(self, name)!r}: a relay is on or off; remove {name}")
            if self.idle_pct != 0.0:
                raise ValueError(f"idle_pct = {self.idle_pct!r}: a relay is off with every miner asleep")
            return self
        if self.min_pct is not None and self.idle_pct > self.min_pct:
            raise ValueError(f"idle_pct = {self.idle_pct!r}: above min_pct ({self.min_pct})")
        if self.curve is not None:
            if not self.curve:
                raise ValueError("curve = []: give at least one [share %, speed %] point, or leave it out")
            for share, speed in self.curve:
                if not (0 <= share <= 100 and 0 <= speed <= 100):
                    raise ValueError(f"curve point {[share, speed]!r}: share and speed are in 0..100 (%)")
            shares = [p[0] for p in self.curve]
            speeds = [p[1] for p in self.curve]
            if shares != sorted(set(shares)):
                raise ValueError(f"curve shares {shares!r}: must be strictly ascending")
            if speeds != sorted(speeds):
                raise ValueError(f"curve speeds {speeds!r}: must not fall as more miners run")
        return self

    @property
    def minimum_pct(self) -> float:
        return 100.0 if self.kind == "relay" else (30.0 if self.min_pct is None else self.min_pct)

    def curve_shares(self) -> tuple[tuple[float, float], ...]:
        """The curve as (share 0..1, speed %); a relay's is full speed for any miner."""
        if self.kind == "relay":
            return ((0.0, 100.0),)
        points = self.curve if self.curve is not None else [(0.0, self.minimum_pct), (100.0, 100.0)]
        return tuple((share / 100.0, speed) for share, speed in points)


class CircuitConfig(_Model):
    id: str = Field(title="Circuit id", description="Unique name of a transformer, container or PDU.")
    parent: str | None = Field(None, description="Parent circuit id; None hangs it directly under the site.")
    cap_kw: PowerKw = Field(gt=0, description="Most this circuit may draw, in kW.")
    miners: AddressList = Field(
        default_factory=list,
        description="Miners fed by this circuit. A miner may also be listed by an ancestor, never by a sibling.",
    )
    cooling: CoolingConfig | None = Field(
        None, description="Cooling that follows this circuit's miners (its own and its sub-circuits')."
    )


_SITE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


METER_MAPS: tuple[str, ...] = ("sunspec", *PRESETS)


class SiteMeterConfig(_Model):
    """The site meter at the point of interconnection (Modbus TCP). With one, the cap and every target apply to
    what it reads: the miners get the site level minus the non-miner load (meter − Σ miners) at its worst case."""

    host: str = Field(min_length=1, description="Meter (or Modbus gateway) address.")
    port: int = Field(502, ge=1, le=65535)
    unit: int = Field(1, ge=0, le=255, description="Modbus unit (device) id.")
    # a mapping is a register map, anything else a name: one branch's errors, not both (the tags, `<…>`, are left
    # out of the field names errors give: format_validation_error)
    map: Annotated[
        Annotated[str, Tag("<name>")] | Annotated[MeterMap, Tag("<registers>")],
        Discriminator(lambda v: "<registers>" if isinstance(v, dict | MeterMap) else "<name>"),
    ] = Field("sunspec", description="'sunspec' (found by its marker), a preset name, or a register map.")
    sunspec_model: int | None = Field(None, description="With map 'sunspec': this meter model (201-204, 211-214).")
    poll_s: Seconds = Field(1.0, ge=0.02, le=60.0, description="Wall seconds between readings (network time).")
    stale_after_s: Seconds = Field(5.0, gt=0, description="No good reading for this long: stale (fall back).")
    frozen_after_s: Seconds = Field(10.0, gt=0, description="Registers unchanged for this long: frozen (stale).")
    max_kw: PowerKw | None = Field(
        None, gt=0, description="Largest plausible reading (above it: garbage); default twice site.cap_kw."
    )
    non_miner_allowance_kw: PowerKw = Field(
        ge=0, description="Non-miner load (cooling, losses, base load) counted while the meter is stale."
    )
    lag_s: Seconds = Field(
        2.0,
        ge=0,
        le=300,
        description="How far the meter's figure lags the miners' own readings (its averaging "
        "interval and poll): the non-miner load is sampled only while the miners' sum held that long.",
    )
    non_miner_window_s: Seconds = Field(
        900.0, gt=0, description="The non-miner load is counted at its maximum over this window."
    )
    cooling_pct: float = Field(
        0.0, ge=0, le=100, description="Cooling that follows miners, as a % of their power: counted on a rise."
    )

    @field_validator("map")
    @classmethod
    def _known_map(cls, v: str | MeterMap) -> str | MeterMap:
        if isinstance(v, str) and v not in METER_MAPS:
            close = difflib.get_close_matches(v, METER_MAPS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{hint}use one of {', '.join(METER_MAPS)}, or a register map (total_w, import_wh, hz)")
        return v

    @field_validator("sunspec_model")
    @classmethod
    def _meter_model(cls, v: int | None) -> int | None:
        if v is not None and v not in INT_METERS | FLOAT_METERS:
            raise ValueError("a SunSpec meter model is one of 201-204 (integer) or 211-214 (float)")
        return v

    @property
    def cooling_share(self) -> float:
        return self.cooling_pct / 100.0


class SiteConfig(_Model):
    id: str = Field(pattern=_SITE_ID.pattern, description="Site id; used in MQTT topics.")
    cap_kw: PowerKw = Field(
        gt=0, description="Licensed site cap in kW: never exceeded, even in the worst case. At most 1,000 MW."
    )
    timezone: str | None = Field(
        None,
        description="IANA time zone of the site (e.g. Asia/Karachi); schedule windows are in its local wall "
        "time, daylight saving included. Required when there are schedule windows.",
    )
    circuits: list[CircuitConfig] = Field(default_factory=list)
    meter: SiteMeterConfig | None = Field(
        None, description="Site meter at the point of interconnection; none = power from miners' reports."
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                "not an IANA time zone (e.g. Asia/Karachi, Europe/Berlin, UTC; `timedatectl list-timezones` "
                "lists them; the system's tzdata package provides them)"
            ) from None
        return v

    @field_validator("meter", mode="before")
    @classmethod
    def _none_is_no_meter(cls, v: Any) -> Any:
        return None if v == "none" else v  # the placeholder earlier files carry: no meter, as before

    @field_serializer("meter")
    def _no_meter_shown_as_before(self, v: SiteMeterConfig | None) -> Any:
        return "none" if v is None else v  # `config dump` of a site without a meter reads as it always did

    @field_validator("meter")
    @classmethod
    def _meter_fits_cap(cls, v: SiteMeterConfig | None, info: ValidationInfo) -> SiteMeterConfig | None:
        cap_kw = info.data.get("cap_kw")
        if v is None or cap_kw is None:
            return v
        if v.non_miner_allowance_kw >= cap_kw:
            raise ValueError(
                f"non_miner_allowance_kw = {v.non_miner_allowance_kw}: not below site.cap_kw ({cap_kw} kW); with "
                "the meter stale the miners would have no room at all"
            )
        if v.max_kw is not None and v.max_kw <= cap_kw:
            raise ValueError(
                f"max_kw = {v.max_kw}: not above site.cap_kw ({cap_kw} kW); readings at the cap would be refused "
                "as out of range"
            )
        return v

    @property
    def tzinfo(self) -> tzinfo:
        """The site's zone, for the schedule; UTC when none is set (then there are no windows to place)."""
        return ZoneInfo(self.timezone) if self.timezone else UTC

    @field_validator("id", mode="before")
    @classmethod
    def _id_is_topic_safe(cls, v: Any) -> Any:
        if isinstance(v, str) and not _SITE_ID.match(v):
            raise ValueError("use 1-64 letters, digits, '-' or '_' (the site id is part of MQTT topic names)")
        return v

    @field_validator("circuits")
    @classmethod
    def _circuits_form_a_tree(cls, circuits: list[CircuitConfig], info: ValidationInfo) -> list[CircuitConfig]:
        """The runtime's own rules (agent.core.circuits), so `config check` refuses exactly what `run` would."""
        cap_kw = info.data.get("cap_kw")  # absent when the cap itself was refused: check the rest against none
        tree = CircuitTree(
            cap_kw if cap_kw is not None else MAX_POWER_KW, [Circuit(c.id, c.parent, c.cap_kw) for c in circuits]
        )
        above = tree.caps_above_parents()
        if above:
            raise ValueError(above[0])
        check_membership(tree, [(c.id, c.miners) for c in circuits if c.miners])
        return circuits


class PriorityGroup(_Model):
    name: str
    priority: int = Field(description="Higher sleeps later (e.g. hosted customers' miners).")
    addresses: AddressList


class MinersConfig(_Model):
    addresses: AddressList = Field(
        default_factory=list, description="Single IPs, ranges a-b, CIDRs to scan for miners; 65,536 at most."
    )
    exclude: AddressList = Field(default_factory=list)
    driver: Literal["pyasic"] = "pyasic"
    priority_groups: list[PriorityGroup] = Field(default_factory=list)
    credentials_file: Path | None = Field(
        None, description="YAML {family: password}; relative to the config file. Or $CREDENTIALS_DIRECTORY."
    )
    unknown_w: float | None = Field(
        None,
        gt=0,
        le=20_000,
        allow_inf_nan=False,
        description="Worst case (W) a configured address counts at until a miner there is identified; "
        "default: the largest model in the catalogue.",
    )


class PollingConfig(_Model):
    interval_s: Seconds = Field(5.0, gt=0, description="Telemetry sweep period.")
    read_timeout_s: Seconds = Field(4.0, gt=0, description="Per-miner read deadline.")
    command_timeout_s: Seconds = Field(8.0, gt=0, description="Per-miner control command deadline.")
    identify_timeout_s: Seconds = Field(10.0, gt=0)
    concurrency: int = Field(200, ge=1, le=5000, description="Miner calls in flight at once (pyasic fails past ~700).")
    identify_concurrency: int = Field(128, ge=1, le=600)
    stale_after_s: Seconds = Field(30.0, gt=0, description="A reading older than this counts as unknown.")
    reidentify_after_failures: int = Field(20, ge=1)


class WakeStagger(_Model):
    max_per_interval: int = Field(200, ge=1, description="At most this many miners woken per interval.")
    interval_s: Seconds = Field(10.0, gt=0)


class ControlConfig(_Model):
    tick_s: Seconds = Field(5.0, gt=0, description="Control tick period; dispatches also trigger a tick.")
    ramp_up_kw_per_min: PowerKw | None = Field(
        None, gt=0, description="Limit on increases of site power; None = no limit."
    )
    wake: WakeStagger = WakeStagger()
    min_on_s: Seconds = Field(120.0, ge=0, description="A woken miner stays on at least this long.")
    min_off_s: Seconds = Field(120.0, ge=0, description="A slept miner stays off at least this long.")
    tolerance_kw: PowerKw = Field(
        0.0, ge=0, description="Measured overshoot tolerated before curtailing more (meter noise); ≤ 10 % of the cap."
    )
    headroom_pct: float = Field(
        1.0, ge=0, le=20, description="Plan this share below the target so drift does not cross it."
    )
    use_power_limits: bool = Field(True, description="Throttle miners; False = only sleep and wake.")
    retry_budget: int = Field(3, ge=0, description="Retries per miner command before giving up this tick.")
    confirm_after_s: Seconds = Field(20.0, gt=0, description="A command not seen in telemetry by then is resent.")
    on_shutdown: Literal["leave", "sleep", "wake"] = Field(
        "leave", description="What miners are told when the agent stops; 'leave' avoids a restart surge."
    )


class DispatchRules(_Model):
    debounce_s: Seconds = Field(5.0, ge=0, description="Inputs that flip back within this are ignored.")
    min_hold_s: Seconds = Field(0.0, ge=0, description="A curtailment holds at least this long.")
    cooldown_s: Seconds = Field(0.0, ge=0, description="Least time between two grid events.")
    max_event_s: Seconds | None = Field(None, gt=0, description="Longest a dispatch may last.")
    max_skew_s: Seconds = Field(30.0, ge=0, description="Commands issued this far in the future are refused.")
    max_age_s: Seconds = Field(300.0, gt=0, description="Commands older than this on arrival are refused.")


class FailsafeConfig(_Model):
    enabled: bool = Field(True, description="Only meaningful when a grid link (MQTT) is configured.")
    heartbeat_timeout_s: Seconds = Field(
        180.0, gt=0, le=MAX_HEARTBEAT_TIMEOUT_S, description="No heartbeat for this long: fail-safe (≤ 1 h)."
    )
    level: Literal["hold"] | Annotated[PowerKw, Field(ge=0)] = Field(
        "hold", description="'hold' keeps the last target; a number is a kW level."
    )
    hold_at_start: bool = Field(True, description="Stay in fail-safe at first start until the grid is heard.")
    release_after_s: Seconds = Field(
        300.0, gt=0, description="With heartbeat back, leave fail-safe after this even without a command."
    )


Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class ScheduleWindow(_Model):
    name: str
    start: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="Local time HH:MM.")
    end: str = Field(pattern=r"^([01]\d|2[0-4]):[0-5]\d$", description="Local time HH:MM; may wrap midnight.")
    days: list[Weekday] = Field(default_factory=lambda: list(WEEKDAYS), min_length=1)
    target_kw: PowerKw = Field(ge=0, description="Most the site may draw in the window.")
    # no per-window offset: the zone is the site's (site.timezone), so windows follow its DST (see _RETIRED)


class TlsConfig(_Model):
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = Field(False, description="Skip hostname verification (test brokers only).")


class BrokerAddress(_Model):
    host: str = Field(min_length=1)
    port: int = Field(1883, ge=1, le=65535)


def _protocol_text(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # YAML reads 5 as 5


class MqttConfig(_Model):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    brokers: list[BrokerAddress] = Field(
        default_factory=list,
        max_length=16,
        description="Brokers tried in turn (a cluster's nodes: on a failure the next one); replaces host/port.",
    )
    # NATS's MQTT listener speaks 3.1.1 only: "3.1.1" saves a refused MQTT 5 connect per start; "auto" tries 5 first
    protocol: Annotated[Literal["auto", "5", "3.1.1"], BeforeValidator(_protocol_text)] = "auto"
    root: str | None = Field(None, description="Topic root; default hashflex/<site id>.")
    client_id: str | None = Field(None, description="Default hashflex-<site id>.")
    username: str | None = None
    password_file: Path | None = Field(None, description="File holding the broker password.")
    tls: TlsConfig | None = None
    keepalive_s: Seconds = Field(30.0, gt=0)
    session_expiry_s: Seconds = Field(3600.0, ge=0)
    telemetry_interval_s: Seconds = Field(10.0, gt=0)
    miner_detail_interval_s: Seconds | None = Field(None, gt=0, description="Per-miner topics; off if unset.")
    max_payload_bytes: int = Field(65_536, ge=1024)

    @model_validator(mode="after")
    def _one_way_to_name_brokers(self) -> MqttConfig:
        given = sorted({"host", "port"} & self.model_fields_set)
        if self.brokers and given:
            values = " and ".join(f"{name} = {getattr(self, name)!r}" for name in given)
            raise ValueError(
                f"{values} set beside brokers: list every broker under mqtt.brokers (host and port each) and "
                f"remove mqtt.{' and mqtt.'.join(given)}"
            )
        return self

    def endpoints(self) -> list[tuple[str, int]]:
        """The brokers in the order they are tried: `brokers`, or the single `host`/`port`."""
        return [(b.host, b.port) for b in self.brokers] or [(self.host, self.port)]


class GridConfig(_Model):
    public_keys: list[Path] = Field(
        default_factory=list, description="Ed25519 public keys (PEM or raw base64) allowed to sign dispatches."
    )
    operator_public_keys: list[Path] = Field(
        default_factory=list, description="Keys for operator commands over MQTT; none = disabled over MQTT."
    )


class ControlSocketConfig(_Model):
    path: Path | None = Field(None, description="Unix socket; default $RUNTIME_DIRECTORY or state_dir.")
    group: str | None = Field(None, description="Group allowed to use the socket (mode 0660).")


class MetricsConfig(_Model):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9708, ge=0, le=65535, description="0 picks a free port.")
    per_miner: bool = Field(False, description="Per-miner series; off for large sites.")


class LoggingConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    levels: dict[str, Literal["debug", "info", "warning", "error"]] = Field(default_factory=dict)
    format: Literal["auto", "json", "console"] = "auto"


class AuditConfig(_Model):
    sign_daily_head: bool = False
    signing_key: Path | None = Field(None, description="Site Ed25519 private key for daily chain heads.")
    retention_days: int = Field(730, ge=1, description="Exported records older than this may be pruned.")
    disk_alarm_mb: float = Field(500.0, ge=0, description="Alarm when the state disk has less free space.")


_SHED = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|kW)\s*$")


class FrequencyStage(_Model):
    below_hz: float = Field(ge=45.0, le=65.0, description="Trips once the frequency is below this for for_s.")
    for_s: Seconds = Field(ge=0, le=60.0, description="Ride-through: a dip shorter than this causes nothing.")
    shed: str = Field(description="What the stage sheds in total: '25%' of the miners' draw, or '300kW'.")
    # this stage's own restore rule, in force while it is the deepest stage the event holds (none: the programme's)
    restore_above_hz: float | None = Field(None, ge=45.0, le=65.0, description="Overrides the programme's.")
    restore_after_s: Seconds | None = Field(None, ge=0, le=3600.0, description="Overrides the programme's.")

    @field_validator("shed", mode="before")
    @classmethod
    def _shed_form(cls, v: Any) -> Any:
        m = _SHED.match(str(v)) if isinstance(v, str) else None
        if m is None:
            raise ValueError(f"shed = {v!r}: write a share of the miners' draw ('25%') or a power ('300kW')")
        amount = float(m.group(1))
        if m.group(2) == "%" and not 0 < amount <= 100:
            raise ValueError(f"shed = {v!r}: a share is above 0 % and at most 100 %")
        if m.group(2) == "kW" and not 0 < amount <= MAX_POWER_KW:
            raise ValueError(f"shed = {v!r}: a power is above 0 kW and at most {MAX_POWER_KW:g} kW")
        return v

    @property
    def shed_pct(self) -> float | None:
        m = _SHED.match(self.shed)
        return float(m.group(1)) if m and m.group(2) == "%" else None

    @property
    def shed_kw(self) -> float | None:
        m = _SHED.match(self.shed)
        return float(m.group(1)) if m and m.group(2) == "kW" else None


class FrequencyResponseConfig(_Model):
    """Under-frequency load shedding (opt-in; needs site.meter, which reads the frequency): see
    agent/core/frequency.py for the rules and agent/runtime/frequency.py for how it acts."""

    stages: list[FrequencyStage] = Field(min_length=1, max_length=8, description="Ordered by below_hz, falling.")
    restore_above_hz: float = Field(ge=45.0, le=65.0, description="The event ends once above this ...")
    restore_after_s: Seconds = Field(ge=0, le=3600.0, description="... for this long (then ramp and stagger).")
    poll_s: Seconds | None = Field(
        0.1,
        ge=0.02,
        le=60.0,
        description="Wall seconds between frequency-only meter reads; none = each full meter reading only.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> FrequencyResponseConfig:
        for i, (a, b) in enumerate(itertools.pairwise(self.stages), start=1):
            if b.below_hz >= a.below_hz:
                raise ValueError(
                    f"stages[{i}].below_hz = {b.below_hz}: not below stages[{i - 1}]'s {a.below_hz} (stages are "
                    "ordered by below_hz, falling)"
                )
            if (a.shed_pct is None) != (b.shed_pct is None):
                raise ValueError(f"stages[{i}].shed = {b.shed!r}: every stage sheds in one unit (all % or all kW)")
            if (b.shed_pct or b.shed_kw or 0.0) < (a.shed_pct or a.shed_kw or 0.0):
                raise ValueError(
                    f"stages[{i}].shed = {b.shed!r}: less than stages[{i - 1}]'s {a.shed!r} (a stage's shed is the "
                    "total while it holds, so a deeper one sheds at least as much)"
                )
        if self.restore_above_hz < self.stages[0].below_hz:
            raise ValueError(
                f"restore_above_hz = {self.restore_above_hz}: below stages[0].below_hz ({self.stages[0].below_hz}); "
                "the event would end while the first stage still trips"
            )
        first = self.stages[0].below_hz
        for i, stage in enumerate(self.stages):
            above = stage.restore_above_hz
            if above is not None and above <= stage.below_hz:
                raise ValueError(f"stages[{i}].restore_above_hz = {above}: not above its below_hz ({stage.below_hz})")
            if above is not None and above < first:
                raise ValueError(
                    f"stages[{i}].restore_above_hz = {above}: below stages[0].below_hz ({first}); the event ends "
                    "as a whole, and would end while the first stage still trips"
                )
        return self


class AgentConfig(_Model):
    site: SiteConfig
    miners: MinersConfig = MinersConfig()
    polling: PollingConfig = PollingConfig()
    control: ControlConfig = ControlConfig()
    dispatch: DispatchRules = DispatchRules()
    failsafe: FailsafeConfig = FailsafeConfig()
    schedule: list[ScheduleWindow] = Field(default_factory=list)
    mqtt: MqttConfig = MqttConfig()
    grid: GridConfig = GridConfig()
    state_dir: Path = Path("/var/lib/hashflex")
    control_socket: ControlSocketConfig = ControlSocketConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    audit: AuditConfig = AuditConfig()
    frequency_response: FrequencyResponseConfig | None = Field(
        None, description="Under-frequency load shedding (opt-in, per programme); needs site.meter."
    )
    # where the file was read from; paths above are relative to its folder
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _no_mqtt_section_no_grid_link(cls, data: Any) -> Any:
        """A file without an `mqtt:` section runs the site without a grid link (cap, schedule and the local CLI
        only): the grid link needs a broker and the grid's key, which a first `site:` + `miners:` file has not."""
        if isinstance(data, dict) and data.get("mqtt") is None:
            return {**data, "mqtt": {"enabled": False}}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> AgentConfig:
        if self.mqtt.enabled and not self.grid.public_keys:
            raise ValueError(
                "grid.public_keys: the mqtt section turns on the grid link, which takes only commands signed by a "
                "grid key, and none is listed: put the grid operator's public key in a file and list it, e.g. "
                "`grid: {public_keys: [keys/grid.pub]}` (a pair for a test: `hashflex keygen --out keys/grid`), "
                "or remove the mqtt section to run without a grid link"
            )
        if self.frequency_response is not None and self.site.meter is None:
            raise ValueError("frequency_response needs site.meter: the frequency is read at the site meter")
        for i, st in enumerate(self.frequency_response.stages if self.frequency_response else []):
            if st.shed_kw is not None and st.shed_kw > self.site.cap_kw:
                raise ValueError(f"frequency_response.stages[{i}].shed = {st.shed!r}: above site.cap_kw")
        if self.polling.read_timeout_s >= self.polling.stale_after_s:
            raise ValueError("polling.read_timeout_s must be shorter than polling.stale_after_s")
        if isinstance(self.failsafe.level, float) and self.failsafe.level > self.site.cap_kw:
            raise ValueError(f"failsafe.level {self.failsafe.level} kW is above site.cap_kw")
        for w in self.schedule:
            if w.target_kw > self.site.cap_kw:
                raise ValueError(f"schedule window {w.name!r} target_kw is above site.cap_kw")
        if self.schedule and self.site.timezone is None:
            raise ValueError(
                "site.timezone is required with schedule windows: the IANA zone of the site, e.g. Asia/Karachi "
                "(windows are in its local wall time, daylight saving included)"
            )
        if self.control.tolerance_kw > MAX_TOLERANCE_SHARE * self.site.cap_kw:
            raise ValueError(
                f"control.tolerance_kw = {self.control.tolerance_kw}: more than {MAX_TOLERANCE_SHARE * 100:g} % of "
                f"site.cap_kw ({self.site.cap_kw} kW); the site could stay that far above its cap uncorrected"
            )
        lists = [
            self.miners.addresses,
            self.miners.exclude,
            *(g.addresses for g in self.miners.priority_groups),
            *(c.miners for c in self.site.circuits),
        ]
        total = sum(size(spec) for specs in lists for spec in specs)
        if total > MAX_ADDRESSES_CONFIG:
            raise ValueError(
                f"the address lists name {total} addresses together, more than {MAX_ADDRESSES_CONFIG} "
                "(miners.addresses, exclude, priority_groups and circuits' miners)"
            )
        return self

    # ----------------------------------------------------------------- derived values, one place each
    @property
    def mqtt_root(self) -> str:
        return self.mqtt.root or f"hashflex/{self.site.id}"

    def resolve(self, path: Path) -> Path:
        """A path from the file, relative to the file's folder."""
        if path.is_absolute() or self.source is None:
            return path
        return self.source.parent / path

    @property
    def state_path(self) -> Path:
        return self.resolve(self.state_dir)

    @property
    def socket_path(self) -> Path:
        if self.control_socket.path is not None:
            return self.resolve(self.control_socket.path)
        runtime = os.environ.get("RUNTIME_DIRECTORY")
        return Path(runtime) / "control.sock" if runtime else self.state_path / "control.sock"

    @property
    def db_path(self) -> Path:
        return self.state_path / "hashflex.db"

    def credentials(self) -> dict[str, str]:
        """Miner passwords by family, from the credentials file or $CREDENTIALS_DIRECTORY/miners.yaml."""
        path: Path | None = None
        if self.miners.credentials_file is not None:
            path = self.resolve(self.miners.credentials_file)
        elif os.environ.get("CREDENTIALS_DIRECTORY"):
            candidate = Path(os.environ["CREDENTIALS_DIRECTORY"]) / "miners.yaml"
            path = candidate if candidate.exists() else None
        if path is None:
            return {}
        return read_credentials(path)

    def mqtt_password(self) -> str | None:
        if self.mqtt.password_file is not None:
            return self.resolve(self.mqtt.password_file).read_text().strip()
        cred = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred and (Path(cred) / "mqtt-password").exists():
            return (Path(cred) / "mqtt-password").read_text().strip()
        return None


class ConfigError(Exception):
    """A config file that cannot be used. The message names the file, the field and the value."""


CREDENTIAL_FAMILIES: tuple[str, ...] = tuple(f.value for f in Family)


def read_credentials(path: Path) -> dict[str, str]:
    """Miner passwords by family from a YAML file. A family the driver does not know is refused, not ignored: a
    misspelt `antminr:` would otherwise leave every Antminer on its default password, found only at run time."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{path}: {_yaml_problem(exc)}; write one `family: password` line per firmware family"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: credentials must be a mapping of family: password, got a {type(data).__name__}; write one "
            f"`family: password` line per firmware family ({', '.join(CREDENTIAL_FAMILIES)})"
        )
    for family, password in data.items():
        if str(family) not in CREDENTIAL_FAMILIES:
            close = difflib.get_close_matches(str(family), CREDENTIAL_FAMILIES, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            families = ", ".join(CREDENTIAL_FAMILIES)
            raise ConfigError(f"{path}: family {family!r} is not a miner family: {hint}use one of {families}")
        if not isinstance(password, str):
            raise ConfigError(
                f'{path}: {family} = {password!r}: a password must be text: quote it ({family}: "{password}")'
            )
    return {str(k): v for k, v in data.items()}


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`line 2 column 5: not valid YAML: <problem>`, one line, from a YAML parser error."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
    problem = str(getattr(exc, "problem", None) or exc).replace("\n", " ")
    hint = " (indent with spaces, not tabs)" if "\\t" in problem or "\t" in problem else ""
    return f"{where}not valid YAML: {problem}{hint}"


def load_config(path: str | Path) -> AgentConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (pass --config FILE)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = str(getattr(exc, "problem", None) or exc)
        hint = " (indent with spaces, not tabs)" if "\\t" in problem or "\t" in problem else ""
        raise ConfigError(f"{path}:{where}: not valid YAML: {problem}{hint}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; it needs at least `site: {{id: ..., cap_kw: ...}}`")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (key: value lines) with at least 'site'")
    try:
        return AgentConfig.model_validate({**data, "source": path.resolve()})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc, data)) from None


# Keys an older site file may still carry, and what to write instead (an "unknown key" alone would not say).
_RETIRED: dict[str, str] = {
    "utc_offset_h": "no longer accepted: windows are in the site's time zone; set site.timezone once instead "
    "(an IANA name, e.g. Asia/Karachi; daylight saving is applied)",
}


def format_validation_error(path: Path, exc: ValidationError, data: Any) -> str:
    """One line per problem: `field = value: what is wrong`. A single problem is a single line after the file."""
    problems: list[str | tuple[Any, ...]] = []  # a tuple: the field of a union, its branches' messages below
    branches: dict[tuple[Any, ...], list[str]] = {}
    for err in exc.errors():
        where = tuple(p for p in err["loc"] if not _is_branch_tag(p))
        loc = format_loc(where)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            retired = _RETIRED.get(str(where[-1])) if where else None
            if retired is not None:
                problems.append(f"{loc} = {lookup_value(data, where)!r}: {retired}")
                continue
            hint = suggest_key(AgentConfig, where)
            problems.append(f"{loc}: unknown key{hint} (check its spelling; see configs/agent.example.yaml)")
            continue
        if err["type"] == "missing":
            problems.append(f"{loc}: required field is missing")
            continue
        value = lookup_value(data, where)
        field = where
        while field and value is MISSING:  # a union reports each branch under field + the branch's name
            field = field[:-1]
            value = lookup_value(data, field)
        if field != where and field and not isinstance(value, dict | list):
            if field not in branches:
                branches[field] = []
                problems.append(field)
            if msg not in branches[field]:
                branches[field].append(msg)
            continue
        if value is MISSING or isinstance(value, dict | list):
            # a cross-field check on a whole section: its message names the fields; the section is noise
            problems.append(msg if not where else f"{loc}: {msg}")
            continue
        problems.append(f"{loc} = {value!r}: {msg}{_unit_hint(err)}")
    lines = [
        p if isinstance(p, str) else f"{format_loc(p)} = {lookup_value(data, p)!r}: {_either(branches[p])}"
        for p in problems
    ]
    if len(lines) == 1:
        return f"{path}: {lines[0]}"
    return "\n".join([f"{path}: {len(lines)} error(s) in the site config", *(f"  {line}" for line in lines)])


def _is_branch_tag(part: Any) -> bool:
    """A tagged union's branch in an error's location (`<registers>`): not a key of the file."""
    return isinstance(part, str) and part.startswith("<") and part.endswith(">")


def _either(messages: list[str]) -> str:
    """Branch messages as one: "Input should be 'hold'", "... a finite number" → "... 'hold' or a finite number"."""
    prefix = "Input should be "
    if all(m.startswith(prefix) for m in messages):
        return prefix + " or ".join(m.removeprefix(prefix) for m in messages)
    return "; or ".join(messages)


def format_loc(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the config spells it: `sites[0].cap_kw`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _unit_hint(err: Any) -> str:
    """Say which unit a number is in when a unit was typed into a field whose name carries it."""
    name = str(err["loc"][-1]) if err["loc"] else ""
    if name.endswith("_s") and err["type"] in ("less_than_equal", "less_than", "greater_than", "greater_than_equal"):
        return " (seconds)"  # "2h" was read as 7200: the bound is in seconds
    if err["type"] not in ("float_parsing", "int_parsing", "float_type", "int_type"):
        return ""
    for suffix, unit in (("_kw", "kW"), ("_w", "W"), ("_mb", "MB"), ("_pct", "%")):
        if name.endswith(suffix):
            return f" (a plain number in {unit}: the unit is in the key's name)"
    return ""


def suggest_key(root: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """`, did you mean 'miners'?` for a misspelt key, from the fields of the section of `root` it sits in."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        model = _model_of(field.annotation)
        if model is None:
            return ""
    known = [k for k in getattr(model, "model_fields", {}) if k != "source"]
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    return f", did you mean {close[0]!r}?" if close else ""


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


MISSING = object()  # what `lookup_value` gives for a location the file does not have


def lookup_value(data: Any, loc: tuple[Any, ...]) -> Any:
    """The value the file had at a pydantic error location, else MISSING."""
    node = data
    for part in loc:
        found = (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and part < len(node)
        )
        if found:
            node = node[part]
        else:
            return MISSING
    return node
