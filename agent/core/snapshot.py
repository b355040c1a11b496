"""The fleet picture the sweep hands the controller: per miner its last reading, reachability and power (measured,
or estimated: never zero for an unknown miner), and the site's sums. Plain frozen values, built by
agent.runtime.fleet and read by the core (agent.core.observe) and the read side."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from hashflex.drivers.base import Identity, Reading

StateHint = Literal["hashing", "sleeping", "waking", "unknown"]
WAKING_SHARE = 0.02  # not hashing, yet drawing more than this share of nominal: coming up (a booting miner draws
# a few % of nominal for the first third of its wake-up, a sleeping one under 1 %: at 20 % a boot read as sleep)


@dataclass(frozen=True, slots=True)
class MinerSnapshot:
    identity: Identity
    reading: Reading | None  # the last good reading (may be old: see age_s and reachable)
    age_s: float | None  # seconds since that reading; None = never read
    reachable: bool  # the last poll succeeded
    failures: int  # consecutive failed polls
    power_w: float  # measured, or estimated (last known or nominal): never zero for an unknown miner
    measured: bool  # power_w is a fresh report from the miner
    state_hint: StateHint  # what the reading alone says (reading_hint); agent.core.observe decides the state
    last_error: str | None = None  # why the last poll failed

    @property
    def ip(self) -> str:
        return self.identity.ip


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    ts: float
    miners: Mapping[str, MinerSnapshot]
    power_w_measured: float  # sum of fresh reports
    power_w_estimated: float  # sum of estimates for the rest
    unreachable_share: float  # 0..1 of attached miners whose last poll failed (or that were never read)
    sweep_s: float  # wall time of the sweep that produced it; 0 when built without a sweep
    # configured addresses not identified yet → the worst case each is held at (W); not in `miners`, not in the
    # power sums (nothing is known of them but that a miner may be there)
    unidentified: Mapping[str, float] = field(default_factory=dict)

    @property
    def power_w(self) -> float:
        return self.power_w_measured + self.power_w_estimated

    @property
    def unreachable(self) -> int:
        return sum(1 for m in self.miners.values() if not m.reachable)

    @property
    def hashrate_ths(self) -> float:
        return sum(m.reading.hashrate_ths or 0.0 for m in self.miners.values() if m.reachable and m.reading is not None)


def reading_hint(identity: Identity, fresh: Reading | None, power_w: float) -> StateHint:
    """What one fresh reading alone says the miner does (None: no fresh reading). Only an input: the miner's state
    is decided by agent.core.observe, from this and what the agent told it."""
    if fresh is None or fresh.mining is None:
        return "unknown"
    if fresh.mining:
        return "hashing"
    if fresh.power_w is not None and power_w > WAKING_SHARE * identity.nominal_w:
        return "waking"
    return "sleeping"
