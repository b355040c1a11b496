"""The level the miners are planned to, tick by tick: each limit ramps on its own path (arbitration.ramped_level),
with a site meter the miners get the site level's share (agent.runtime.metering), and the site-level correction
from measurement (core.correction) plans lower while the site draws more than the plan counts. Also whether this
tick plans fast (sleep-only, when the level drops) and the ramp-up allowance it may spend (a token bucket)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from hashflex.agent.config import ControlConfig
from hashflex.agent.core.arbitration import ArbitrationInputs, ramped_level
from hashflex.agent.core.correction import corrected_bias
from hashflex.agent.core.model import MinerView, Plan, Target
from hashflex.agent.core.planning.worst_case import excess_w, largest_full_w
from hashflex.agent.core.ramp import ramp_credit_cap_kw, ramp_credit_kw, spend_ramp_credit
from hashflex.agent.runtime.metering import MeterControl, MeterTick
from hashflex.agent.runtime.persist import WriteBehind

# with a site meter, the miners' level follows the non-miner load's recent maximum, which creeps up with meter noise:
# a fall of the miners' level smaller than this share of the licensed cap goes to the ordinary plan on this tick,
# not to a sleep-only one (which can only sleep whole miners, and the next plan would wake them back)
METER_FAST_DROP_SHARE = 0.005
# where each ramped input's own path is ({ramp key: kW}), kept so a restart goes on down it: started again from the
# site's power at the restart, a ramp a crash found low (the site asleep under a lower input that ended since)
# began from there and held the site at nothing for the rest of a 100-minute ramp (soak 20261204, site 429)
RAMPS_STATE_KEY = "ramps"


def _finite(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def ramps_from_doc(doc: object) -> tuple[dict[str, float], float | None]:
    """The ramp paths a run stored (RAMPS_STATE_KEY) and when, on its clock; what is not a finite, non-negative
    figure is dropped."""
    if not isinstance(doc, dict) or not isinstance(doc.get("paths"), dict):
        return {}, None
    at = doc.get("at")
    paths = {k: float(v) for k, v in doc["paths"].items() if isinstance(k, str) and _finite(v)}
    return paths, float(at) if isinstance(at, int | float) and _finite(at) else None


@dataclass(frozen=True, slots=True)
class LevelStep:
    plan_kw: float  # what the planner is given: the miners' level less the correction
    fast: bool  # plan sleep-only now (the level dropped, or the site draws above it and no fast plan went out yet)
    allowance_kw: float | None  # the ramp-up the plan may spend (None: no ramp limit)


class PlanningLevel:
    def __init__(self, cfg: ControlConfig, licensed_cap_kw: float, persist: WriteBehind | None = None) -> None:
        self.cfg = cfg
        self.licensed_cap_kw = licensed_cap_kw
        self.persist = persist  # the ramp paths are kept in the store (RAMPS_STATE_KEY)
        self._saved_ramps: dict[str, float] = {}
        self._ramps_at: float | None = None  # restored paths: when the last run left them (they go on from then)
        self.level_kw: float | None = None  # the ramped level planned for last tick
        self.miner_level_kw: float | None = None  # the miners' share of the level, planned for last tick
        self.plan_kw: float | None = None  # what the planner was given last tick (the miners' level less the bias)
        self.ramps: dict[str, float] = {}  # where each ramped input's own path is (arbitration.ramped_level)
        self.ramp_credit_kw = 0.0  # ramp-up credit left unspent (ramp.ramp_credit_kw: a token bucket)
        # closed-loop correction: measured above target → plan lower. Starts at nothing and learns only from a plan
        # that was carried out: what the site draws above its cap at start is what the first plan cuts
        self.bias_kw = 0.0
        self.fast_done = False  # a fast plan went out for this target (no second one for the same excess)

    def step(
        self,
        target: Target,
        inputs: ArbitrationInputs,
        views: Sequence[MinerView],
        *,
        present_kw: float,
        now: float,
        dt: float,
        measured_fresh: bool,
        may_correct: bool,
        meter: MeterControl | None,
        metered: MeterTick | None,
        sleep_w: float,
    ) -> LevelStep:
        """This tick's level. `measured_fresh`: the picture is new; `may_correct`: the last plan was carried out
        and has settled, so the correction may learn from it (Commander.settled)."""
        prev_level = self.level_kw if self.level_kw is not None else present_kw
        # the correction works on the miners (their sum against their share of the level); with a meter, what the
        # rest of the site draws is counted by its own rule (agent.core.site_meter), not corrected twice
        prev_miner_level = prev_level if metered is None or self.miner_level_kw is None else self.miner_level_kw
        if measured_fresh and may_correct:
            # what the plan already counts per miner (measured above its setting) is not the site's to correct
            explained_kw = sum(excess_w(v, sleep_w) for v in views) / 1000.0
            c = self.cfg
            self.bias_kw = corrected_bias(
                self.bias_kw,
                present_kw - explained_kw,
                prev_miner_level,
                tolerance_kw=c.tolerance_kw,
                ramp_up_kw_per_min=c.ramp_up_kw_per_min,
                tick_s=c.tick_s,
            )
        # each input ramps on its own (an input without a ramp binds at once): the level is the lowest of them
        # restored paths have gone on down since the last run left them, the time it was down included
        dt_ramps = dt if self._ramps_at is None else max(dt, now - self._ramps_at)
        ramped = ramped_level(inputs, now, dt_ramps, self.ramps, from_kw=prev_level)
        level, self.ramps, self._ramps_at = ramped.kw, ramped.ramps, None
        self._save_ramps(now)
        self.level_kw = level
        if meter is None:
            miner_level, fast_drop = level, 1e-6
            plan_kw = max(0.0, min(target.cap_kw, level - self.bias_kw))
        else:
            miner_level = meter.miners_share(min(target.cap_kw, level), present_kw).miner_level_kw
            plan_kw = max(0.0, miner_level - self.bias_kw)
            fast_drop = max(1e-6, METER_FAST_DROP_SHARE * self.licensed_cap_kw)
        self.miner_level_kw, self.plan_kw = miner_level, plan_kw
        up = self.cfg.ramp_up_kw_per_min
        # the ramp-up allowance builds up between ticks (a rate below one miner per tick must still wake miners)
        allowance = (
            None
            if up is None
            else ramp_credit_kw(
                self.ramp_credit_kw, up, dt, ramp_credit_cap_kw(up, self.cfg.tick_s, largest_full_w(views) / 1000)
            )
        )
        fast = miner_level < prev_miner_level - fast_drop or (
            measured_fresh and present_kw > plan_kw + self.cfg.tolerance_kw and not self.fast_done
        )
        return LevelStep(plan_kw, fast, allowance)

    def restore_ramps(self, doc: object, *, shift_s: float, now: float) -> None:
        """The ramp paths the last run stored: a restart goes on down them from where they were then (`shift_s`:
        how far the last run's times move onto this run's clock, core.timeline)."""
        paths, at = ramps_from_doc(doc)
        self.ramps = self._saved_ramps = paths
        self._ramps_at = None if at is None or not paths else min(now, at + shift_s)

    def _save_ramps(self, now: float) -> None:
        shown = {k: round(v, 3) for k, v in self.ramps.items()}
        if shown != self._saved_ramps and self.persist is not None:
            self.persist.call("set_state", RAMPS_STATE_KEY, {"at": now, "paths": shown}, now)
            self._saved_ramps = shown

    def planned(self, step: LevelStep, planned: Plan) -> None:
        """The plan made on `step`: the ramp-up credit it spent, and whether a fast plan went out for this target."""
        self.ramp_credit_kw = spend_ramp_credit(step.allowance_kw, planned.raised_kw)
        self.fast_done = step.fast

    def unsent(self, step: LevelStep, raises_kw: float) -> None:
        """Raises too small to send took ramp credit for a rise the site does not make: given back, or the credit
        never grows past them and a ramped site creeps nowhere (soak: 7 miners asleep for good under a dispatch at
        twice what it drew)."""
        if step.allowance_kw is not None and raises_kw:
            self.ramp_credit_kw = min(step.allowance_kw, self.ramp_credit_kw + raises_kw)

    def planning_level_kw(self, metered: bool) -> float | None:
        """The level the miners are planned to (with a site meter: the site level less the non-miner load counted)."""
        if metered and self.plan_kw is not None:
            return round(self.plan_kw, 3)
        return None if self.level_kw is None else round(self.level_kw - self.bias_kw, 3)
