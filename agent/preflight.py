"""The checks a site config must pass before the agent touches a miner: one path for `hashflex config check`
(the unit's ExecStartPre) and `hashflex run`, so the first never passes what the second refuses (issue 16).

Past the schema (`agent.config.load_config`): every file the config names must exist and parse (grid and
operator keys, the broker password, TLS files, miner credentials, the audit signing key), the control socket's
group must exist and be one this user can give the socket, the metrics port must be free, and the state and
socket folders must be usable. Each error is one line naming the config file, the field, the value and what to
do. Things that sort themselves out (a state folder not created yet) are warnings.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from hashflex.agent.config import AgentConfig, ConfigError
from hashflex.agent.core.addresses import expand
from hashflex.contract.signing import load_private_key, load_public_key


@dataclass
class Findings:
    source: str  # the config file: every error starts with it, so a journal line stands on its own
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors.append(f"{self.source}: {message}")

    def attempt(self, what: str, action: Callable[[], object], fix: str) -> None:
        try:
            action()
        except FileNotFoundError as exc:
            self.error(f"{what} = {exc.filename}: no such file; {fix}")
        except PermissionError as exc:
            self.error(f"{what} = {exc.filename}: permission denied; make it readable by the agent's user")
        except (OSError, ValueError) as exc:
            self.error(f"{what}: {exc}; {fix}")
        except ConfigError as exc:  # names the file and what to do itself
            self.error(f"{what}: {exc}")


class PreflightError(ConfigError):
    """The config loads but cannot be run; one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _readable_file(path: Path) -> None:
    with path.open("rb"):
        pass


def _usable_dir(path: Path, what: str, findings: Findings) -> None:
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            findings.error(f"{what} = {path}: not writable by this user; give the agent's user write access")
        return
    if path.exists():
        findings.error(f"{what} = {path}: exists and is not a folder; move it away or set {what} elsewhere")
        return
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        findings.warnings.append(f"{what} {path} does not exist yet (systemd creates it for the unit)")
    else:
        findings.warnings.append(f"{what} {path} does not exist yet; the agent will create it")


def running_agent(cfg: AgentConfig) -> str | None:
    """The pid of the agent running on this config's state folder (it holds `agent.lock`), else None."""
    try:
        fd = os.open(cfg.state_path / "agent.lock", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    except OSError:
        return None
    finally:
        os.close(fd)  # drops a shared lock this check took
    return None


def metrics_bind_problem(cfg: AgentConfig, exc: OSError) -> str:
    """The one line for a metrics endpoint that cannot listen (the check below, and the agent's own bind)."""
    where = f"{cfg.source}: metrics.port = {cfg.metrics.host}:{cfg.metrics.port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{where}: the port is in use by another program (`ss -ltnp 'sport = :{cfg.metrics.port}'` shows "
            "which): stop it, or set another metrics.port (0 picks a free one)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {cfg.metrics.host} is not an address of this machine: set metrics.host (e.g. 127.0.0.1)"
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges): set metrics.port above 1024"
    return f"{where}: cannot listen: {exc.strerror or exc}: set another metrics.host or metrics.port"


def _check_metrics_port(cfg: AgentConfig, findings: Findings) -> None:
    if not cfg.metrics.enabled or cfg.metrics.port == 0:
        return
    try:
        infos = socket.getaddrinfo(cfg.metrics.host, cfg.metrics.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        findings.error(
            f"metrics.host = {cfg.metrics.host!r}: not a known host name ({exc.strerror}): set "
            "metrics.host to an address of this machine, e.g. 127.0.0.1"
        )
        return
    family, kind, proto, _name, address = infos[0]
    probe = socket.socket(family, kind, proto)
    try:
        # as prometheus_client's server binds (SO_REUSEADDR): a port in TIME_WAIT is free, one listened on is not
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
    except OSError as exc:
        pid = running_agent(cfg) if exc.errno == errno.EADDRINUSE else None
        if pid is not None:  # `config check` next to the running agent: the port is its own
            findings.warnings.append(f"metrics port {cfg.metrics.port} is in use by the running agent (pid {pid})")
        else:
            findings.errors.append(metrics_bind_problem(cfg, exc))  # names the file itself
    finally:
        probe.close()


def _check_socket_group(cfg: AgentConfig, findings: Findings) -> None:
    group = cfg.control_socket.group
    if group is None:
        return
    where = f"control_socket.group = {group!r}"
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        findings.error(
            f"{where}: no such group on this machine: create it (`sudo systemd-sysusers`, or "
            f"`sudo groupadd {group}`) or remove control_socket.group"
        )
        return
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        findings.error(
            f"{where}: this user (uid {os.geteuid()}) is not in that group, so it cannot give "
            "the socket to it: run the agent as a member, or remove control_socket.group and add "
            "operators to the agent's own group"
        )


def _check_meter_host(cfg: AgentConfig, findings: Findings) -> None:
    """The site meter's address must be one this machine can look up. Whether the meter answers is not checked
    here: one that does not is a stale meter at run time (alarmed, the agent falls back), not a config error."""
    meter = cfg.site.meter
    if meter is None:
        return
    try:
        socket.getaddrinfo(meter.host, meter.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        findings.error(
            f"site.meter.host = {meter.host!r}: not a known host name ({exc.strerror}): set the meter's "
            "(or its Modbus gateway's) address, e.g. 10.0.0.50"
        )


def preflight(cfg: AgentConfig) -> Findings:
    """Everything `hashflex run` would refuse later, found now. No miner, broker or store is touched."""
    findings = Findings(str(cfg.source) if cfg.source else "(config)")
    key_fix = "put the key there (PEM or raw base64 Ed25519) or correct the path"
    for what, keys in (
        ("grid.public_keys", cfg.grid.public_keys),
        ("grid.operator_public_keys", cfg.grid.operator_public_keys),
    ):
        for key in keys:
            findings.attempt(what, partial(load_public_key, cfg.resolve(key)), key_fix)
    if cfg.mqtt.enabled:
        if cfg.mqtt.password_file is not None:
            findings.attempt(
                "mqtt.password_file",
                partial(_readable_file, cfg.resolve(cfg.mqtt.password_file)),
                "write the broker password there or correct the path",
            )
        elif cfg.mqtt.username and not cfg.mqtt_password():  # the unit's empty fallback reads as ""
            findings.warnings.append(
                "mqtt.username is set but no password was found (mqtt.password_file or the systemd credential "
                "mqtt-password)"
            )
        if cfg.mqtt.tls is not None:
            tls = cfg.mqtt.tls
            for name, path in (("ca_file", tls.ca_file), ("cert_file", tls.cert_file), ("key_file", tls.key_file)):
                if path is not None:
                    findings.attempt(
                        f"mqtt.tls.{name}",
                        partial(_readable_file, cfg.resolve(path)),
                        "put the file there or correct the path",
                    )
    findings.attempt(
        "miners.credentials_file",
        cfg.credentials,
        "write the miners' passwords there (`family: password` lines) or correct the path",
    )
    if cfg.audit.sign_daily_head:
        if cfg.audit.signing_key is None:
            findings.error("audit.sign_daily_head is on but audit.signing_key is not set; set it or turn signing off")
        else:
            key_path = cfg.resolve(cfg.audit.signing_key)
            findings.attempt(
                "audit.signing_key",
                partial(load_private_key, key_path),
                "create it with `hashflex keygen --out FILE` or correct the path",
            )
    if not expand(cfg.miners.addresses):
        findings.warnings.append("miners.addresses is empty: the agent will control no miner")
    _check_socket_group(cfg, findings)
    _check_metrics_port(cfg, findings)
    _check_meter_host(cfg, findings)
    _usable_dir(cfg.state_path, "state_dir", findings)
    if cfg.control_socket.path is not None:
        _usable_dir(cfg.socket_path.parent, "control_socket.path folder", findings)
    return findings


def starting_errors(cfg: AgentConfig) -> list[str]:
    """The preflight errors `hashflex run` refuses to start on. A state folder it cannot write is not one of them:
    the agent waits for its store (a read-only or full file system comes back; see `agent.app.open_store`), where
    `config check` reports it, so that ExecStartPre stops a start that would only wait."""
    findings = preflight(cfg)
    waited_for = f"{findings.source}: state_dir = "
    return [e for e in findings.errors if not e.startswith(waited_for)]
