"""Prometheus metrics: `hashflex_` prefix, base units (watts, joules, seconds, bytes, ratios).

Two kinds of series:
- events the runtime counts as they happen (counters, histograms): `Metrics.observe_tick(...)` and friends;
- the site's picture (gauges), read at SCRAPE time from `status_provider()` (the STATUS DOC) and, if enabled,
  `miners_provider()` by a custom Collector, instead of updating thousands of gauges every tick. A miner that
  leaves the site is simply absent from the next scrape, so its series go away (zigbee2mqtt does the same).

Providers run on the HTTP server's thread: they must return an already-built value (e.g. the latest status
doc the controller published), never walk state the event loop is mutating.

Label values must be short codes from a closed set (`op="set_power"`, `result="ok"`, `reason="bad_signature"`),
never messages or ids: each distinct value is a new series.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hashflex.agent import __version__
from hashflex.agent.core import timefmt
from hashflex.agent.core.energy import SOURCES
from hashflex.agent.logging import get_logger
from hashflex.contract.status import StatusDoc
from hashflex.contract.vocabulary import MINER_STATES, TARGET_SOURCES  # every state, every arbitration input

StatusProvider = Callable[[], StatusDoc | None]
MinersProvider = Callable[[], Iterable[Mapping[str, Any]]]

BROKER_STATES = ("connected", "connecting", "disconnected", "disabled")
FAILSAFE_RELEASES = ("grid_command", "next_heartbeat", "heartbeat")  # agent.core.failsafe.release
ENERGY_SOURCES = SOURCES  # of a minute's site energy (agent.core.energy): metered, miners, fallback
DEFAULT_PORT = 9708
_MIB = 1024 * 1024

log = get_logger("metrics")


class Metrics:
    """The agent's metrics: one per process, on its own registry (not prometheus_client's global one)."""

    def __init__(
        self,
        status_provider: StatusProvider | None = None,
        miners_provider: MinersProvider | None = None,
        *,
        version: str = __version__,
        commit: str | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.version = version
        self.commit = commit or os.environ.get("HASHFLEX_COMMIT", "unknown")
        self.status_provider = status_provider
        self.miners_provider = miners_provider
        r = self.registry
        self.tick_duration = Histogram(
            "hashflex_tick_duration_seconds",
            "Duration of one control tick.",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.sweep_duration = Histogram(
            "hashflex_sweep_duration_seconds",
            "Duration of one telemetry sweep of the fleet.",
            registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
        )
        self.command_latency = Histogram(
            "hashflex_command_latency_seconds",
            "Latency of one miner control command, by operation.",
            ["op"],
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30),
        )
        self.commands = Counter(
            "hashflex_commands", "Miner control commands sent, by operation and result.", ["op", "result"], registry=r
        )
        self.dispatches = Counter(
            "hashflex_dispatches",
            "Dispatches by outcome (accepted, rejected, completed, ...).",
            ["result"],
            registry=r,
        )
        self.commands_rejected = Counter(
            "hashflex_commands_rejected", "Requests (grid, operator) refused, by reason code.", ["reason"], registry=r
        )
        self.mqtt_messages_received = Counter(
            "hashflex_mqtt_messages_received", "MQTT messages received from the broker.", registry=r
        )
        self.time_to_target = Histogram(
            "hashflex_dispatch_time_to_target_seconds",
            "From a dispatch's acceptance to the site meeting it.",
            registry=r,
            buckets=(1, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
        )
        self.site_energy = Counter(
            "hashflex_site_energy_joules",
            "Energy drawn by the site: the meter's counter with a site meter (its "
            "minutes that fell back: the miners' sum), else integrated from the miners' power.",
            registry=r,
        )
        self.site_energy_miners = Counter(
            "hashflex_site_energy_miners_joules",
            "The miners' sum over the same minutes (measured plus estimated): "
            "beside a metered site energy, the difference is the load the miners do not report.",
            registry=r,
        )
        self.energy_minutes = Counter(
            "hashflex_site_energy_minutes",
            "Minutes of site energy recorded, by source (metered: the meter's "
            "counter; fallback: the meter stale, the miners' sum; miners: no site meter).",
            ["source"],
            registry=r,
        )
        for source in ENERGY_SOURCES:
            self.energy_minutes.labels(source=source)  # every source present from the start (0 until counted)
        self.registry.register(_SiteCollector(self))
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # --------------------------------------------------------------------------- what the runtime calls
    def observe_tick(self, seconds: float) -> None:
        self.tick_duration.observe(seconds)

    def observe_sweep(self, seconds: float) -> None:
        self.sweep_duration.observe(seconds)

    def observe_command(self, op: str, result: str, seconds: float | None = None) -> None:
        """One miner command: op = set_power|sleep|wake|..., result = ok|failed|unsupported|timeout|..."""
        self.commands.labels(op=op, result=result).inc()
        if seconds is not None:
            self.command_latency.labels(op=op).observe(seconds)

    def count_dispatch(self, result: str) -> None:
        """A dispatch reached an outcome: accepted|rejected|completed|expired|cancelled|failed."""
        self.dispatches.labels(result=result).inc()

    def count_rejected(self, reason: str) -> None:
        """A request refused; `reason` is the Reply's error code (bad_signature, stale, ...)."""
        self.commands_rejected.labels(reason=reason).inc()

    def count_mqtt_message(self, n: int = 1) -> None:
        self.mqtt_messages_received.inc(n)

    def observe_time_to_target(self, seconds: float) -> None:
        self.time_to_target.observe(seconds)

    def add_energy_joules(self, joules: float) -> None:
        if joules > 0:
            self.site_energy.inc(joules)

    def add_energy_kwh(self, kwh: float) -> None:
        self.add_energy_joules(kwh * 3.6e6)

    def add_energy_minute(self, kwh: float, miners_kwh: float, source: str) -> None:
        """A minute of site energy recorded: its kWh (from `source`) and the miners' sum beside it."""
        self.add_energy_kwh(kwh)
        if miners_kwh > 0:
            self.site_energy_miners.inc(miners_kwh * 3.6e6)
        if source in ENERGY_SOURCES:
            self.energy_minutes.labels(source=source).inc()

    # ------------------------------------------------------------------------------------------ exposing
    def render(self) -> bytes:
        """The text exposition format, as a scrape would return it."""
        return generate_latest(self.registry)

    def start_http(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> int:
        """Serve /metrics from a daemon thread; returns the bound port (useful with port=0)."""
        if self._http is not None:
            return int(self._http.server_port)
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http, self._thread = server, thread
        bound = int(server.server_port)
        log.info("metrics endpoint listening", url=f"http://{_host_for_url(host)}:{bound}/metrics")
        return bound

    def stop_http(self) -> None:
        server, thread = self._http, self._thread
        self._http = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def _watts(kw: Any) -> float | None:
    value = _num(kw)
    return None if value is None else value * 1000.0


def _gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        family = GaugeMetricFamily(name, doc)
        family.add_metric([], value)
        yield family


class _SiteCollector:
    """Gauges read from the latest status doc (and per-miner rows) at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._failing = False

    def describe(self) -> Iterable[Metric]:
        # static names, so the registry can refuse a clash with the instrumented series above
        yield GaugeMetricFamily("hashflex_build_info", "Version of the running agent.")
        yield GaugeMetricFamily("hashflex_status_up", "1 if the agent has a current status doc.")

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        build = GaugeMetricFamily("hashflex_build_info", "Version of the running agent.", labels=["version", "commit"])
        build.add_metric([m.version, m.commit], 1.0)
        yield build
        status = self._call(m.status_provider)
        up = GaugeMetricFamily("hashflex_status_up", "1 if the agent has a current status doc.")
        up.add_metric([], 1.0 if status else 0.0)
        yield up
        if status:
            yield from self._site(status)
        if m.miners_provider is not None:
            rows = self._call(m.miners_provider)
            if rows is not None:
                yield from _per_miner(rows)

    def _call(self, provider: Callable[[], Any] | None) -> Any:
        if provider is None:
            return None
        try:
            value = provider()
        except Exception as exc:  # a scrape must not break on a provider bug: report it once, show status_up 0
            if not self._failing:
                log.warning("metrics provider failed", error=repr(exc))
            self._failing = True
            return None
        if self._failing:
            log.info("metrics provider recovered")
        self._failing = False
        return value

    def _site(self, s: StatusDoc) -> Iterator[Metric]:
        measured, estimated = _watts(s.get("power_kw_measured")), _watts(s.get("power_kw_estimated"))
        power = estimated if estimated is not None else measured
        target = _watts(s.get("target_kw"))
        yield from _gauge("hashflex_site_power_watts", "Site power: measured plus estimates for silent miners.", power)
        yield from _gauge(
            "hashflex_site_power_measured_watts", "Site power reported by miners that measure it.", measured
        )
        yield from _gauge(
            "hashflex_site_power_worst_case_watts",
            "Site power if every unknown miner drew its most.",
            _watts(s.get("power_kw_worst_case")),
        )
        yield from _gauge("hashflex_site_target_watts", "The effective target the site is held to.", target)
        yield from _gauge(
            "hashflex_site_cap_watts", "The site cap in force (may be lowered at run time).", _watts(s.get("cap_kw"))
        )
        yield from _gauge(
            "hashflex_site_licensed_cap_watts",
            "The licensed site cap from the config.",
            _watts(s.get("licensed_cap_kw")),
        )
        if power is not None and target is not None:
            yield from _gauge(
                "hashflex_site_over_target_watts",
                "How far site power is above target (0 = compliant).",
                max(0.0, power - target),
            )
        hashrate = _num(s.get("hashrate_ths"))
        yield from _gauge(
            "hashflex_site_hashrate_hashes_per_second", "Site hashrate.", None if hashrate is None else hashrate * 1e12
        )
        source = GaugeMetricFamily(
            "hashflex_site_target_source", "1 for the input that sets the target.", labels=["source"]
        )
        for name in TARGET_SOURCES:
            source.add_metric([name], 1.0 if s.get("target_source") == name else 0.0)
        yield source

        failsafe = s.get("failsafe") or {}
        yield from _gauge(
            "hashflex_failsafe_active",
            "1 while the grid link is lost and the fail-safe holds.",
            1.0 if failsafe.get("active") else 0.0,
        )
        released_by = GaugeMetricFamily(
            "hashflex_failsafe_released_by",
            "1 for what releases the active fail-safe (grid_command, next_heartbeat, heartbeat).",
            labels=["by"],
        )
        for name in FAILSAFE_RELEASES:
            released_by.add_metric([name], 1.0 if failsafe.get("released_by") == name else 0.0)
        yield released_by
        yield from _gauge(
            "hashflex_failsafe_releases_at_timestamp_seconds",
            "When the active fail-safe releases by "
            "itself if the heartbeat holds (Unix time; absent when not before a heartbeat).",
            timefmt.epoch(failsafe.get("releases_at")),
        )
        miners = s.get("miners") or {}
        by_state = GaugeMetricFamily("hashflex_miners", "Miners by state.", labels=["state"])
        for state in MINER_STATES:
            by_state.add_metric([state], _num(miners.get(state)) or 0.0)
        yield by_state
        yield from _gauge(
            "hashflex_miners_unidentified",
            "Configured addresses not identified yet (counted as unreachable, at a worst case).",
            _num(miners.get("unidentified")) or 0.0,
        )
        dispatches = s.get("dispatches") or []
        yield from _gauge(
            "hashflex_dispatches_active",
            "Dispatches and overrides in force now.",
            float(
                sum(1 for d in dispatches if isinstance(d, Mapping) and d.get("status") in (None, "active", "accepted"))
            ),
        )
        broker = (s.get("broker") or {}).get("state")
        link = GaugeMetricFamily("hashflex_broker_state", "1 for the MQTT link's current state.", labels=["state"])
        for name in BROKER_STATES:
            link.add_metric([name], 1.0 if broker == name else 0.0)
        yield link
        yield from _gauge("hashflex_alarms_active", "Alarms raised now.", float(len(s.get("alarms") or [])))

        gw = s.get("gateway") or {}
        cpu, mem = _num(gw.get("cpu_pct")), _num(gw.get("mem_pct"))
        disk, rss = _num(gw.get("disk_free_mb")), _num(gw.get("rss_mb"))
        yield from _gauge(
            "hashflex_gateway_cpu_usage_ratio", "Gateway CPU use (0-1).", None if cpu is None else cpu / 100
        )
        yield from _gauge(
            "hashflex_gateway_memory_usage_ratio", "Gateway memory use (0-1).", None if mem is None else mem / 100
        )
        yield from _gauge(
            "hashflex_gateway_disk_free_bytes",
            "Free space on the state directory's filesystem.",
            None if disk is None else disk * _MIB,
        )
        yield from _gauge(
            "hashflex_agent_resident_memory_bytes", "The agent's resident memory.", None if rss is None else rss * _MIB
        )
        if "low_disk" in gw:
            yield from _gauge(
                "hashflex_gateway_low_disk",
                "1 when free disk is under audit.disk_alarm_mb.",
                1.0 if gw.get("low_disk") else 0.0,
            )
        meter = s.get("meter")
        if isinstance(meter, Mapping):
            yield from _meter(meter)
        energy = s.get("energy")
        if isinstance(energy, Mapping) and energy.get("source") in ENERGY_SOURCES:
            source = GaugeMetricFamily(
                "hashflex_site_energy_source",
                "1 for the source of the last minute of site energy (metered, miners, fallback).",
                labels=["source"],
            )
            for name in ENERGY_SOURCES:
                source.add_metric([name], 1.0 if energy.get("source") == name else 0.0)
            yield source
        tick = s.get("tick") or {}
        if _num(tick.get("n")) is not None:
            ticks = CounterMetricFamily("hashflex_ticks", "Control ticks completed since the agent started.")
            ticks.add_metric([], float(tick["n"]))
            yield ticks
        yield from _gauge(
            "hashflex_last_tick_timestamp_seconds",
            "When the last tick completed (Unix time).",
            _num(tick.get("ts")) or _num(s.get("ts")),
        )


def _meter(m: Mapping[str, Any]) -> Iterator[Metric]:
    """The site meter's figures (status doc `meter`): absent while it has no fresh reading, but for freshness."""
    yield from _gauge(
        "hashflex_site_metered_watts", "Site power at the meter (point of interconnection).", _watts(m.get("power_kw"))
    )
    yield from _gauge(
        "hashflex_site_non_miner_watts",
        "Non-miner load: metered site power less the miners' sum.",
        _watts(m.get("non_miner_kw")),
    )
    yield from _gauge(
        "hashflex_site_non_miner_counted_watts",
        "Non-miner load the plan counts (recent maximum, or "
        "the allowance while the meter is stale, plus cooling to follow).",
        _watts(m.get("non_miner_counted_kw")),
    )
    yield from _gauge("hashflex_grid_frequency_hertz", "Grid frequency at the site meter.", _num(m.get("hz")))
    yield from _gauge(
        "hashflex_meter_fresh",
        "1 while the site meter gives good readings (0: fallback, rises held).",
        1.0 if m.get("fresh") else 0.0,
    )
    yield from _gauge(
        "hashflex_meter_reading_age_seconds", "Age of the site meter's last good reading.", _num(m.get("age_s"))
    )
    fr = m.get("frequency_response")
    if isinstance(fr, Mapping):  # configured: 1 while an under-frequency event holds a stage's shed
        yield from _gauge(
            "hashflex_frequency_event_active",
            "1 while frequency response holds a stage's shed.",
            1.0 if fr.get("active") else 0.0,
        )
    kwh = _num(m.get("import_kwh"))
    if kwh is not None:  # the meter's own register: it may reset (a replaced meter), as counters may
        counter = CounterMetricFamily("hashflex_meter_import_energy_joules", "The site meter's import energy counter.")
        counter.add_metric([], kwh * 3.6e6)
        yield counter


def _per_miner(rows: Iterable[Mapping[str, Any]]) -> Iterator[Metric]:
    info = GaugeMetricFamily("hashflex_miner_info", "A miner's identity.", labels=["miner", "model", "firmware"])
    up = GaugeMetricFamily("hashflex_miner_up", "1 if the miner answered recently.", labels=["miner"])
    power = GaugeMetricFamily("hashflex_miner_power_watts", "Miner power.", labels=["miner"])
    limit = GaugeMetricFamily("hashflex_miner_power_limit_watts", "Miner power limit set.", labels=["miner"])
    hashrate = GaugeMetricFamily("hashflex_miner_hashrate_hashes_per_second", "Miner hashrate.", labels=["miner"])
    temp = GaugeMetricFamily("hashflex_miner_temperature_celsius", "Miner's hottest board.", labels=["miner"])
    for row in rows:
        miner = str(row.get("ip") or row.get("id") or "")
        if not miner:
            continue
        info.add_metric([miner, str(row.get("model") or ""), str(row.get("firmware") or "")], 1.0)
        up.add_metric([miner], 0.0 if row.get("state") == "unreachable" else 1.0)
        for family, value in (
            (power, _num(row.get("power_w"))),
            (limit, _num(row.get("limit_w", row.get("power_limit_w")))),
            (hashrate, None if _num(row.get("hashrate_ths")) is None else float(row["hashrate_ths"]) * 1e12),
            (temp, _num(row.get("temp_c", row.get("temperature_c")))),
        ):
            if value is not None:
                family.add_metric([miner], value)
    yield from (info, up, power, limit, hashrate, temp)
