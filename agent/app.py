"""The agent process: `hashflex run --config FILE`.

Start-up, in this order (systemd hears READY=1 only at the end, so `Type=notify` means "state loaded, fleet read"):
config (any error exits non-zero before a miner is touched) → logging → the single-instance lock on state_dir (a
second agent exits here) → store (a corrupt store is moved aside and the agent starts SAFE: curtailed to the
fail-safe level, with an alarm, until an operator resumes; a store that cannot be used now — full, locked,
read-only — is waited for, never moved) → miner
identities from the store, discovery only for addresses it has never identified → first sweep → restore control
state (a dispatch that expired while the agent was down is closed as expired, not applied) → READY=1.

Then one TaskGroup: the controller (the one writer), the sweep loop, the MQTT link (if enabled), the control socket,
the telemetry publisher. The metrics endpoint runs on its own thread. SIGTERM/SIGINT stop it cleanly: the link
publishes `offline`, systemd hears STOPPING=1, the audit trail gets `agent_stop`; miners are left as they are
unless control.on_shutdown says otherwise (a restart must not cause a surge).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hashflex.agent import __version__
from hashflex.agent.config import AgentConfig, ConfigError
from hashflex.agent.core.addresses import expand
from hashflex.agent.core.audit import AuditKind
from hashflex.agent.core.timefmt import iso_ms as iso
from hashflex.agent.io.control_socket import ControlServer
from hashflex.agent.io.sdnotify import SdNotifier
from hashflex.agent.io.store import StoreError, StoreUnavailable
from hashflex.agent.logging import bind_context, configure_logging, get_logger
from hashflex.agent.preflight import PreflightError, metrics_bind_problem, starting_errors
from hashflex.agent.protocol import Channel
from hashflex.agent.runtime import crashpoints
from hashflex.agent.runtime.actuator import Actuator
from hashflex.agent.runtime.assembly import build_controller
from hashflex.agent.runtime.cancel import raise_if_cancelled
from hashflex.agent.runtime.clock import Clock, make_clock
from hashflex.agent.runtime.controller import Controller
from hashflex.agent.runtime.events import EventLog
from hashflex.agent.runtime.housekeeping import Housekeeping
from hashflex.agent.runtime.metering import SiteMeterPort
from hashflex.agent.runtime.persist import WriteBehind
from hashflex.agent.runtime.readout import SiteReader
from hashflex.agent.runtime.service import CommandService
from hashflex.contract.reply import UNAVAILABLE, Reply
from hashflex.contract.signing import load_private_key, load_public_key
from hashflex.contract.status import StatusDoc

if TYPE_CHECKING:
    from hashflex.drivers.meter_modbus import MeterRefusal, ModbusMeter

log = get_logger("agent")

MIN_SWEEP_GAP_S = 0.25  # wall seconds between sweeps, even when the controller asks for confirmation early


class _Stop(Exception):
    """Raised inside the task group to end it (a signal arrived)."""


def load_keys(cfg: AgentConfig) -> tuple[list[Ed25519PublicKey], list[Ed25519PublicKey]]:
    """The grid and operator public keys; a key that cannot be read is a config error."""

    def read(paths: list[Path], field: str) -> list[Ed25519PublicKey]:
        keys = []
        for p in paths:
            path = cfg.resolve(p)
            try:
                keys.append(load_public_key(path))
            except FileNotFoundError:
                raise ConfigError(f"{field}: {path}: no such file") from None
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{field}: {exc}") from None
        return keys

    return read(cfg.grid.public_keys, "grid.public_keys"), read(
        cfg.grid.operator_public_keys, "grid.operator_public_keys"
    )


def load_signing_key(cfg: AgentConfig) -> Ed25519PrivateKey | None:
    """The site's key for signing daily chain heads, when `audit.sign_daily_head` is on."""
    if not cfg.audit.sign_daily_head:
        return None
    if cfg.audit.signing_key is None:
        raise ConfigError("audit.sign_daily_head is on but audit.signing_key is not set")
    path = cfg.resolve(cfg.audit.signing_key)
    try:
        return load_private_key(path)
    except FileNotFoundError:
        raise ConfigError(f"audit.signing_key: {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"audit.signing_key: {exc}") from None


def check_time_scale(cfg: AgentConfig, time_scale: float | None) -> None:
    """A scaled clock shortens every safety timer: simulation only, so only loopback miners."""
    if time_scale is None or time_scale == 1.0:
        return
    if not time_scale > 0:
        raise ConfigError(f"--time-scale must be > 0, got {time_scale}")
    for ip in expand(cfg.miners.addresses):
        if not ipaddress.IPv4Address(ip).is_loopback:
            raise ConfigError(
                f"--time-scale is for runs against the simulator only, and {ip} is not a loopback address"
            )
    meter = cfg.site.meter
    if meter is not None and not _is_loopback(meter.host):  # the simulated site serves its meter on loopback too
        raise ConfigError(
            f"--time-scale is for runs against the simulator only, and site.meter.host {meter.host} is not a "
            "loopback address"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _SiteTime:
    """The agent's clock as the meter adapter reads time (`monotonic()`): its readings' times and staleness are
    then on the controller's clock (a scaled one in a simulation run), comparable with every other time it keeps."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def monotonic(self) -> float:
        return self.clock.time()


def site_meter(
    cfg: AgentConfig, clock: Clock, on_fault: Callable[[MeterRefusal], None] | None = None
) -> ModbusMeter | None:
    """The Modbus meter adapter for site.meter (started by the caller), or None without one. Imports pymodbus."""
    m = cfg.site.meter
    if m is None:
        return None
    from hashflex.drivers.meter_maps import MeterBounds  # noqa: PLC0415
    from hashflex.drivers.meter_modbus import MeterConfig, ModbusMeter  # noqa: PLC0415  (imports pymodbus)

    max_kw = m.max_kw if m.max_kw is not None else 2.0 * cfg.site.cap_kw  # more than that is garbage, not a site
    mcfg = MeterConfig(
        host=m.host,
        port=m.port,
        unit=m.unit,
        map=m.map,
        sunspec_model=m.sunspec_model,
        bounds=MeterBounds(max_w=max_kw * 1000.0),
        poll_s=m.poll_s,
        stale_after_s=m.stale_after_s,
        frozen_after_s=m.frozen_after_s,
        # frequency response reads the frequency register alone, this often (wall s), between full readings
        hz_poll_s=None if cfg.frequency_response is None else cfg.frequency_response.poll_s,
    )
    return ModbusMeter(mcfg, clock=_SiteTime(clock), on_fault=on_fault)


def configured_addresses(cfg: AgentConfig) -> list[str]:
    excluded = set(expand(cfg.miners.exclude))
    return [ip for ip in expand(cfg.miners.addresses) if ip not in excluded]


LOOP_BUSY_TIMEOUT_MS = 5  # the control loop never waits longer than this for another process's lock: it retries
STORE_RETRY_MAX_S = 30.0  # the longest pause between attempts to open a state store that cannot be used now


class AlreadyRunning(StoreError):
    """Another agent runs on this state directory (its store is in use)."""


def take_instance_lock(state_dir: Path) -> int:
    """One agent per state directory: an exclusive lock on `state_dir/agent.lock`, held (by the returned open
    descriptor) for the life of the process and released by the kernel when it ends, however it ends. Taken
    before the store is opened, so a second `hashflex run` on the same config touches nothing."""
    import fcntl  # noqa: PLC0415

    path = state_dir / "agent.lock"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        try:  # a read-only file system: an existing lock file can still be locked
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            raise StoreUnavailable(f"{path}: cannot take the agent's lock: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(
            f"another hashflex agent (pid {holder}) is running on {state_dir}; stop it first"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):  # who holds it, for the message a second agent gives
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def open_store(cfg: AgentConfig) -> tuple[Any, str | None]:
    """The store, and why the agent must start safe (None when nothing says so).

    Only a damaged file (StoreCorrupt) is moved aside; a store that cannot be used now (full, locked, read-only,
    I/O errors) raises StoreUnavailable and is left exactly as it is. A safe start is remembered in a marker file
    next to the database before the damaged file is moved, and every start reads it: the agent starts safe until
    an operator runs `hashflex resume`, whatever happens to the new database in between."""
    from hashflex.agent.io.store import Store, StoreCorrupt, pending_safe_start, remember_safe_start  # noqa: PLC0415

    path = cfg.db_path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        store = Store.open(path, retention_days=cfg.audit.retention_days)
    except StoreCorrupt as exc:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        moved = path.with_name(f"{path.name}.corrupt-{stamp}")
        why = f"the state store was corrupt ({exc}); it was moved to {moved.name}"
        remember_safe_start(path.parent, why, time.time())
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(path) + suffix)
            if src.exists():
                os.replace(src, Path(str(moved) + suffix))
        log.error("state store corrupt; moved aside, starting safe", error=str(exc), moved_to=str(moved))
        return Store.open(path, retention_days=cfg.audit.retention_days), why
    return store, pending_safe_start(path.parent)


class WaitingForStore:
    """The control socket's handler while start-up waits for a state store that cannot be used now (locked, full,
    read-only): every request is refused as `unavailable` with the reason, so `hashflex status` says why the agent
    does not control yet instead of finding a dead socket. Nothing is applied or stored: there is nothing to apply
    it to yet. (`ping` is refused too: the agent is not ready.)"""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def handle(self, verb: str, payload: bytes, channel: Channel, *, retained: bool = False) -> Reply:
        request_id = None
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            doc = json.loads(payload)
            request_id = doc.get("id") if isinstance(doc.get("id"), str) else None
        return Reply.error(
            request_id, UNAVAILABLE, f"the agent is not controlling yet: waiting for the state store: {self.reason}"
        )


class Agent:
    """Everything one agent process runs, wired together. `run()` until stopped."""

    def __init__(self, cfg: AgentConfig, *, time_scale: float | None = None, time_origin: float | None = None) -> None:
        self.cfg = cfg
        self.clock: Clock = make_clock(time_scale, time_origin)
        self.time_scale = time_scale
        self.notifier = SdNotifier()
        self.stop_event = asyncio.Event()
        self.started_at = self.clock.time()
        self.store: Any = None
        self._instance_lock: int | None = None  # the descriptor holding state_dir/agent.lock (see take_instance_lock)
        self.fleet: Any = None
        self.meter: ModbusMeter | None = None  # with site.meter
        self.controller: Controller | None = None
        self.reader: SiteReader | None = None  # the read verbs' answers, the telemetry's and the metrics' rows
        self.link: Any = None
        self.metrics: Any = None
        self.server: ControlServer | None = None
        self._waiting: WaitingForStore | None = None  # the socket's answer while the store is waited for
        self.sweep_request = asyncio.Event()
        self.sweeps = 0
        self.left_as = ""  # what the site is left with at stop (site_left_as), said once the agent has stopped

    # --------------------------------------------------------------------------------------------- start-up
    async def start(self) -> None:
        cfg = self.cfg
        grid_keys, operator_keys = load_keys(cfg)
        signing_key = load_signing_key(cfg)
        from hashflex.agent.runtime.fleet import Fleet, driver_from_config  # noqa: PLC0415  (imports pyasic)

        if crashpoints.armed():
            log.warning(
                "TEST ONLY: a crash point is armed; this agent will SIGKILL itself",
                point=crashpoints.armed(),
                env=crashpoints.ENV,
            )
        self.store, safe_reason = await self._open_store()
        self.store.set_busy_timeout(LOOP_BUSY_TIMEOUT_MS)  # never hold the loop for another process's lock
        # the agent's own records go through the write-behind: a store that refuses writes does not stop it
        self.persist = persist = WriteBehind(self.store)
        persist.audit(
            AuditKind.AGENT_START,
            {"version": __version__, "pid": os.getpid(), "time_scale": self.time_scale, "safe_start": safe_reason},
            self.clock.time(),
        )
        driver = driver_from_config(cfg)
        # the meter polls from now on, so its first reading is in by the first tick (a refused one asks for a tick)
        self.meter = site_meter(cfg, self.clock, on_fault=lambda _refusal: self._meter_fault())
        if self.meter is not None:
            self.meter.start()
            log.info(
                "site meter",
                meter=self.meter.name,
                map=cfg.site.meter and str(getattr(cfg.site.meter.map, "name", cfg.site.meter.map)),
            )

        def save_identities(identities: list[Any]) -> None:
            persist.call("save_identities", identities)

        self.fleet = fleet = Fleet.from_config(
            driver, cfg.polling, clock=self.clock.time, unknown_w=cfg.miners.unknown_w, on_identified=save_identities
        )
        wanted = configured_addresses(cfg)
        wanted_set = set(wanted)
        cached = [i for i in self.store.load_identities() if i.ip in wanted_set]
        fleet.attach_all(cached)
        missing = [ip for ip in wanted if ip not in fleet]
        if missing:
            self.notifier.extend_timeout(max(60.0, len(missing) / 50))
            log.info("discovering miners", addresses=len(missing), cached=len(cached))
            await fleet.discover(missing)
        self.notifier.extend_timeout(max(60.0, len(fleet) / 100))
        await self._sweep_once()

        self.events = events = EventLog(self.clock.time)
        from hashflex.agent.io.metrics import Metrics  # noqa: PLC0415
        from hashflex.agent.runtime.health import gateway_health  # noqa: PLC0415

        actuator = Actuator(
            fleet.handle,
            concurrency=cfg.polling.concurrency,
            command_timeout_s=cfg.polling.command_timeout_s,
            retries_per_command=cfg.control.retry_budget,
        )
        grid_link = cfg.mqtt.enabled and bool(grid_keys)
        meter: SiteMeterPort | None = self.meter
        self.metrics = Metrics(
            status_provider=self._status_doc,
            miners_provider=self._miner_rows if cfg.metrics.per_miner else None,
        )
        hold_s = self.clock.to_wall(cfg.polling.stale_after_s) / 2  # never long enough for readings to go stale
        self.controller = ctl = build_controller(
            cfg,
            fleet=fleet,
            store=self.store,
            actuator=actuator,
            clock=self.clock,
            events=events,
            notifier=self.notifier,
            grid_link=grid_link,
            gateway_health=lambda: gateway_health(cfg.state_path, cfg.audit.disk_alarm_mb),
            meter=meter,
            persist=persist,
            metrics=self.metrics,
            sweep_request=self.sweep_request,
            on_actuating=lambda busy: fleet.hold(hold_s) if busy else fleet.release(),
        )
        self.reader = reader = SiteReader(ctl, ctl.publisher)
        ctl.restore(safe_start=safe_reason)
        self.housekeeping = Housekeeping(self.store, self.clock, cfg.site.id, signing_key)
        self.service = CommandService(
            cfg,
            ctl,
            events,
            reader=reader,
            store=self.store,
            clock=self.clock,
            grid_keys=grid_keys,
            operator_keys=operator_keys,
            metrics=self.metrics,
        )
        if cfg.mqtt.enabled:
            from hashflex.agent.io.mqtt import MqttLink  # noqa: PLC0415
            from hashflex.agent.runtime.flex_publish import FlexSink  # noqa: PLC0415

            # heartbeats go through the service, which passes on only signed, fresh ones for this site
            self.link = MqttLink(
                cfg,
                self.service,
                self.service,
                self.info,
                clock=self.clock.time,
                authentic=self.service.authentic,
                on_message=self.metrics.count_mqtt_message,
            )
            events.subscribe(self.link.publish_event)
            ctl.publisher.add_sink(self.link.publish_state)
            # the site's flexibility for the program coordinator, retained on …/flex (on change, at least every 30 s)
            ctl.publisher.add_sink(FlexSink(ctl, self.link.publish_flex))
            ctl.publisher.show_broker(self.link.status)
        if self.server is not None:  # answering since the wait for the store (`_say_waiting`): now for real
            self.server.hand_over(self.service)
        else:
            self.server = ControlServer(self.cfg.socket_path, self.service, group=cfg.control_socket.group)
            await self.server.start()
        if cfg.metrics.enabled:
            try:
                self.metrics_port = self.metrics.start_http(cfg.metrics.host, cfg.metrics.port)
            except OSError as exc:  # taken since the preflight check: the same one line, not a traceback
                raise ConfigError(metrics_bind_problem(cfg, exc)) from None
        ctl.tick()  # the first decision is made now, on the restored state and the first sweep
        # The fleet (a handle, a pyasic object and a reading per miner) and the loaded modules live as long as the
        # process: move them out of the collector's sight, or every full collection walks all of them again (at
        # 10,000 miners that made a command fan-out ~1.5x slower than pyasic alone).
        gc.collect()
        gc.freeze()
        snap, target_kw = fleet.latest(), reader.status()["target_kw"]
        self.notifier.ready(f"ready: {len(snap.miners)} miners, {snap.unreachable} unreachable, target {target_kw} kW")
        log.info(
            "agent ready",
            version=__version__,
            miners=len(snap.miners),
            unreachable=snap.unreachable,
            socket=str(self.cfg.socket_path),
            mqtt=cfg.mqtt.enabled,
            time_scale=self.time_scale,
        )

    async def _open_store(self) -> tuple[Any, str | None]:
        """open_store, waited for while the store cannot be used now (full, locked, read-only, I/O errors): the file
        is never moved for that, no miner is touched meanwhile (they keep what they were last told), and the wait
        is alarmed in the log and the systemd status. In a thread: a locked file holds the open for its busy
        timeout, and a stop signal must still be heard."""
        delay = 1.0
        while True:
            try:
                if self._instance_lock is None:  # before the store: a second agent touches nothing
                    self._instance_lock = take_instance_lock(self.cfg.state_path)
                return await asyncio.to_thread(open_store, self.cfg)
            except StoreUnavailable as exc:
                message = f"the state store cannot be used now ({exc}); not starting control, retry in {delay:g} s"
                log.error("alarm", alarm="store_unavailable", message=message)
                self.notifier.status(f"waiting for the state store: {exc}")
                await self._say_waiting(str(exc))
                self.notifier.extend_timeout(delay + 60.0)
                await asyncio.sleep(delay)
                delay = min(2 * delay, STORE_RETRY_MAX_S)

    async def _say_waiting(self, reason: str) -> None:
        """Answer on the control socket while the store is waited for (see WaitingForStore); only once this agent
        holds the state directory's lock (a second agent must not take the socket). Best effort, tried once: when
        the socket cannot be taken now, the start after the store opens takes it (or reports why)."""
        if self._waiting is not None:
            self._waiting.reason = reason
            return
        self._waiting = WaitingForStore(reason)
        if self._instance_lock is None or self.server is not None:
            return
        server = ControlServer(self.cfg.socket_path, self._waiting, group=self.cfg.control_socket.group)
        try:
            await server.start()
        except Exception as exc:  # ControlSocketError, OSError
            log.warning("control socket not taken while waiting for the state store", error=str(exc))
            return
        self.server = server

    def _meter_fault(self) -> None:
        """A reading the meter adapter refused: tick early, so the alarm and any fallback are not a tick late."""
        if self.controller is not None:
            self.controller.trigger()

    def info(self) -> dict[str, Any]:
        ctl = self.controller
        return {
            "version": __version__,
            "site_id": self.cfg.site.id,
            "started_at": iso(self.started_at),
            "cap_kw": self.cfg.site.cap_kw,
            "circuits": [c.id for c in self.cfg.site.circuits],
            "miners": len(self.fleet) if self.fleet is not None else 0,
            "target_kw": None if ctl is None or ctl.target is None else ctl.target.kw,
        }

    def _status_doc(self) -> StatusDoc | None:
        """The last tick's status doc, for the metrics (none before the first tick)."""
        return None if self.controller is None else self.controller.publisher.doc or None

    def _miner_rows(self) -> list[dict[str, Any]]:
        assert self.reader is not None
        return self.reader.miner_rows(None, "ip", False, None)

    # --------------------------------------------------------------------------------------------- loops
    async def _sweep_once(self) -> None:
        snap = await self.fleet.sweep()
        self.sweeps += 1
        if self.metrics is not None:
            self.metrics.observe_sweep(snap.sweep_s)
        if self.controller is not None:
            self.controller.on_snapshot(snap)

    async def sweep_loop(self) -> None:
        interval = self.clock.to_wall(self.cfg.polling.interval_s)
        # a floor of MIN_SWEEP_GAP_S wall seconds, or as many site seconds under a scaled clock: at --time-scale
        # 1000 a wall floor would be 250 site seconds between readings, longer than miners take to ramp, and
        # energy would be integrated over changes it never saw
        min_gap = min(MIN_SWEEP_GAP_S, self.clock.to_wall(MIN_SWEEP_GAP_S))
        while True:
            started = time.monotonic()
            await self._sweep_once()
            raise_if_cancelled()  # one that pyasic's wait_for swallowed (see agent/runtime/cancel.py)
            wait = max(min_gap, interval - (time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self.sweep_request.wait()
                # asked early: still leave the miners a moment to act on what they were told
                await asyncio.sleep(max(0.0, min_gap - (time.monotonic() - started)))
            self.sweep_request.clear()

    async def telemetry_loop(self) -> None:
        """Site figures on …/telemetry (lossy), and per-miner detail when configured."""
        assert self.reader is not None
        assert self.link is not None
        interval = self.clock.to_wall(self.cfg.mqtt.telemetry_interval_s)
        detail = self.cfg.mqtt.miner_detail_interval_s
        detail_wall = None if detail is None else self.clock.to_wall(detail)
        last_detail = 0.0
        while True:
            await asyncio.sleep(interval)
            s = self.reader.status()
            self.link.publish_telemetry(
                {
                    k: s.get(k)
                    for k in (
                        "ts",
                        "target_kw",
                        "cap_kw",
                        "power_kw",
                        "power_kw_measured",
                        "power_kw_estimated",
                        "power_kw_worst_case",
                        "hashrate_ths",
                        "miners",
                    )
                }
            )
            if detail_wall is not None and time.monotonic() - last_detail >= detail_wall:
                last_detail = time.monotonic()
                for row in self.reader.miner_rows(None, "ip", False, None):
                    self.link.publish_miner(row["ip"], row)

    async def _wait_for_stop(self) -> None:
        await self.stop_event.wait()
        raise _Stop

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop_event.set)
        try:
            if not await self._start_or_stop():
                return 0
            assert self.controller is not None
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self.controller.run(), name="controller")
                    tg.create_task(self.sweep_loop(), name="sweep")
                    tg.create_task(self.housekeeping.run(), name="housekeeping")
                    if self.link is not None:
                        tg.create_task(self.link.run(), name="mqtt")
                        tg.create_task(self.telemetry_loop(), name="telemetry")
                    tg.create_task(self._wait_for_stop(), name="signals")
            except* _Stop:
                pass
        finally:
            await self.close()
        return 0

    async def _start_or_stop(self) -> bool:
        """Start up, unless a signal arrives first (a long discovery must not hold off a stop). True = started."""
        starting = asyncio.create_task(self.start(), name="start")
        stopping = asyncio.create_task(self.stop_event.wait(), name="stop-during-start")
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            stopping.cancel()
            starting.result()  # start-up errors propagate
            return True
        log.info("stop requested during start-up")
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return False

    async def close(self) -> None:
        log.info("agent stopping")
        self.notifier.stopping("stopping")
        shutdown_failed = False
        if self.controller is not None:
            try:
                await self.controller.commands.shutdown(self.cfg.control.on_shutdown, self.controller.fleet.latest())
            except Exception:
                shutdown_failed = True
                log.exception("on_shutdown commands failed")
        self.left_as = site_left_as(
            self.cfg.control.on_shutdown, controlled=self.controller is not None, failed=shutdown_failed
        )
        if self.server is not None:
            await self.server.close()
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.stop_http()
        if self.fleet is not None:
            with contextlib.suppress(Exception):
                await self.fleet.aclose()
        if self.meter is not None:
            with contextlib.suppress(Exception):
                await self.meter.stop()
        service: CommandService | None = getattr(self, "service", None)
        if service is not None:
            service.refusals.flush()  # the refusals counted since the last record (never raises)
        if self.store is not None:
            persist: WriteBehind | None = getattr(self, "persist", None)
            with contextlib.suppress(Exception):
                if persist is None:
                    self.store.append_audit(AuditKind.AGENT_STOP, {"pid": os.getpid()}, self.clock.time())
                else:
                    persist.audit(AuditKind.AGENT_STOP, {"pid": os.getpid()}, self.clock.time())
                    if not persist.flush(force=True):
                        log.error(
                            "state store still refuses writes at stop; queued records lost",
                            records=persist.backlog,
                            error=persist.error,
                        )
            with contextlib.suppress(Exception):
                self.store.close()
        log.info("agent stopped", left=self.left_as)
        if _isatty(sys.stderr):  # someone pressed Ctrl-C at a terminal: tell them in a sentence, not only a log field
            print(f"hashflex stopped: {self.left_as}", file=sys.stderr, flush=True)


def site_left_as(on_shutdown: str, *, controlled: bool, failed: bool = False) -> str:
    """What the site is left with once the agent has stopped (control.on_shutdown), in words for the operator: no
    cap is held any more, whatever the miners were told."""
    if not controlled:
        return "miners left as they are (the agent stopped before it controlled them); hashflex holds no cap"
    if failed:
        return (
            f"on_shutdown {on_shutdown!r} failed part-way: miners may be left as they are; hashflex no longer "
            "holds the cap"
        )
    if on_shutdown == "sleep":
        return "miners put to sleep (those that could be reached); hashflex no longer holds the cap"
    if on_shutdown == "wake":
        return "miners woken (those that could be reached), free to draw full power; hashflex no longer holds the cap"
    return "miners left as they are; hashflex no longer holds the cap"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def run(cfg: AgentConfig, *, time_scale: float | None = None, time_origin: float | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT. Config problems raise ConfigError before any miner is touched."""
    check_time_scale(cfg, time_scale)
    # the checks `hashflex config check` makes, before logging is set up or a miner is contacted
    errors = starting_errors(cfg)
    if errors:
        raise PreflightError(errors)
    configure_logging(cfg.logging)
    bind_context(site_id=cfg.site.id)
    if not cfg.mqtt.enabled:
        # said once, at start: a site without a grid link is a choice (no `mqtt:` section), not a fault to repeat
        log.info(
            "no grid link",
            why="the config has no mqtt section (or mqtt.enabled: false)",
            follows="site.cap_kw, the schedule and the local CLI",
            config=str(cfg.source),
        )

    async def main() -> int:
        return await Agent(cfg, time_scale=time_scale, time_origin=time_origin).run()

    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(main())
    return uvloop.run(main())
