"""Metrics scraped over real HTTP: the text format carries the series, values in base units, per-miner series
leave with their miner, and a broken provider does not break a scrape."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hashflex.agent.io.metrics import Metrics
from tests.site_status import STATUS

pytestmark = pytest.mark.timeout(60)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        body: bytes = resp.read()
    return body.decode()


@pytest.fixture
def served() -> Iterator[tuple[Metrics, int, dict[str, Any]]]:
    holder: dict[str, Any] = {"status": STATUS, "miners": []}
    metrics = Metrics(lambda: holder["status"], lambda: holder["miners"], commit="abc123")
    port = metrics.start_http(port=0)
    yield metrics, port, holder
    metrics.stop_http()


def test_site_gauges_in_base_units_over_http(served: tuple[Metrics, int, dict[str, Any]]) -> None:
    _, port, _ = served
    got = samples(scrape(port))
    assert got[("hashflex_site_power_watts", ())] == 41_200_000.0
    assert got[("hashflex_site_power_measured_watts", ())] == 40_500_000.0
    assert got[("hashflex_site_power_worst_case_watts", ())] == 43_000_000.0
    assert got[("hashflex_site_target_watts", ())] == 38_000_000.0
    assert got[("hashflex_site_cap_watts", ())] == 45_000_000.0
    assert got[("hashflex_site_licensed_cap_watts", ())] == 45_000_000.0
    assert got[("hashflex_site_over_target_watts", ())] == 3_200_000.0
    assert got[("hashflex_site_hashrate_hashes_per_second", ())] == pytest.approx(1.23e18)
    assert got[("hashflex_site_target_source", (("source", "grid"),))] == 1.0
    assert got[("hashflex_site_target_source", (("source", "cap"),))] == 0.0
    assert got[("hashflex_failsafe_active", ())] == 0.0
    assert got[("hashflex_miners", (("state", "hashing"),))] == 9812
    assert got[("hashflex_miners", (("state", "unreachable"),))] == 15
    assert got[("hashflex_dispatches_active", ())] == 1
    assert got[("hashflex_broker_state", (("state", "connected"),))] == 1.0
    assert got[("hashflex_broker_state", (("state", "disconnected"),))] == 0.0
    assert got[("hashflex_alarms_active", ())] == 1
    assert got[("hashflex_gateway_cpu_usage_ratio", ())] == 0.125
    assert got[("hashflex_gateway_memory_usage_ratio", ())] == 0.40
    assert got[("hashflex_gateway_disk_free_bytes", ())] == 2048 * 1024 * 1024
    assert got[("hashflex_agent_resident_memory_bytes", ())] == 310 * 1024 * 1024
    assert got[("hashflex_gateway_low_disk", ())] == 0.0
    assert got[("hashflex_ticks_total", ())] == 8123
    assert got[("hashflex_last_tick_timestamp_seconds", ())] == 1_699_999_999.0
    assert got[("hashflex_build_info", (("commit", "abc123"), ("version", "0.1.0")))] == 1.0
    assert got[("hashflex_status_up", ())] == 1.0


def test_runtime_counters_and_histograms(served: tuple[Metrics, int, dict[str, Any]]) -> None:
    metrics, port, _ = served
    metrics.observe_tick(0.012)
    metrics.observe_tick(0.3)
    metrics.observe_sweep(2.5)
    metrics.observe_command("set_power", "ok", 0.2)
    metrics.observe_command("set_power", "ok", 0.4)
    metrics.observe_command("sleep", "failed", 8.0)
    metrics.observe_command("wake", "unsupported")
    metrics.count_dispatch("accepted")
    metrics.count_dispatch("completed")
    metrics.count_rejected("bad_signature")
    metrics.count_rejected("bad_signature")
    metrics.count_mqtt_message()
    metrics.count_mqtt_message(4)
    metrics.observe_time_to_target(42.0)
    metrics.add_energy_joules(1000.0)
    metrics.add_energy_kwh(1.0)
    metrics.add_energy_joules(-5.0)  # a counter never goes down
    got = samples(scrape(port))
    assert got[("hashflex_tick_duration_seconds_count", ())] == 2
    assert got[("hashflex_tick_duration_seconds_sum", ())] == pytest.approx(0.312)
    assert got[("hashflex_tick_duration_seconds_bucket", (("le", "0.025"),))] == 1
    assert got[("hashflex_sweep_duration_seconds_count", ())] == 1
    assert got[("hashflex_commands_total", (("op", "set_power"), ("result", "ok")))] == 2
    assert got[("hashflex_commands_total", (("op", "sleep"), ("result", "failed")))] == 1
    assert got[("hashflex_commands_total", (("op", "wake"), ("result", "unsupported")))] == 1
    assert got[("hashflex_command_latency_seconds_count", (("op", "set_power"),))] == 2
    assert got[("hashflex_command_latency_seconds_sum", (("op", "sleep"),))] == 8.0
    assert ("hashflex_command_latency_seconds_count", (("op", "wake"),)) not in got  # no latency given
    assert got[("hashflex_dispatches_total", (("result", "accepted"),))] == 1
    assert got[("hashflex_commands_rejected_total", (("reason", "bad_signature"),))] == 2
    assert got[("hashflex_mqtt_messages_received_total", ())] == 5
    assert got[("hashflex_dispatch_time_to_target_seconds_count", ())] == 1
    assert got[("hashflex_site_energy_joules_total", ())] == 1000.0 + 3.6e6


def test_per_miner_series_leave_with_their_miner(served: tuple[Metrics, int, dict[str, Any]]) -> None:
    _, port, holder = served
    holder["miners"] = [
        {
            "ip": "10.0.0.1",
            "model": "S19",
            "firmware": "luxos",
            "state": "hashing",
            "power_w": 3250.0,
            "limit_w": 3300.0,
            "hashrate_ths": 95.0,
            "temp_c": 71.0,
        },
        {"ip": "10.0.0.2", "model": "M30S", "firmware": "stock", "state": "unreachable", "power_w": None},
    ]
    got = samples(scrape(port))
    assert got[("hashflex_miner_power_watts", (("miner", "10.0.0.1"),))] == 3250.0
    assert got[("hashflex_miner_power_limit_watts", (("miner", "10.0.0.1"),))] == 3300.0
    assert got[("hashflex_miner_hashrate_hashes_per_second", (("miner", "10.0.0.1"),))] == 95e12
    assert got[("hashflex_miner_temperature_celsius", (("miner", "10.0.0.1"),))] == 71.0
    assert got[("hashflex_miner_up", (("miner", "10.0.0.2"),))] == 0.0
    assert ("hashflex_miner_power_watts", (("miner", "10.0.0.2"),)) not in got  # unknown is not zero
    assert got[("hashflex_miner_info", (("firmware", "stock"), ("miner", "10.0.0.2"), ("model", "M30S")))] == 1.0
    holder["miners"] = holder["miners"][:1]
    text = scrape(port)
    assert "10.0.0.2" not in text
    assert 'hashflex_miner_power_watts{miner="10.0.0.1"} 3250.0' in text


def test_no_status_yet_means_status_up_zero_and_no_site_gauges() -> None:
    metrics = Metrics(lambda: None)
    text = metrics.render().decode()
    got = samples(text)
    assert got[("hashflex_status_up", ())] == 0.0
    assert "hashflex_site_power_watts" not in text
    assert got[("hashflex_build_info", (("commit", "unknown"), ("version", "0.1.0")))] == 1.0


def test_a_failing_provider_does_not_break_the_scrape(served: tuple[Metrics, int, dict[str, Any]]) -> None:
    metrics, port, holder = served

    def broken() -> Mapping[str, Any]:
        raise KeyError("half-built status")

    metrics.status_provider = broken
    got = samples(scrape(port))
    assert got[("hashflex_status_up", ())] == 0.0
    metrics.status_provider = lambda: holder["status"]
    assert samples(scrape(port))[("hashflex_status_up", ())] == 1.0


def test_failsafe_and_low_disk_show(served: tuple[Metrics, int, dict[str, Any]]) -> None:
    _, port, holder = served
    holder["status"] = {
        **STATUS,
        "target_source": "failsafe",
        "failsafe": {"active": True},
        "broker": {"state": "disconnected"},
        "gateway": {**STATUS["gateway"], "low_disk": True},
        "power_kw_estimated": 30000.0,
    }
    got = samples(scrape(port))
    assert got[("hashflex_failsafe_active", ())] == 1.0
    assert got[("hashflex_site_target_source", (("source", "failsafe"),))] == 1.0
    assert got[("hashflex_broker_state", (("state", "disconnected"),))] == 1.0
    assert got[("hashflex_gateway_low_disk", ())] == 1.0
    assert got[("hashflex_site_over_target_watts", ())] == 0.0


def test_what_releases_the_failsafe_shows(served: tuple[Metrics, int, dict[str, Any]]) -> None:
    _, port, holder = served
    holder["status"] = {
        **STATUS,
        "failsafe": {"active": True, "released_by": "grid_command", "releases_at": "2023-11-14T22:13:20.000Z"},
    }
    got = samples(scrape(port))
    assert got[("hashflex_failsafe_released_by", (("by", "grid_command"),))] == 1.0
    assert got[("hashflex_failsafe_released_by", (("by", "heartbeat"),))] == 0.0
    assert got[("hashflex_failsafe_releases_at_timestamp_seconds", ())] == 1_700_000_000.0
    # waiting for the grid's heartbeat: no time to release at
    holder["status"] = {**STATUS, "failsafe": {"active": True, "released_by": "heartbeat", "releases_at": None}}
    got = samples(scrape(port))
    assert got[("hashflex_failsafe_released_by", (("by", "heartbeat"),))] == 1.0
    assert ("hashflex_failsafe_releases_at_timestamp_seconds", ()) not in got


def test_listens_on_localhost_only_by_default_and_stops() -> None:
    metrics = Metrics(lambda: STATUS)
    port = metrics.start_http(port=0)
    assert metrics.start_http(port=0) == port  # idempotent
    server = metrics._http
    assert server is not None
    assert server.server_address[0] == "127.0.0.1"
    metrics.stop_http()
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))


def test_two_instances_have_their_own_registries() -> None:
    a, b = Metrics(lambda: STATUS), Metrics(lambda: None)
    a.observe_tick(1.0)
    assert samples(a.render().decode())[("hashflex_tick_duration_seconds_count", ())] == 1
    assert samples(b.render().decode())[("hashflex_tick_duration_seconds_count", ())] == 0
