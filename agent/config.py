"""Site configuration: YAML validated by pydantic. Unknown keys are errors; every error names file, field, value.

Durations accept "30s", "5m", "2h"; powers are in the unit their name says (`cap_kw`). Secrets (miner
passwords, MQTT password) live in a separate file or a systemd credential, never in the main file.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.core.addresses import validate_spec
from agent.core.units import parse_duration_s

DEFAULT_CONFIG_PATH = Path("/etc/hashflex/site.yaml")

Seconds = Annotated[float, BeforeValidator(parse_duration_s)]
AddressSpec = Annotated[str, BeforeValidator(lambda v: validate_spec(str(v)))]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CircuitConfig(_Model):
    id: str = Field(title="Circuit id", description="Unique name of a transformer, container or PDU.")
    parent: str | None = Field(None, description="Parent circuit id; None hangs it directly under the site.")
    cap_kw: float = Field(gt=0, description="Most this circuit may draw, in kW.")
    miners: list[AddressSpec] = Field(default_factory=list, description="Miners fed by this circuit.")


_SITE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class SiteConfig(_Model):
    id: str = Field(pattern=_SITE_ID.pattern, description="Site id; used in MQTT topics.")
    cap_kw: float = Field(gt=0, description="Licensed site cap in kW: never exceeded, even in the worst case.")
    circuits: list[CircuitConfig] = Field(default_factory=list)
    meter: Literal["none"] = Field("none", description="Site meter; 'none' = power from miners' reports.")

    @field_validator("id", mode="before")
    @classmethod
    def _id_is_topic_safe(cls, v: Any) -> Any:
        if isinstance(v, str) and not _SITE_ID.match(v):
            raise ValueError("use 1-64 letters, digits, '-' or '_' (the site id is part of MQTT topic names)")
        return v

    @model_validator(mode="after")
    def _circuits_form_a_tree(self) -> SiteConfig:
        ids = [c.id for c in self.circuits]
        dupes = {i for i in ids if ids.count(i) > 1}
        if dupes:
            raise ValueError(f"circuit ids must be unique, repeated: {sorted(dupes)}")
        if "site" in ids:
            raise ValueError("circuit id 'site' is reserved for the site itself; name the circuit after its equipment")
        by_id = {c.id: c for c in self.circuits}
        for c in self.circuits:
            if c.parent is not None and c.parent not in by_id:
                raise ValueError(f"circuit {c.id!r} names parent {c.parent!r}, which is not defined")
        for c in self.circuits:  # cycles
            seen, node = {c.id}, c
            while node.parent is not None:
                if node.parent in seen:
                    raise ValueError(f"circuit {c.id!r} is part of a parent cycle")
                seen.add(node.parent)
                node = by_id[node.parent]
        for c in self.circuits:
            parent_cap = by_id[c.parent].cap_kw if c.parent else self.cap_kw
            if c.cap_kw > parent_cap:
                raise ValueError(
                    f"circuit {c.id!r} cap_kw={c.cap_kw} exceeds its parent's cap ({parent_cap} kW)"
                )
        return self


class PriorityGroup(_Model):
    name: str
    priority: int = Field(description="Higher sleeps later (e.g. hosted customers' miners).")
    addresses: list[AddressSpec]


class MinersConfig(_Model):
    addresses: list[AddressSpec] = Field(
        default_factory=list, description="Single IPs, ranges a-b, CIDRs to scan for miners."
    )
    exclude: list[AddressSpec] = Field(default_factory=list)
    driver: Literal["pyasic"] = "pyasic"
    priority_groups: list[PriorityGroup] = Field(default_factory=list)
    credentials_file: Path | None = Field(
        None, description="YAML {family: password}; relative to the config file. Or $CREDENTIALS_DIRECTORY."
    )


class PollingConfig(_Model):
    interval_s: Seconds = Field(5.0, gt=0, description="Telemetry sweep period.")
    read_timeout_s: Seconds = Field(4.0, gt=0, description="Per-miner read deadline.")
    command_timeout_s: Seconds = Field(8.0, gt=0, description="Per-miner control command deadline.")
    identify_timeout_s: Seconds = Field(10.0, gt=0)
    concurrency: int = Field(
        200, ge=1, le=5000, description="Miner calls in flight at once (pyasic fails past ~700)."
    )
    identify_concurrency: int = Field(128, ge=1, le=600)
    stale_after_s: Seconds = Field(30.0, gt=0, description="A reading older than this counts as unknown.")
    reidentify_after_failures: int = Field(20, ge=1)


class WakeStagger(_Model):
    max_per_interval: int = Field(200, ge=1, description="At most this many miners woken per interval.")
    interval_s: Seconds = Field(10.0, gt=0)


class ControlConfig(_Model):
    tick_s: Seconds = Field(5.0, gt=0, description="Control tick period; dispatches also trigger a tick.")
    ramp_up_kw_per_min: float | None = Field(
        None, gt=0, description="Limit on increases of site power; None = no limit."
    )
    wake: WakeStagger = WakeStagger()
    min_on_s: Seconds = Field(120.0, ge=0, description="A woken miner stays on at least this long.")
    min_off_s: Seconds = Field(120.0, ge=0, description="A slept miner stays off at least this long.")
    tolerance_kw: float = Field(
        0.0, ge=0, description="Measured overshoot tolerated before curtailing more (meter noise)."
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
    heartbeat_timeout_s: Seconds = Field(180.0, gt=0, description="No heartbeat for this long: fail-safe.")
    level: Literal["hold"] | float = Field(
        "hold", description="'hold' keeps the last target; a number is a kW level."
    )
    hold_at_start: bool = Field(True, description="Stay in fail-safe at first start until the grid is heard.")
    release_after_s: Seconds = Field(
        300.0, gt=0, description="With heartbeat back, leave fail-safe after this even without a command."
    )

    @field_validator("level", mode="before")
    @classmethod
    def _level(cls, v: Any) -> Any:
        if isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
            raise ValueError("fail-safe level must be 'hold' or a non-negative kW")
        return v


Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class ScheduleWindow(_Model):
    name: str
    start: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="Local time HH:MM.")
    end: str = Field(pattern=r"^([01]\d|2[0-4]):[0-5]\d$", description="Local time HH:MM; may wrap midnight.")
    days: list[Weekday] = Field(default_factory=lambda: list(WEEKDAYS))
    target_kw: float = Field(ge=0, description="Most the site may draw in the window.")
    utc_offset_h: float = Field(5.0, ge=-12, le=14, description="Local time offset (Pakistan: +5).")


class TlsConfig(_Model):
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = Field(False, description="Skip hostname verification (test brokers only).")


class MqttConfig(_Model):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
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
    # where the file was read from; paths above are relative to its folder
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _cross_checks(self) -> AgentConfig:
        if self.mqtt.enabled and not self.grid.public_keys:
            raise ValueError("grid.public_keys: MQTT commands are enabled, so at least one grid key is needed")
        if self.polling.read_timeout_s >= self.polling.stale_after_s:
            raise ValueError("polling.read_timeout_s must be shorter than polling.stale_after_s")
        if isinstance(self.failsafe.level, float) and self.failsafe.level > self.site.cap_kw:
            raise ValueError(f"failsafe.level {self.failsafe.level} kW is above site.cap_kw")
        for w in self.schedule:
            if w.target_kw > self.site.cap_kw:
                raise ValueError(f"schedule window {w.name!r} target_kw is above site.cap_kw")
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
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ConfigError(f"{path}: credentials must be a mapping of family: password")
        return {str(k): v for k, v in data.items()}

    def mqtt_password(self) -> str | None:
        if self.mqtt.password_file is not None:
            return self.resolve(self.mqtt.password_file).read_text().strip()
        cred = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred and (Path(cred) / "mqtt-password").exists():
            return (Path(cred) / "mqtt-password").read_text().strip()
        return None


class ConfigError(Exception):
    """A config file that cannot be used. The message names the file, the field and the value."""


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


def format_validation_error(path: Path, exc: ValidationError, data: Any) -> str:
    lines = [f"{path}: {exc.error_count()} error(s) in the site config"]
    for err in exc.errors():
        loc = _format_loc(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            hint = _suggest(err["loc"])
            lines.append(f"  {loc}: unknown key{hint} (check its spelling; see configs/agent.example.yaml)")
            continue
        if err["type"] == "missing":
            lines.append(f"  {loc}: required field is missing")
            continue
        value = _lookup(data, err["loc"])
        if value is _MISSING or isinstance(value, dict | list):
            # a cross-field check on a whole section: its message names the fields; the section is noise
            lines.append(f"  {msg}" if not err["loc"] else f"  {loc}: {msg}")
            continue
        lines.append(f"  {loc} = {value!r}: {msg}{_unit_hint(err)}")
    return "\n".join(lines)


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _unit_hint(err: Any) -> str:
    """Say which unit a number is in when a unit was typed into a field whose name carries it."""
    name = str(err["loc"][-1]) if err["loc"] else ""
    if err["type"] not in ("float_parsing", "int_parsing", "float_type", "int_type"):
        return ""
    for suffix, unit in (("_kw", "kW"), ("_w", "W"), ("_mb", "MB"), ("_pct", "%")):
        if name.endswith(suffix):
            return f" (a plain number in {unit}: the unit is in the key's name)"
    return ""


def _suggest(loc: tuple[Any, ...]) -> str:
    """`, did you mean 'miners'?` for a misspelt key, from the fields of the section it sits in."""
    model: Any = AgentConfig
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


_MISSING = object()


def _lookup(data: Any, loc: tuple[Any, ...]) -> Any:
    node = data
    for part in loc:
        found = (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and part < len(node)
        )
        if found:
            node = node[part]
        else:
            return _MISSING
    return node
