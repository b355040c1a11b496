"""The status document: the site as its agent sees it, as of its last tick. The `status` verb's answer, retained on
`<root>/<site>/state`, read by the metrics, `hashflex status` and the demo.

Times are ISO 8601 UTC strings with `Z` (None: not yet / never); powers are kW rounded to the watt. Sections that
other parts of the agent own are typed here so a reader knows their fields: the meter's and the facility's stay open
mappings (they carry device-specific fields).
"""

# no `from __future__ import annotations`: TypedDict reads NotRequired[...] from evaluated annotations only, and
# tests (and any reader) check a document's keys against __required_keys__ / __optional_keys__
from typing import NotRequired, TypedDict


class FailsafeDoc(TypedDict):
    active: bool
    since: str | None
    reason: str | None
    last_heartbeat: str | None
    applies: bool  # a grid link is configured, so a lost one holds the site
    # what releases an active fail-safe ("grid_command", "next_heartbeat", "heartbeat"), and when it releases by
    # itself if the heartbeat holds (None: not before a heartbeat)
    released_by: str | None
    releases_at: str | None
    release_after_s: float


class BrokerQueuesDoc(TypedDict):
    commands: int
    replies: int
    events: int
    telemetry: int
    miners: int


class BrokerDoc(TypedDict):
    """The MQTT link (`state` "disabled" and nothing more without one)."""

    state: str  # connected | connecting | disconnected | disabled
    since: str | None
    address: NotRequired[str]  # the broker connected to, or being tried
    brokers: NotRequired[list[str]]
    last_error: NotRequired[str | None]
    protocol: NotRequired[str]  # "5" | "3.1.1"
    queued: NotRequired[BrokerQueuesDoc]
    telemetry_dropped: NotRequired[int]
    dropped_unauthenticated: NotRequired[int]


class GatewayDoc(TypedDict, total=False):
    """The gateway's health (empty when not measured)."""

    cpu_pct: float | None
    mem_pct: float | None
    disk_free_mb: float | None
    rss_mb: float | None
    low_disk: bool


class AlarmDoc(TypedDict):
    key: str
    message: str


class TickDoc(TypedDict):
    n: int
    dur_ms: float
    ts: str | None


class SweepDoc(TypedDict):
    ts: str | None
    dur_s: float
    unreachable: int


class PlanDoc(TypedDict):
    method: str
    expected_kw: float
    expected_ths: float
    baseline_ths: float | None


class EnergyDoc(TypedDict):
    """Where the site's kWh come from: the last minute's source (metered, miners, fallback), minutes by source."""

    source: str | None
    minutes: int
    by_source: dict[str, int]
    fallback_kwh: float | None  # the miners' sum booked by fallback minutes since the last metered one
    dropped_kwh: float | None  # counter energy lost to a reset


class DispatchDoc(TypedDict):
    """A dispatch or override, as the status, `dispatches` and the dispatch replies show it."""

    id: str
    rev: int
    source: str  # a vocabulary.Source value
    target_kw: float | None
    curtail_kw: float | None
    baseline_kw: float | None
    level_kw: float | None
    ramp_kw_per_min: float | None
    issued_at: str | None
    start: str | None
    end: str | None
    status: str
    received_at: str | None
    accepted_at: str | None
    commands_sent_at: str | None
    target_met_at: str | None
    time_to_target_s: float | None
    max_overshoot_kw: float
    closed_at: str | None
    close_reason: str | None


# counts by miner state: every vocabulary.MinerState value, plus "unidentified" (configured addresses not identified
# yet, also counted as unreachable) and "total"
MinerCounts = dict[str, int]


class StatusDoc(TypedDict):
    ts: str
    site_id: str
    version: str
    target_kw: float | None
    target_reason: str | None
    target_source: str | None  # a vocabulary.Source value
    target_detail: str | None
    planning_level_kw: float | None  # the level the miners are planned to (with a meter: less the non-miner load)
    cap_kw: float
    licensed_cap_kw: float
    grid_cap_kw: float | None  # run-time caps by source (None = not set); the lowest cap binds
    operator_cap_kw: float | None
    # power_kw_measured: what miners reported; power_kw_estimated (= power_kw): the site's power with an estimate for
    # every miner that did not report (unknown is never zero); power_kw_unmeasured: those estimates
    power_kw: float
    power_kw_measured: float
    power_kw_estimated: float
    power_kw_unmeasured: float
    power_kw_worst_case: float | None  # never below what the site draws now
    hashrate_ths: float
    miners: MinerCounts
    dispatches: list[DispatchDoc]
    failsafe: FailsafeDoc
    broker: BrokerDoc
    alarms: list[AlarmDoc]
    gateway: GatewayDoc
    tick: TickDoc
    sweep: SweepDoc
    plan: PlanDoc | None
    in_flight: int
    settled_since: str | None  # since when the plan in force has been carried out in full
    meter: dict[str, object] | None  # the site meter (None without one)
    energy: EnergyDoc
    facility: NotRequired[list[dict[str, object]]]  # facility loads (cooling), where configured
