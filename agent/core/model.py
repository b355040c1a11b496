"""Typed values shared by the pure core and the adapters around it. Frozen, no I/O, times as epoch seconds.

Times are plain floats (seconds since the epoch, UTC) handed in by the caller: the core never reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

# the wire's names, defined once in the contract; re-exported (mypy's explicit form) for the core's many readers
from hashflex.contract.vocabulary import MinerState as MinerState  # noqa: PLC0414
from hashflex.contract.vocabulary import Source as Source  # noqa: PLC0414
from hashflex.drivers.base import Capability, Family


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A request to hold the site at or below a level for a window.

    Exactly one of target_kw (an absolute level) and curtail_kw (a reduction from the site's baseline at
    acceptance) is set. `rev` orders revisions of the same id (OpenADR modification number).
    """

    id: str
    source: Source
    issued_at: float
    start: float
    end: float | None
    target_kw: float | None = None
    curtail_kw: float | None = None
    ramp_kw_per_min: float | None = None
    rev: int = 0
    # for curtail_kw: the site baseline measured when the dispatch was accepted, so "by X" is stable
    baseline_kw: float | None = None

    def level_kw(self) -> float:
        if self.target_kw is not None:
            return self.target_kw
        assert self.curtail_kw is not None
        assert self.baseline_kw is not None
        return max(0.0, self.baseline_kw - self.curtail_kw)

    def active_at(self, now: float) -> bool:
        return self.start <= now and (self.end is None or now < self.end)

    def expired_at(self, now: float) -> bool:
        return self.end is not None and now >= self.end


@dataclass(frozen=True, slots=True)
class Target:
    """The one effective target of the site, and why."""

    kw: float
    source: Source  # which input binds
    binding_id: str | None  # the dispatch / window id that binds, if any
    cap_kw: float
    # the ramp the binding input asked for, for reporting: each input ramps on its own path, and the level the site
    # is planned at is arbitration.ramped_level (never this target approached at this rate)
    ramp_kw_per_min: float | None = None
    failsafe: bool = False
    # why the binding input still binds, when that is not obvious: "min_hold", "release_debounce", ...
    detail: str = ""

    @property
    def reason(self) -> str:
        return f"{self.source.value}:{self.binding_id}" if self.binding_id else self.source.value


@dataclass(frozen=True, slots=True)
class MinerView:
    """The planner's view of one miner: what it is, what it does, what we last told it."""

    id: str  # the miner's address
    family: Family
    capability: Capability
    nominal_w: float
    nominal_ths: float
    state: MinerState
    power_w: float | None  # fresh measured (or estimated, for miners that report no power) draw
    commanded_w: float | None  # last limit we set and it accepted; None = never limited by us
    asleep_by_us: bool = False  # we put it to sleep (so a restart knows what it curtailed)
    last_transition: float = 0.0  # when it last went on or off, for minimum on/off times
    circuit: str | None = None
    priority: int = 0  # higher = sleeps later (hosted customers)
    ignores_commands: bool = False  # acknowledged commands without acting: counted at what it draws
    # its own report of its draw, read once its present setting had time to take effect (None: no such reading,
    # a command still settling, or a firmware that reports no watts): it is counted at no less than this
    measured_w: float | None = None
    # a waking miner that accepted this limit after its wake command comes up at it, not at its stock profile:
    # it counts at this instead of its full power (None: it comes up at whatever it had, counted at full)
    woken_to_w: float | None = None
    # a sleeping miner that drew this much above its setting when it last ran (kept while it sleeps: a drifting
    # PSU drifts after a wake too): a plan that wakes it counts it on top of the level it wakes to, as the waking
    # miner will be counted once its wake is acknowledged (its measured_w: that level plus this)
    wake_excess_w: float = 0.0


@dataclass(frozen=True, slots=True)
class SleepAction:
    pass


@dataclass(frozen=True, slots=True)
class RunAction:
    """Run at `watts` (a power limit or preset); wake first if asleep."""

    watts: int


Action = RunAction | SleepAction


@dataclass(frozen=True, slots=True)
class Plan:
    """Who runs at what and who sleeps, with the accounting that justifies it."""

    actions: dict[str, Action]  # every planned miner id -> desired end state
    worst_case_kw: float  # site power if every planned miner obeys and every uncontrollable one draws its max
    expected_kw: float
    expected_ths: float
    target_kw: float
    alarms: tuple[str, ...] = ()
    circuit_worst_case_kw: dict[str, float] = field(default_factory=dict)
    # miners slept inside their minimum on-time because a cap or the target could not be met otherwise
    min_on_overridden: tuple[str, ...] = ()
    # unreachable miners and miners that ignore commands: no action, counted at their worst case
    uncontrolled: tuple[str, ...] = ()
    method: str = ""  # which planner produced it: "optimal" or "sleep_only"
    baseline_ths: float | None = None  # what the sleep-only baseline would have kept, for reporting
    # the fleet's worst case as it stood before this plan: what the ramp allowance is counted from
    ramp_from_kw: float = 0.0
    # what the plan raises, summed over miners (each one's planned worst case above what it counts at now): what
    # the ramp credit is spent by. Not worst_case_kw - ramp_from_kw: what it lowers elsewhere takes effect in
    # seconds, a wake over a minute, so lowering does not pay for rising (planning/ramp_hold.py)
    raised_kw: float = 0.0
    # the site now as the plan counts it: each miner's reading, else (unreachable, unidentified, stale) the worst case
    # it is counted at. What "curtail by X" is taken from (not worst_case_kw: waking miners count there at full power)
    counted_now_kw: float = 0.0


class Op(StrEnum):
    """A command to one miner."""

    SLEEP = "sleep"
    WAKE = "wake"
    SET_POWER = "set_power"


@dataclass(frozen=True, slots=True)
class Change:
    """One miner's change: wake (then limit, if `watts` is set and below what it will come up at), limit, sleep."""

    ip: str
    op: Op
    watts: int | None = None
    decrease: bool = False  # a limit change that lowers power (goes out with the sleeps)
    rank: float = 0.0  # lower goes first: J/TH for wakes and increases (the most efficient first); for decreases,
    # minus the power shed per ms of client CPU the command costs (the draw falls fastest)


def raises_draw(change: Change, commanded_w: float | None) -> bool:
    """Does this command let the miner draw more than the figures stored for it say?"""
    if change.op is Op.WAKE:
        return True
    return (
        change.op is Op.SET_POWER
        and change.watts is not None
        and not change.decrease
        and (commanded_w is None or change.watts > commanded_w)
    )
