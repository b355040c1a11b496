"""Arbitration at run time, the first step of every tick: the fail-safe evaluated on the grid link's state, then
agent.core.arbitration over what the site has now (the licensed and run-time caps, the dispatches, the schedule,
the fail-safe's level, an under-frequency hold). Each fail-safe transition and each change of target is audited,
emitted as an event and logged here; the state itself (the fail-safe, the target) stays the controller's."""

from __future__ import annotations

from dataclasses import dataclass

from hashflex.agent.core import failsafe as fs
from hashflex.agent.core.arbitration import ArbitrationInputs, arbitrate
from hashflex.agent.core.audit import AuditKind
from hashflex.agent.core.model import Target
from hashflex.agent.logging import get_logger
from hashflex.agent.runtime.caps import Caps
from hashflex.agent.runtime.continuity import TimeKeeper
from hashflex.agent.runtime.dispatches import DispatchBook
from hashflex.agent.runtime.events import EventLog
from hashflex.agent.runtime.frequency import FrequencyResponse
from hashflex.agent.runtime.persist import WriteBehind
from hashflex.agent.runtime.rules import ControlRules

log = get_logger("controller")


@dataclass(frozen=True, slots=True)
class Decision:
    failsafe: fs.FailsafeState
    target: Target
    inputs: ArbitrationInputs  # what arbitration was given (the planning level reads the caps and holds from it)
    changed: bool  # the target moved (kW, reason or cap)


class Arbiter:
    def __init__(
        self,
        *,
        rules: ControlRules,
        caps: Caps,
        book: DispatchBook,
        frequency: FrequencyResponse | None,
        time_keeper: TimeKeeper,
        persist: WriteBehind,
        events: EventLog,
    ) -> None:
        self.rules, self.caps, self.book, self.frequency = rules, caps, book, frequency
        self.time_keeper, self.persist, self.events = time_keeper, persist, events

    def decide(self, prev: fs.FailsafeState, old: Target | None, hold_kw: float, now: float) -> Decision:
        """The fail-safe from `prev` (holding `hold_kw` should it engage now), and the target against `old`."""
        failsafe = fs.evaluate(prev, now, self.rules.failsafe, hold_kw)
        self.time_keeper.save_link(failsafe, now)
        if failsafe.active != prev.active:
            kind = "failsafe_entered" if failsafe.active else "failsafe_exited"
            data = {"reason": failsafe.reason or prev.reason, "level_kw": failsafe.level_kw}
            audit = AuditKind.FAILSAFE_ENTER if failsafe.active else AuditKind.FAILSAFE_EXIT
            self.persist.audit(audit, data, now)
            self.events.emit(kind, **data)
            log.warning(kind, **data) if failsafe.active else log.info(kind, **data)
        inputs = ArbitrationInputs(
            licensed_cap_kw=self.caps.licensed_kw,
            grid_cap_kw=self.caps.grid_kw,
            operator_cap_kw=self.caps.operator_kw,
            dispatches=self.book.for_arbitration(),
            schedule=self.rules.schedule,
            failsafe_kw=fs.limit_kw(failsafe),
            rules=self.rules.arbitration,
            frequency_kw=None if self.frequency is None else self.frequency.held_kw,
        )
        target = arbitrate(inputs, now)
        changed = (
            old is None or abs(old.kw - target.kw) > 1e-6 or old.reason != target.reason or old.cap_kw != target.cap_kw
        )
        if changed:
            data = {
                "kw": round(target.kw, 3),
                "reason": target.reason,
                "source": target.source.value,
                "cap_kw": target.cap_kw,
                "failsafe": target.failsafe,
                "detail": target.detail,
                "from_kw": None if old is None else round(old.kw, 3),
            }
            self.persist.audit(AuditKind.TARGET_CHANGE, data, now)
            self.events.emit("target_changed", **data)
            log.info("target changed", **data)
        return Decision(failsafe, target, inputs, changed)
