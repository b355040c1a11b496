"""The site's alarms: raised once per message (a log line unless quiet, an `alarm` event, an audit record through the
write-behind), cleared silently. The board is a plain dict of key → message, so the status and a command's
all-or-nothing can copy and restore it."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from hashflex.agent.core.audit import AuditKind
from hashflex.agent.core.closed_loop import AlarmChange
from hashflex.agent.core.model import Plan
from hashflex.agent.logging import get_logger
from hashflex.agent.runtime.events import EventLog
from hashflex.agent.runtime.persist import WriteBehind

log = get_logger("controller")

_PLAN_ALARMS = ("cannot_meet:", "min_on_overridden", "unknown_circuit")  # raised by the planner, cleared with it


class AlarmBoard(dict[str, str]):
    def __init__(self, events: EventLog, persist: WriteBehind, clock: Callable[[], float]) -> None:
        super().__init__()
        self.events = events
        self.persist = persist
        self.clock = clock

    def raise_alarm(self, key: str, message: str, *, quiet: bool = False) -> None:
        if self.get(key) == message:
            return
        self[key] = message
        if not quiet:
            log.warning("alarm", alarm=key, message=message)  # `key=` would be redacted as a secret
        self.events.emit("alarm", key=key, message=message)
        self.persist.audit(AuditKind.ALARM, {"key": key, "message": message}, self.clock())

    def drop(self, key: str) -> bool:
        """Clear `key`; True when it was raised."""
        return self.pop(key, None) is not None

    def apply(self, changes: Iterable[AlarmChange]) -> None:
        """Alarms a pure decision asks for (agent.core.observe)."""
        for alarm in changes:
            if alarm.message is None:
                self.drop(alarm.key)
            else:
                self.raise_alarm(alarm.key, alarm.message, quiet=alarm.quiet)

    def from_plan(self, p: Plan) -> None:
        """The planner's alarms: raised, and those it no longer reports cleared."""
        current = {a.split(":", 1)[0] + ":" + a.split(":", 2)[1] if a.count(":") >= 1 else a for a in p.alarms}
        for stale in [k for k in self if k.startswith(_PLAN_ALARMS)]:
            if stale not in current:
                self.pop(stale)
        for alarm in p.alarms:
            key = alarm.split(":", 2)
            self.raise_alarm(":".join(key[:2]) if len(key) > 1 else alarm, alarm)

    def store_health(self, persist: WriteBehind) -> None:
        """Retry the writes the store refused; alarm while it refuses them, clear the alarm once all are in."""
        persist.flush()
        if persist.error is not None:
            self.raise_alarm(
                "store_unavailable",
                f"the state store refuses writes ({persist.error}); controlling from memory, retrying; "
                "commands are refused until it takes writes again",
            )
        elif self.drop("store_unavailable"):
            log.info("alarm cleared", key="store_unavailable")
