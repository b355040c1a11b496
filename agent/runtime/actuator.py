"""Carry a plan out: the diff between what miners were told and what the plan wants, as driver calls.

- Only changes go out (never a fleet-wide rewrite, never a whole-config write that could wipe pools): a miner
  already asleep is not slept again, one already at the planned limit is not limited again.
- Order: sleeps and limit decreases first (they free power), then limit increases, then wakes — the most
  efficient miners first, in batches no larger than the wake budget the controller hands in.
- Bounded concurrency (one semaphore), a deadline on every call (pyasic's own are 100 s), retries with
  exponential backoff for retryable failures, and a retry budget shared by the whole batch so a dead subnet
  cannot keep a tick busy.
- Every call gets a result; the controller updates its memory of the miner from it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from hashflex.agent.core.model import Action, Change, MinerState, MinerView, Op, SleepAction
from hashflex.drivers.base import (
    CONTROL_COST_MS,
    DriverError,
    Failed,
    Family,
    MinerHandle,
    Ok,
    OnOff,
    Result,
    Unreachable,
    Unsupported,
    wakes_at_limit,
)

RAISE_DEADBAND_W = 100.0  # limit raises smaller than this (or than this share of the limit) are not sent
RAISE_DEADBAND_SHARE = 0.05
HELD_AFTER_FAILED_DECREASE = "not sent: a decrease of its batch failed"


@dataclass(frozen=True, slots=True)
class OpResult:
    ip: str
    op: Op
    watts: int | None
    outcome: str  # ok | unsupported | failed | unreachable | timeout | skipped | held (HELD_AFTER_FAILED_DECREASE)
    detail: str
    attempts: int
    done_at: float  # wall seconds (time.time()) when the last attempt ended
    latency_s: float

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass(slots=True)
class Report:
    results: list[OpResult] = field(default_factory=list)
    retries: int = 0
    started_at: float = 0.0
    finished_at: float = 0.0

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def sent(self) -> int:
        return sum(1 for r in self.results if r.outcome != "held")

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if not r.ok and r.outcome != "held")

    def by_op(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self.results:
            slot = out.setdefault(r.op.value, {})
            slot[r.outcome] = slot.get(r.outcome, 0) + 1
        return out


# ------------------------------------------------------------------------------------------------------ diff
def diff(
    actions: Mapping[str, Action],
    views: Mapping[str, MinerView],
    *,
    use_power_limits: bool = True,
    pending: Mapping[str, Op] | None = None,
    rank: Callable[[MinerView, int], float] | None = None,
    held_raises_w: list[float] | None = None,
    no_raise: Collection[str] = (),
) -> list[Change]:
    """The changes that take each miner from what it does (and was told) to what the plan wants.

    `pending`: miners with a command in flight or awaiting confirmation (skipped: the controller re-commands
    them itself when telemetry shows it did not take). `rank(view, watts)`: order of wakes and increases.
    `no_raise`: miners whose limit may not go up now (lowered a moment ago). `held_raises_w`, when given, gets the
    size of each planned limit raise not sent (below the deadband, or in `no_raise`): the plan counted it, the site
    does not draw it, and the ramp credit it took is the controller's to give back.
    """
    pending = pending or {}
    changes: list[Change] = []
    for ip, action in actions.items():
        view = views.get(ip)
        if view is None or ip in pending:
            continue
        if view.state is MinerState.UNREACHABLE:
            continue  # a call would time out; it is counted at its worst case until it answers again
        off = view.state is MinerState.SLEEPING
        if isinstance(action, SleepAction):
            if not off:
                changes.append(Change(ip, Op.SLEEP, None, decrease=True, rank=-_shed_rate(view, view.power_w)))
            continue
        watts = action.watts
        limited = use_power_limits and not isinstance(view.capability, OnOff)
        # what it runs at (or wakes up at): the last limit it accepted, else its stock power
        current = view.commanded_w if view.commanded_w is not None else view.nominal_w
        if off:
            # a miner that takes its limit while asleep always gets it before its wake (the limit it has stored
            # may not be ours): it comes up at the planned limit, which is what the plan counts it at
            stored = wakes_at_limit(view.family, view.capability)
            relimit = watts if limited and (round(current) != watts or stored) else None
            changes.append(Change(ip, Op.WAKE, relimit, rank=_rank(rank, view, watts)))
            continue
        if view.state is MinerState.WAKING or not limited:
            continue
        if round(current) == watts:
            continue
        lower = watts < current
        small = watts - current < max(RAISE_DEADBAND_W, RAISE_DEADBAND_SHARE * current)
        if not lower and (small or ip in no_raise):
            # a raise of a few watts is not worth a command: plans refine in rounds as limits take effect, and
            # sending each small raise kept a settled site busy every tick (skipping one is safe: the miner stays
            # below what the plan counts it at)
            if held_raises_w is not None:
                held_raises_w.append(watts - current)
            continue
        order_by = -_shed_rate(view, current - watts) if lower else _rank(rank, view, watts)
        changes.append(Change(ip, Op.SET_POWER, watts, decrease=lower, rank=order_by))
    return changes


def _shed_rate(view: MinerView, shed_w: float | None) -> float:
    """Watts shed per ms of client CPU the command costs."""
    watts = shed_w if shed_w is not None else view.nominal_w
    return max(0.0, watts) / CONTROL_COST_MS.get(view.family, CONTROL_COST_MS[Family.OTHER])


def _rank(rank: Callable[[MinerView, int], float] | None, view: MinerView, watts: int) -> float:
    return rank(view, watts) if rank is not None else 0.0


def order(changes: Iterable[Change]) -> tuple[list[Change], list[Change], list[Change]]:
    """(decreases: sleeps and lower limits; increases: higher limits; wakes), each in the order to send."""
    decreases: list[Change] = []
    increases: list[Change] = []
    wakes: list[Change] = []
    for c in changes:
        if c.op is Op.SLEEP or c.decrease:
            decreases.append(c)
        elif c.op is Op.WAKE:
            wakes.append(c)
        else:
            increases.append(c)
    decreases.sort(key=lambda c: c.rank)
    increases.sort(key=lambda c: c.rank)
    wakes.sort(key=lambda c: c.rank)
    return decreases, increases, wakes


# -------------------------------------------------------------------------------------------------- actuator
class Actuator:
    def __init__(
        self,
        handle: Callable[[str], MinerHandle],
        *,
        concurrency: int,
        command_timeout_s: float,
        retries_per_command: int = 3,
        retry_budget_share: float = 0.2,
        backoff_s: float = 0.25,
        backoff_max_s: float = 4.0,
    ) -> None:
        self._handle = handle
        self._sem = asyncio.Semaphore(max(1, concurrency))
        self.command_timeout_s = command_timeout_s
        self.retries_per_command = retries_per_command
        self.retry_budget_share = retry_budget_share
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s

    async def apply(
        self,
        changes: Sequence[Change],
        *,
        wake_batch: int | None = None,
        on_result: Callable[[OpResult], None] | None = None,
    ) -> Report:
        """Send the changes in the safe order; wakes in batches of `wake_batch` (None = all at once)."""
        report = Report(started_at=time.time())
        decreases, increases, wakes = order(changes)
        # the whole batch may retry this many times in total (at least a few, so one flaky miner is retried)
        budget = [max(3, int(len(changes) * self.retry_budget_share))]

        async def run(group: Sequence[Change]) -> None:
            if not group:
                return
            results = await asyncio.gather(*(self._one(c, budget) for c in group))
            for r in results:
                report.results.append(r)
                if on_result is not None:
                    on_result(r)

        await run(decreases)
        if any(not r.ok for r in report.results):
            # the rises of a plan are paid for by its decreases: one that did not take leaves the room they were to
            # fill still in use, and sent anyway they take the site over its limit. Held, not sent: the next plan
            # counts the miner that did not take its decrease at its worst case and spends only what is left
            # (soak of 2026-12-04 night, site 2082: a LuxOS miner whose session another client held was planned
            # 1.1 kW lower each time its back-off ended; the wake paid for by it went out, the lower limit failed,
            # and the next plan slept a running miner: a wake-up thrown away every back-off)
            for c in (*increases, *wakes):
                r = OpResult(c.ip, c.op, c.watts, "held", HELD_AFTER_FAILED_DECREASE, 0, time.time(), 0.0)
                report.results.append(r)
                if on_result is not None:
                    on_result(r)
        else:
            await run(increases)
            step = wake_batch if wake_batch and wake_batch > 0 else max(1, len(wakes))
            for start in range(0, len(wakes), step):
                await run(wakes[start : start + step])
        report.retries = max(0, sum(r.attempts - 1 for r in report.results))
        report.finished_at = time.time()
        return report

    async def prepare(self, ips: Iterable[str], concurrency: int = 8) -> set[str]:
        """Let each miner's handle fetch ahead what its first control call would fetch on the way (a session id, a
        salt: `prepare_control`, where the driver has it), a few at a time so commands and sweeps go first.
        Returns the miners now ready (a command to them is one exchange)."""
        sem = asyncio.Semaphore(max(1, concurrency))
        ready: set[str] = set()

        async def one(ip: str) -> None:
            try:
                handle = self._handle(ip)
            except KeyError:
                return
            fetch = getattr(handle, "prepare_control", None)
            if fetch is None:
                ready.add(ip)
                return
            async with sem:
                if await fetch():
                    ready.add(ip)

        await asyncio.gather(*(one(ip) for ip in ips))
        return ready

    async def _one(self, change: Change, budget: list[int]) -> OpResult:
        try:
            handle = self._handle(change.ip)
        except KeyError:
            return OpResult(
                change.ip, change.op, change.watts, "skipped", "no handle for this miner", 0, time.time(), 0.0
            )
        attempts = 0
        started = time.monotonic()
        while True:
            attempts += 1
            outcome, detail, retryable = await self._call(handle, change)
            if outcome == "ok" or not retryable or attempts > self.retries_per_command or budget[0] <= 0:
                return OpResult(
                    change.ip,
                    change.op,
                    change.watts,
                    outcome,
                    detail,
                    attempts,
                    time.time(),
                    time.monotonic() - started,
                )
            budget[0] -= 1
            await asyncio.sleep(min(self.backoff_max_s, self.backoff_s * 2 ** (attempts - 1)))

    async def _call(self, handle: MinerHandle, change: Change) -> tuple[str, str, bool]:
        async with self._sem:
            try:
                async with asyncio.timeout(self.command_timeout_s):
                    if change.op is Op.SLEEP:
                        result = await handle.sleep()
                    elif change.op is Op.WAKE and change.watts is not None and _limit_first(handle):
                        # it comes up at the limit it has when woken: set the planned one first, and wake only if it
                        # took (else it stays asleep, and counts as such, rather than waking above what the plan
                        # counted it at)
                        limit = await handle.set_power(change.watts)
                        if not isinstance(limit, Ok):
                            outcome, detail, retryable = _outcome(limit)
                            return (
                                "failed" if outcome == "unsupported" else outcome,
                                f"limit not set, not woken: {detail}".strip(),
                                retryable,
                            )
                        result = await handle.wake()
                    elif change.op is Op.WAKE:
                        result = await handle.wake()
                        if isinstance(result, Ok) and change.watts is not None:
                            # the limit it wakes to is the last one it had: set the planned one (best effort;
                            # the miner counts at full power while waking anyway)
                            limit = await handle.set_power(change.watts)
                            if not isinstance(limit, Ok):
                                result = Ok(f"woken; limit not set: {_describe(limit)}")
                    else:
                        assert change.watts is not None
                        result = await handle.set_power(change.watts)
            except TimeoutError:
                return "timeout", f"no answer within {self.command_timeout_s:g} s", True
            except Unreachable as exc:
                return "unreachable", str(exc) or "unreachable", True
            except DriverError as exc:
                return "failed", f"{type(exc).__name__}: {exc}", False
        return _outcome(result)


def _limit_first(handle: MinerHandle) -> bool:
    """Whether this miner's wake goes out after its limit: its firmware takes a limit while asleep."""
    ident = handle.identity
    return wakes_at_limit(ident.family, ident.capability)


def _outcome(result: Result) -> tuple[str, str, bool]:
    if isinstance(result, Ok):
        return "ok", result.detail, False
    if isinstance(result, Unsupported):
        return "unsupported", result.detail, False
    if isinstance(result, Failed):
        return "failed", result.reason, result.retryable
    return "failed", f"unexpected result {result!r}", False


def _describe(result: Result) -> str:
    if isinstance(result, Failed):
        return result.reason
    if isinstance(result, Unsupported):
        return f"unsupported {result.detail}".strip()
    return "ok"
