"""The program config (`program.yaml`): what `coordinator.service.Coordinator` and its ports are built from.

Strict like the agent's site config: unknown keys refused, no infinite or NaN number anywhere, and every error one
line naming the file, the field and the value (`program.yaml: sites[1].cap_kw = inf: Input should be a finite
number`). Nothing here is a setting the service cannot use: each field maps onto `CoordinatorConfig`, `LeaseConfig`,
`JetStreamProgramStore` or `MqttFabric` (`build`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from hashflex.agent.config import MISSING, format_loc, lookup_value, suggest_key
from hashflex.contract.signing import load_private_key, load_public_key
from hashflex.coordinator.allocation import SiteLimits
from hashflex.coordinator.lease import LeaseConfig
from hashflex.coordinator.program import ProgramRules, SiteConfig
from hashflex.coordinator.service import CoordinatorConfig

EXAMPLE = "configs/program.example.yaml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # one MQTT topic level, no wildcards
_BUCKET = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # a JetStream key-value bucket name
Seconds = Annotated[float, Field(gt=0, le=86_400)]
FilePath = Annotated[Path, Strict(False)]  # strict mode takes only Path objects; YAML gives text


class ConfigError(Exception):
    """A program config that cannot be used. The message names the file, the field and the value."""


class _Model(BaseModel):
    # allow_inf_nan=False refuses .inf/.nan/1e400 in every float field; strict: "5" is not 5, yes is not a string
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 or any(c.isspace() for c in value):
        raise ValueError("must be host:port (port 1–65535)")
    return host.strip("[]"), int(port)


class FabricSection(_Model):
    brokers: list[str] = Field(min_length=1, description="MQTT 3.1.1 brokers host:port, tried in turn.")
    nats_servers: list[str] = Field(min_length=1, description="NATS servers (JetStream) for the lease and state.")
    root: str = Field("hashflex", description="The agents' MQTT topic root.")

    @field_validator("brokers")
    @classmethod
    def _brokers(cls, value: list[str]) -> list[str]:
        for item in value:
            _host_port(item)
        return value

    @field_validator("nats_servers")
    @classmethod
    def _servers(cls, value: list[str]) -> list[str]:
        for item in value:
            scheme, sep, rest = item.partition("://")
            if not sep or scheme not in ("nats", "tls") or not rest:
                raise ValueError(f"{item!r} must be nats://host:port or tls://host:port")
            _host_port(rest)
        return value

    @field_validator("root")
    @classmethod
    def _root(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be one topic level: letters, digits, _ . -")
        return value


class SiteSection(_Model):
    id: str = Field(description="The agent's site.id (its MQTT topic level).")
    cap_kw: float = Field(gt=0, le=2_000_000, description="Its licensed cap: its worst case before it is heard.")
    excluded: bool = Field(False, description="Never dispatched; counted at its present power.")
    min_keep_share: float = Field(0.0, ge=0, le=1, description="Share of its cap it keeps whatever is asked.")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be one topic level: letters, digits, _ . -")
        return value


class LeaseSection(_Model):
    bucket: str = "hashflex_coordinator"
    ttl_s: Seconds = 6.0
    renew_every_s: Seconds | None = None
    replicas: int = Field(3, ge=1, le=5)

    @model_validator(mode="after")
    def _usable(self) -> LeaseSection:
        self.to_lease()  # its own rule (renewal + timeout inside the TTL): one message naming the fields
        return self

    def to_lease(self) -> LeaseConfig:
        return LeaseConfig(
            bucket=self.bucket, ttl_s=self.ttl_s, renew_every_s=self.renew_every_s, replicas=self.replicas
        )


class StateSection(_Model):
    bucket: str = "hashflex_program"
    replicas: int = Field(3, ge=1, le=5)


class AuditSection(_Model):
    """The coordinator's audit chain: a JetStream stream of its own per program (coordinator/audit.py)."""

    stream: str | None = Field(None, description="Stream name; default hashflex_audit_<program_id> (. as _).")
    replicas: int = Field(3, ge=1, le=5)


class MetricsSection(_Model):
    """Prometheus metrics (`coordinator.metrics`), served on every instance (the leader flag tells which acts)."""

    enabled: bool = False
    host: str = Field("127.0.0.1", min_length=1, max_length=253)
    port: int = Field(9709, ge=0, le=65535, description="0: any free port (tests).")


class RulesSection(_Model):
    """`ProgramRules` (delivery and re-dispatch); the defaults are the program core's."""

    stale_after_s: Seconds = 90.0
    min_horizon_s: Seconds = 60.0
    grace_s: float = Field(30.0, ge=0, le=86_400)
    tolerance_share: float = Field(0.02, ge=0, le=1)
    min_tolerance_w: float = Field(5000.0, ge=0, le=1e9)
    retarget_w: float = Field(10_000.0, ge=0, le=1e9)
    rebalance_gain: float = Field(
        0.05,
        ge=0,
        le=10,
        description="Re-allocate shares that still meet the level only "
        "for at least this share more of the hashrate they lose.",
    )


class ProgramConfig(_Model):
    program_id: str = Field(description="The program id in every signed program command's scope.")
    signing_key: FilePath = Field(description="The coordinator's Ed25519 private key (PEM); sites list its public key.")
    grid_public_keys: list[FilePath] = Field(min_length=1, description="Grid keys allowed to sign program commands.")
    fabric: FabricSection
    sites: list[SiteSection] = Field(min_length=1)
    lease: LeaseSection = LeaseSection()
    state: StateSection = StateSection()
    rules: RulesSection = RulesSection()
    audit: AuditSection = AuditSection()
    metrics: MetricsSection = MetricsSection()
    step_s: Seconds = 1.0
    resend_s: Seconds = 5.0
    heartbeat_s: Seconds = 10.0
    settle_s: float = Field(2.0, ge=0, le=600)
    source: FilePath | None = Field(None, exclude=True)

    @field_validator("program_id")
    @classmethod
    def _program(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be one topic level: letters, digits, _ . -")
        return value

    @model_validator(mode="after")
    def _sites_unique(self) -> ProgramConfig:
        seen: set[str] = set()
        for site in self.sites:
            if site.id in seen:
                raise ValueError(f"sites: site id {site.id!r} is listed twice")
            seen.add(site.id)
        for name, bucket in (
            ("lease.bucket", self.lease.bucket),
            ("state.bucket", self.state.bucket),
            ("audit.stream", self.audit_stream),
        ):
            if not _BUCKET.match(bucket):
                raise ValueError(f"{name} = {bucket!r}: a bucket or stream name is letters, digits, _ and - only")
        if self.lease.bucket == self.state.bucket:
            raise ValueError(f"lease.bucket and state.bucket are both {self.lease.bucket!r}: they must differ")
        return self

    @property
    def audit_stream(self) -> str:
        return self.audit.stream or f"hashflex_audit_{self.program_id.replace('.', '_')}"

    def resolve(self, path: Path) -> Path:
        """A relative key path is relative to the config file (as the agent's)."""
        return path if path.is_absolute() or self.source is None else self.source.parent / path

    @property
    def brokers(self) -> list[tuple[str, int]]:
        return [_host_port(b) for b in self.fabric.brokers]


def load_program_config(path: str | Path) -> ProgramConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (pass --config FILE)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = str(getattr(exc, "problem", None) or exc).replace("\n", " ")
        raise ConfigError(f"{path}:{where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping with program_id, signing_key, "
            f"grid_public_keys, fabric and sites (see {EXAMPLE})"
        )
    if "source" in data:
        raise ConfigError(f"{path}: source: unknown key (check its spelling; see {EXAMPLE})")
    try:
        return ProgramConfig.model_validate({**data, "source": path.resolve()})
    except ValidationError as exc:
        raise ConfigError(_format(path, exc, data)) from None


def build(cfg: ProgramConfig) -> CoordinatorConfig:
    """The service's config, the keys read (a key that cannot be read is a config error naming its field)."""
    where = cfg.source or Path("program.yaml")

    def key_error(field: str, path: Path, exc: Exception) -> ConfigError:
        why = "no such file" if isinstance(exc, FileNotFoundError) else str(exc).removeprefix(f"{path}: ")
        return ConfigError(f"{where}: {field} = {str(path)!r}: {why}")

    path = cfg.resolve(cfg.signing_key)
    try:
        signing = load_private_key(path)
    except (OSError, ValueError) as exc:
        raise key_error("signing_key", path, exc) from None
    grid = []
    for i, p in enumerate(cfg.grid_public_keys):
        path = cfg.resolve(p)
        try:
            grid.append(load_public_key(path))
        except (OSError, ValueError) as exc:
            raise key_error(f"grid_public_keys[{i}]", path, exc) from None
    sites = tuple(
        SiteConfig(s.id, s.cap_kw * 1000.0, SiteLimits(excluded=s.excluded, min_keep_share=s.min_keep_share))
        for s in cfg.sites
    )
    return CoordinatorConfig(
        program_id=cfg.program_id,
        sites=sites,
        grid_keys=tuple(grid),
        signing_key=signing,
        root=cfg.fabric.root,
        step_s=cfg.step_s,
        resend_s=cfg.resend_s,
        heartbeat_s=cfg.heartbeat_s,
        settle_s=cfg.settle_s,
        rules=ProgramRules(**cfg.rules.model_dump()),
    )


def load(path: str | Path) -> tuple[ProgramConfig, CoordinatorConfig]:
    """The file validated and every key it names read: what `coordinator check` and `coordinator run` start with."""
    cfg = load_program_config(path)
    return cfg, build(cfg)


# ------------------------------------------------------------------------------------------------ errors
def _format(path: Path, exc: ValidationError, data: Any) -> str:
    """One line per problem: `field = value: what is wrong`; a single problem is a single line after the file."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = format_loc(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key{suggest_key(ProgramConfig, loc)} (check its spelling; see {EXAMPLE})")
        elif err["type"] == "missing":
            lines.append(f"{where}: required field is missing")
        else:
            value = lookup_value(data, loc)
            if not loc or value is MISSING or isinstance(value, dict):
                # a cross-field rule on a section: its message names the fields already
                lines.append(msg if not loc or msg.startswith(where) else f"{where}: {msg}")
            else:
                lines.append(f"{where} = {value!r}: {msg}")
    if len(lines) == 1:
        return f"{path}: {lines[0]}"
    return f"{path}: {len(lines)} errors in the program config: " + "; ".join(lines)
