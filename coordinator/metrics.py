"""Prometheus metrics of the coordinator: `hashflex_program_` and `hashflex_coordinator_` series, base units.

The agent's approach (agent/io/metrics.py): a registry of its own, and one custom Collector that reads, at scrape
time, a value already built on the event loop (`Coordinator.snapshot`, replaced whole every step), never state the
loop is changing. A site or a program dispatch that leaves is absent from the next scrape, so its series go away.
Counters are the service's own counts since the process started (allocations, re-dispatches, program commands by
outcome), exposed as counter families.

Every instance serves its metrics: a follower shows `hashflex_coordinator_leader 0` and its picture of the sites;
the program figures (target, shares, short) come from the leader, the one that allocates.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hashflex.agent import __version__
from hashflex.agent.logging import get_logger

SnapshotProvider = Callable[[], Mapping[str, Any] | None]
SITE_STATES = ("ok", "offline", "stale", "no_flexibility", "not_met")
COMMAND_OUTCOMES = ("accepted", "repeat", "refused")
DEFAULT_PORT = 9709  # the agent's is 9708: a coordinator and an agent on one host do not collide

log = get_logger("coordinator.metrics")


class CoordinatorMetrics:
    def __init__(self, snapshot: SnapshotProvider, *, version: str = __version__, commit: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(snapshot, version, commit or os.environ.get("HASHFLEX_COMMIT", "unknown")))
        self._http: WSGIServer | None = None
        self._thread: Any = None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def start_http(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> int:
        """Serve /metrics from a daemon thread; the bound port (useful with port=0)."""
        if self._http is None:
            self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
            url_host = f"[{host}]" if ":" in host else host
            log.info("metrics endpoint listening", url=f"http://{url_host}:{self._http.server_port}/metrics")
        return int(self._http.server_port)

    def stop_http(self) -> None:
        server, thread = self._http, self._thread
        self._http = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        family = GaugeMetricFamily(name, doc)
        family.add_metric([], value)
        yield family


class _Collector:
    def __init__(self, snapshot: SnapshotProvider, version: str, commit: str) -> None:
        self.snapshot = snapshot
        self.version, self.commit = version, commit
        self._failing = False

    def describe(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("hashflex_coordinator_build_info", "Version of the running coordinator.")
        yield GaugeMetricFamily("hashflex_coordinator_leader", "1 while this instance holds the lease and acts.")

    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily(
            "hashflex_coordinator_build_info", "Version of the running coordinator.", labels=["version", "commit"]
        )
        build.add_metric([self.version, self.commit], 1.0)
        yield build
        snap = self._read()
        yield from _gauge(
            "hashflex_coordinator_leader",
            "1 while this instance holds the lease and acts.",
            1.0 if snap.get("leader") else 0.0,
        )
        yield from _sites(snap.get("sites") or {})
        yield from _counts(snap.get("counts") or {})
        status = snap.get("status")
        if isinstance(status, Mapping):
            yield from _program(status)

    def _read(self) -> Mapping[str, Any]:
        try:
            snap = self.snapshot()
        except Exception as exc:  # a scrape must not fail on a provider bug: said once, leader 0
            if not self._failing:
                log.warning("metrics snapshot failed", error=repr(exc))
            self._failing = True
            return {}
        self._failing = False
        return snap if isinstance(snap, Mapping) else {}


def _sites(sites: Mapping[str, Any]) -> Iterator[Metric]:
    by_state = GaugeMetricFamily(
        "hashflex_program_sites",
        "The program's sites by state (ok, offline (last will), stale, no_flexibility, not_met).",
        labels=["state"],
    )
    present = GaugeMetricFamily(
        "hashflex_program_site_present_watts",
        "A site's present (metered where it has a meter) power, from its flexibility.",
        labels=["site"],
    )
    totals = dict.fromkeys(SITE_STATES, 0.0)
    metered: list[float] = []
    for sid, site in sorted(sites.items()):
        state = str(site.get("state"))
        totals[state] = totals.get(state, 0.0) + 1.0
        value = _num(site.get("present_w"))
        if value is not None:
            present.add_metric([str(sid)], value)
            metered.append(value)
    for state, n in totals.items():
        by_state.add_metric([state], n)
    yield by_state
    yield present
    yield from _gauge(
        "hashflex_program_metered_watts",
        "Σ the sites' present power (sites heard from).",
        math.fsum(metered) if metered else None,
    )


def _counts(counts: Mapping[str, Any]) -> Iterator[Metric]:
    for name, key, doc in (
        ("hashflex_program_allocations", "allocation", "Allocations that changed a program dispatch's shares."),
        ("hashflex_program_redispatches", "redispatch", "Re-dispatches: a site failed or came back, shares moved."),
    ):
        family = CounterMetricFamily(name, doc)
        family.add_metric([], float(counts.get(key, 0)))
        yield family
    commands = CounterMetricFamily(
        "hashflex_program_commands", "Program commands answered, by outcome.", labels=["outcome"]
    )
    for outcome in COMMAND_OUTCOMES:
        commands.add_metric([outcome], float(counts.get(f"command_{outcome}", 0)))
    yield commands


def _program(status: Mapping[str, Any]) -> Iterator[Metric]:
    dispatches = [d for d in status.get("dispatches") or [] if isinstance(d, Mapping)]
    levels = [v for d in dispatches if (v := _num(d.get("level_now_w"))) is not None]
    yield from _gauge(
        "hashflex_program_target_watts",
        "The program level in force now (the lowest of the dispatches in force; absent when none is).",
        min(levels) if levels else None,
    )
    yield from _gauge(
        "hashflex_program_short_watts",
        "By how much the program cannot be met now (0: met).",
        max((_num(d.get("unmet_w")) or 0.0 for d in dispatches), default=0.0),
    )
    yield from _gauge(
        "hashflex_program_alarms_active", "Program alarms raised now.", float(len(status.get("alarms") or []))
    )
    target = GaugeMetricFamily(
        "hashflex_program_dispatch_target_watts", "A program dispatch's level now.", labels=["dispatch", "kind"]
    )
    short = GaugeMetricFamily(
        "hashflex_program_dispatch_short_watts", "A program dispatch's shortfall.", labels=["dispatch"]
    )
    share = GaugeMetricFamily(
        "hashflex_program_site_share_watts",
        "A site's share (the lowest of the program dispatches in force).",
        labels=["site"],
    )
    counted = GaugeMetricFamily(
        "hashflex_program_site_counted_watts",
        "What Σ counts a site at (its worst case while it fails).",
        labels=["site"],
    )
    delivered = GaugeMetricFamily(
        "hashflex_program_site_delivered", "1 when a site draws at or under its share.", labels=["site"]
    )
    shares: dict[str, float] = {}
    counts: dict[str, float] = {}
    present: dict[str, float] = {}
    for d in dispatches:
        did = str(d.get("id"))
        if (level := _num(d.get("level_now_w"))) is not None:
            target.add_metric([did, str(d.get("kind"))], level)
        short.add_metric([did], _num(d.get("unmet_w")) or 0.0)
        for s in d.get("sites") or []:
            sid = str(s.get("site"))
            if (value := _num(s.get("share_w"))) is not None:
                shares[sid] = min(value, shares.get(sid, math.inf))
            if (value := _num(s.get("counted_w"))) is not None:
                counts[sid] = min(value, counts.get(sid, math.inf))
            if (value := _num(s.get("present_w"))) is not None:
                present[sid] = value
    for sid in sorted(shares):
        share.add_metric([sid], shares[sid])
        if sid in present:
            delivered.add_metric([sid], 1.0 if present[sid] <= shares[sid] else 0.0)
    for sid in sorted(counts):
        counted.add_metric([sid], counts[sid])
    yield from (target, short, share, counted, delivered)
