"""Fleet telemetry: a current picture of every miner and of the site, kept by bounded sweeps.

- A sweep polls every attached miner through its driver handle with at most `concurrency` calls in flight
  (a fixed pool of workers, not one task per miner) and a deadline per miner, so one slow or dead miner
  never holds up the others and a sweep of N miners takes at most ~N / concurrency x read_timeout_s.
- Per miner: the last good reading and its age, reachability (flagged after the first failure), consecutive
  failures; after `reidentify_after_failures` failures in a row the miner is identified again in the
  background (its firmware may have changed), never on every poll.
- Site totals: power measured from miners' reports, plus an estimate for every miner whose power is not
  known right now (unreachable, stale, or a firmware that does not report watts): its last known power, or
  its nominal power. Never zero: an unknown miner is assumed to draw power.
- Logging: one summary line per sweep; per miner only transitions, WARNING when it becomes unreachable and
  INFO when it recovers (at most `TRANSITIONS_LOGGED` lines of each per sweep, then one line with the rest).
- Identities: identified once (`discover`), handed to `on_identified` for the runtime to persist, restored
  on restart with `attach_all` (no I/O).
- Configured addresses nothing answered at (a miner booting, unplugged or refusing connections when the agent
  started) are not forgotten: each sweep retries the due ones in the background (backing off from
  UNIDENTIFIED_RETRY_S to UNIDENTIFIED_RETRY_MAX_S), and until one is identified the picture lists it in
  `FleetSnapshot.unidentified`, held at `unknown_w` (the configured worst case, else the catalogue's largest
  model): the controller counts it there on its circuit and the site, and names it in an alarm.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hashflex.agent.core.addresses import expand
from hashflex.agent.core.snapshot import FleetSnapshot, MinerSnapshot, reading_hint
from hashflex.agent.logging import get_logger
from hashflex.drivers.base import DriverError, DriverSettings, Identity, MinerDriver, MinerHandle, Reading
from hashflex.drivers.catalogue import CATALOGUE, STANDBY_W

if TYPE_CHECKING:
    from hashflex.agent.config import AgentConfig, PollingConfig

TRANSITIONS_LOGGED = 20  # per sweep and kind; the rest go into one summary line
UNIDENTIFIED_RETRY_S = 10.0  # first retry of an address nothing answered at (fleet clock: site seconds) …
UNIDENTIFIED_RETRY_MAX_S = 60.0  # … doubling up to this (an identify at an empty address is cheap)
# an unidentified address is held at the largest model we know of: it may be any of them
LARGEST_MODEL_W = max(spec.nominal_w for spec in CATALOGUE.values())

log = get_logger("fleet")


@dataclass(frozen=True, slots=True)
class DiscoverProgress:
    """One address done during `Fleet.discover`: enough for a progress bar and a live table."""

    total: int
    done: int
    found: int
    elapsed_s: float
    ip: str
    identity: Identity | None  # what answered at `ip`, if anything


ProgressCallback = Callable[[DiscoverProgress], None]
IdentifiedHook = Callable[[list[Identity]], None]


class _Miner:
    """Mutable per-miner state, owned by the fleet."""

    __slots__ = (
        "failures",
        "handle",
        "identity",
        "last_error",
        "last_power_w",
        "ok_at",
        "polled",
        "reachable",
        "reading",
    )

    def __init__(self, handle: MinerHandle) -> None:
        self.handle = handle
        self.identity = handle.identity
        self.reading: Reading | None = None
        self.ok_at: float | None = None
        self.last_power_w: float | None = None
        self.failures = 0
        self.reachable = False
        self.polled = False
        self.last_error: str | None = None


# ---------------------------------------------------------------------------------------------- fleet
class Fleet:
    def __init__(
        self,
        driver: MinerDriver,
        *,
        concurrency: int = 200,
        read_timeout_s: float = 4.0,
        stale_after_s: float = 30.0,
        identify_concurrency: int = 128,
        identify_timeout_s: float = 10.0,
        reidentify_after_failures: int = 20,
        unknown_w: float | None = None,
        clock: Callable[[], float] = time.time,
        on_identified: IdentifiedHook | None = None,
    ) -> None:
        if concurrency < 1 or identify_concurrency < 1:
            raise ValueError("concurrency limits must be at least 1")
        self.driver = driver
        self.concurrency = concurrency
        self.read_timeout_s = read_timeout_s
        self.stale_after_s = stale_after_s
        self.identify_concurrency = identify_concurrency
        self.identify_timeout_s = identify_timeout_s
        self.reidentify_after_failures = reidentify_after_failures
        self.clock = clock
        self.unknown_w = LARGEST_MODEL_W if unknown_w is None else float(unknown_w)
        self.on_identified = on_identified
        # configured addresses nothing answered at yet → (tries, next try at, on the fleet clock)
        self._unidentified: dict[str, tuple[int, float]] = {}
        self._miners: dict[str, _Miner] = {}
        self._latest: FleetSnapshot | None = None
        self._background: dict[str, asyncio.Task[None]] = {}
        self._sweeps = 0
        # commands first: while the controller has a command batch on the wire, sweeps wait between polls
        self._go = asyncio.Event()
        self._go.set()
        self._held_until = 0.0

    @classmethod
    def from_config(
        cls,
        driver: MinerDriver,
        polling: PollingConfig,
        *,
        clock: Callable[[], float] = time.time,
        unknown_w: float | None = None,
        on_identified: IdentifiedHook | None = None,
    ) -> Fleet:
        return cls(
            driver,
            concurrency=polling.concurrency,
            read_timeout_s=polling.read_timeout_s,
            stale_after_s=polling.stale_after_s,
            identify_concurrency=polling.identify_concurrency,
            identify_timeout_s=polling.identify_timeout_s,
            reidentify_after_failures=polling.reidentify_after_failures,
            unknown_w=unknown_w,
            clock=clock,
            on_identified=on_identified,
        )

    # ------------------------------------------------------------------ membership
    def attach_all(self, identities: Iterable[Identity]) -> int:
        """Build handles from cached identities, with no I/O. Returns how many were attached.

        An identity the driver can no longer build (e.g. its class vanished in a library upgrade) is skipped
        with a warning; discovery will find the miner again."""
        attached = 0
        for identity in identities:
            try:
                handle = self.driver.attach(identity)
            except DriverError as exc:
                log.warning("miner_not_attached", ip=identity.ip, driver_class=identity.driver_class, error=str(exc))
                continue
            self._replace(handle)
            self._unidentified.pop(identity.ip, None)
            attached += 1
        self._latest = None
        return attached

    def _replace(self, handle: MinerHandle) -> None:
        old = self._miners.get(handle.identity.ip)
        new = _Miner(handle)
        if old is not None:  # keep what we knew about the miner itself
            new.reading, new.ok_at, new.last_power_w = old.reading, old.ok_at, old.last_power_w
            new.reachable, new.polled, new.failures = old.reachable, old.polled, old.failures
        self._miners[handle.identity.ip] = new

    def detach(self, ip: str) -> None:
        self._miners.pop(ip, None)
        self._unidentified.pop(ip, None)
        self._latest = None

    def handle(self, ip: str) -> MinerHandle:
        return self._miners[ip].handle

    def identities(self) -> list[Identity]:
        return [m.identity for m in self._miners.values()]

    def __len__(self) -> int:
        return len(self._miners)

    def __contains__(self, ip: object) -> bool:
        return ip in self._miners

    # ------------------------------------------------------------------ discovery
    async def discover(
        self,
        addresses: Iterable[str],
        progress: ProgressCallback | None = None,
        *,
        attach: bool = True,
    ) -> list[Identity]:
        """Identify every address (single IPs, ranges a-b, CIDRs) with at most `identify_concurrency` in flight.

        Found miners are attached (unless attach=False) and handed to `on_identified` in one batch."""
        ips = expand(addresses)
        total, done, found = len(ips), 0, []
        started = time.perf_counter()
        pending = iter(ips)
        deadline = self.identify_timeout_s * 1.5 + 1.0  # the driver's own deadline, plus a wait for its slots

        async def worker() -> None:
            nonlocal done
            for ip in pending:
                identity: Identity | None = None
                try:
                    async with asyncio.timeout(deadline):
                        identity = await self.driver.identify(ip)
                except (TimeoutError, DriverError):
                    identity = None
                done += 1
                if identity is not None:
                    found.append(identity)
                if progress is not None:
                    progress(DiscoverProgress(total, done, len(found), time.perf_counter() - started, ip, identity))

        async with asyncio.TaskGroup() as tg:
            for _ in range(min(self.identify_concurrency, total)):
                tg.create_task(worker())
        found.sort(key=lambda i: _ip_key(i.ip))
        if attach:
            self.attach_all(found)
            # addresses nothing answered at: retried in the background, held at a worst case until identified
            first = self.clock() + UNIDENTIFIED_RETRY_S
            known = {i.ip for i in found}
            for ip in ips:
                if ip not in known and ip not in self._miners:
                    self._unidentified.setdefault(ip, (0, first))
            self._latest = None
        log.info("discovered", addresses=total, found=len(found), dur_s=round(time.perf_counter() - started, 2))
        self._notify(found)
        return found

    def _notify(self, identities: list[Identity]) -> None:
        if identities and self.on_identified is not None:
            try:
                self.on_identified(identities)
            except Exception as exc:  # persistence failing must not stop telemetry
                log.error("identities_not_saved", count=len(identities), error=repr(exc))

    # ------------------------------------------------------------------ sweep
    def hold(self, max_s: float) -> None:
        """Commands first: sweeps pause between polls until `release()`, or for `max_s` wall seconds at most.

        A command batch and a sweep share one event loop and one core; at site scale a sweep running beside a
        curtailment roughly halves its fan-out speed. The bound keeps telemetry from going stale behind a batch
        that is slow to finish (dead miners, timeouts)."""
        self._held_until = time.monotonic() + max(0.0, max_s)
        self._go.clear()

    def release(self) -> None:
        self._go.set()

    async def _wait_for_go(self) -> None:
        remaining = self._held_until - time.monotonic()
        if self._go.is_set() or remaining <= 0:
            return
        try:
            async with asyncio.timeout(remaining):
                await self._go.wait()
        except TimeoutError:
            self._go.set()  # held too long: telemetry goes on

    async def sweep(self) -> FleetSnapshot:
        """Poll every miner once (bounded, a deadline per miner) and return the new picture."""
        started = time.perf_counter()
        records = list(self._miners.values())
        pending: Iterator[_Miner] = iter(records)
        lost: list[_Miner] = []
        back: list[tuple[_Miner, int]] = []

        async def worker() -> None:
            for rec in pending:
                await self._wait_for_go()
                await self._poll(rec, lost, back)

        async with asyncio.TaskGroup() as tg:
            for _ in range(min(self.concurrency, len(records))):
                tg.create_task(worker())
        self._sweeps += 1
        self._retry_unidentified()
        self._log_transitions(lost, back)
        snap = self._build(time.perf_counter() - started)
        self._latest = snap
        log.info(
            "sweep",
            n=self._sweeps,
            miners=len(snap.miners),
            unreachable=snap.unreachable,
            unreachable_share=round(snap.unreachable_share, 4),
            power_kw_measured=round(snap.power_w_measured / 1000, 2),
            power_kw_estimated=round(snap.power_w_estimated / 1000, 2),
            dur_ms=round(snap.sweep_s * 1000),
        )
        return snap

    async def _poll(self, rec: _Miner, lost: list[_Miner], back: list[tuple[_Miner, int]]) -> None:
        error: str | None = None
        try:
            async with asyncio.timeout(self.read_timeout_s):
                reading = await rec.handle.read()
        except TimeoutError:
            error = f"no reading within {self.read_timeout_s:g} s"
        except DriverError as exc:
            error = str(exc) or type(exc).__name__
        except Exception as exc:  # a driver bug must cost one miner's reading, not the sweep
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            if rec.polled and not rec.reachable:
                back.append((rec, rec.failures))
            rec.reading, rec.ok_at = reading, self.clock()
            if reading.power_w is not None and rec.identity.reports_power:
                rec.last_power_w = reading.power_w
            rec.failures, rec.reachable, rec.last_error = 0, True, None
        else:
            if rec.reachable or not rec.polled:
                lost.append(rec)
            rec.failures += 1
            rec.reachable, rec.last_error = False, error
            if rec.failures % self.reidentify_after_failures == 0:
                self._reidentify_later(rec.identity.ip)
        rec.polled = True

    def _log_transitions(self, lost: list[_Miner], back: list[tuple[_Miner, int]]) -> None:
        for rec in lost[:TRANSITIONS_LOGGED]:
            log.warning("miner_unreachable", ip=rec.identity.ip, model=rec.identity.model, error=rec.last_error)
        if len(lost) > TRANSITIONS_LOGGED:
            log.warning("miners_unreachable_more", count=len(lost) - TRANSITIONS_LOGGED, total=len(lost))
        for rec, failures in back[:TRANSITIONS_LOGGED]:
            log.info("miner_recovered", ip=rec.identity.ip, model=rec.identity.model, after_failures=failures)
        if len(back) > TRANSITIONS_LOGGED:
            log.info("miners_recovered_more", count=len(back) - TRANSITIONS_LOGGED, total=len(back))

    # ------------------------------------------------------------------ re-identification
    def _reidentify_later(self, ip: str) -> None:
        if ip in self._background:
            return
        task = asyncio.get_running_loop().create_task(self._reidentify(ip), name=f"reidentify {ip}")
        self._background[ip] = task
        task.add_done_callback(lambda _t: self._background.pop(ip, None))

    async def _reidentify(self, ip: str) -> None:
        try:
            async with asyncio.timeout(self.identify_timeout_s * 1.5 + 1.0):
                identity = await self.driver.identify(ip)
        except (TimeoutError, DriverError):
            return
        current = self._miners.get(ip)
        if identity is None or current is None:
            return
        try:
            handle = self.driver.attach(identity)  # a fresh handle also drops stale sessions
        except DriverError as exc:
            log.warning("miner_not_attached", ip=ip, driver_class=identity.driver_class, error=str(exc))
            return
        self._replace(handle)
        if identity != current.identity:
            log.info("miner_reidentified", ip=ip, was=current.identity.driver_class, now=identity.driver_class)
            self._notify([identity])

    # ------------------------------------------------------------------ addresses not identified yet
    def unidentified(self) -> list[str]:
        return sorted(self._unidentified, key=_ip_key)

    def _retry_unidentified(self) -> None:
        """Identify the due addresses again in the background (never more than identify_concurrency at once)."""
        if not self._unidentified:
            return
        now = self.clock()
        running = sum(1 for ip in self._background if ip in self._unidentified)
        for ip, (_tries, due) in list(self._unidentified.items()):
            if running >= self.identify_concurrency:
                break
            if due > now or ip in self._background:
                continue
            task = asyncio.get_running_loop().create_task(self._identify_missing(ip), name=f"identify {ip}")
            self._background[ip] = task
            task.add_done_callback(self._forget_task(ip))
            running += 1

    def _forget_task(self, ip: str) -> Callable[[asyncio.Task[None]], None]:
        def forget(_task: asyncio.Task[None]) -> None:  # bound per address, not to the loop variable
            self._background.pop(ip, None)

        return forget

    async def _identify_missing(self, ip: str) -> None:
        identity: Identity | None = None
        try:
            async with asyncio.timeout(self.identify_timeout_s * 1.5 + 1.0):
                identity = await self.driver.identify(ip)
        except (TimeoutError, DriverError):
            identity = None
        entry = self._unidentified.get(ip)
        if entry is None:
            return  # detached, or identified another way meanwhile
        if identity is None:
            tries = entry[0] + 1
            wait = min(UNIDENTIFIED_RETRY_MAX_S, UNIDENTIFIED_RETRY_S * 2.0**tries)
            self._unidentified[ip] = (tries, self.clock() + wait)
            return
        try:
            handle = self.driver.attach(identity)
        except DriverError as exc:
            log.warning("miner_not_attached", ip=ip, driver_class=identity.driver_class, error=str(exc))
            self._unidentified[ip] = (entry[0] + 1, self.clock() + UNIDENTIFIED_RETRY_MAX_S)
            return
        self._replace(handle)
        del self._unidentified[ip]
        self._latest = None
        log.info(
            "miner_identified", ip=ip, model=identity.model, family=identity.family.value, after_tries=entry[0] + 1
        )
        self._notify([identity])

    async def aclose(self) -> None:
        """Cancel background re-identifications (call on shutdown)."""
        tasks = list(self._background.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ pictures
    def latest(self) -> FleetSnapshot:
        """The picture from the last sweep (or, before any, every miner unknown and estimated at nominal)."""
        if self._latest is None:
            self._latest = self._build(0.0)
        return self._latest

    def _build(self, sweep_s: float) -> FleetSnapshot:
        now = self.clock()
        miners: dict[str, MinerSnapshot] = {}
        measured_w = estimated_w = 0.0
        unreachable = 0
        for ip, rec in self._miners.items():
            snap = self._miner_snapshot(rec, now)
            miners[ip] = snap
            if snap.measured:
                measured_w += snap.power_w
            else:
                estimated_w += snap.power_w
            if not snap.reachable:
                unreachable += 1
        share = unreachable / len(miners) if miners else 0.0
        held = dict.fromkeys(self._unidentified, self.unknown_w)
        return FleetSnapshot(now, miners, measured_w, estimated_w, share, sweep_s, held)

    def _miner_snapshot(self, rec: _Miner, now: float) -> MinerSnapshot:
        ident, reading = rec.identity, rec.reading
        age = now - rec.ok_at if rec.ok_at is not None else None
        fresh = reading is not None and rec.reachable and age is not None and age <= self.stale_after_s
        if fresh and reading is not None and reading.power_w is not None and ident.reports_power:
            power, measured = reading.power_w, True
        else:
            power, measured = estimate_power_w(ident, reading if fresh else None, rec.last_power_w), False
        return MinerSnapshot(
            identity=ident,
            reading=reading,
            age_s=age,
            reachable=rec.reachable,
            failures=rec.failures,
            power_w=power,
            measured=measured,
            state_hint=reading_hint(ident, reading if fresh else None, power),
            last_error=rec.last_error,
        )


# ---------------------------------------------------------------------------------------------- estimates
def estimate_power_w(identity: Identity, fresh: Reading | None, last_known_w: float | None) -> float:
    """What a miner draws when it does not say: never zero.

    - a fresh reading from a miner that reports no watts (stock Antminer): standby if asleep, else nominal;
    - otherwise (unreachable, stale, or no watts in the reply): the last power it reported, or nominal."""
    nominal = identity.nominal_w if identity.nominal_w > 0 else 1.0
    if fresh is not None and not identity.reports_power:
        return STANDBY_W if fresh.mining is False else nominal
    if last_known_w is not None and last_known_w > 0:
        return last_known_w
    return nominal


def _ip_key(ip: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in ip.split("."))
    except ValueError:
        return (1 << 16,)


# ---------------------------------------------------------------------------------------------- wiring
def driver_settings(cfg: AgentConfig) -> DriverSettings:
    """The driver's deadlines, bounds and passwords from the site config."""
    p = cfg.polling
    return DriverSettings(
        read_timeout_s=p.read_timeout_s,
        command_timeout_s=p.command_timeout_s,
        identify_timeout_s=p.identify_timeout_s,
        passwords=cfg.credentials(),
        identify_concurrency=p.identify_concurrency,
    )


def driver_from_config(cfg: AgentConfig) -> MinerDriver:
    from hashflex.drivers.registry import create  # noqa: PLC0415  (keeps pyasic's import off paths that do not need it)

    return create(cfg.miners.driver, driver_settings(cfg))
