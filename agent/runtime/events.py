"""Lifecycle events: `{"type", "ts", "data"}` documents, kept in a short ring for `hashflex events` and handed to
subscribers (the MQTT link's never-dropped …/events queue, metrics). Subscribers are synchronous and must not
block: the control loop emits events.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from hashflex.agent.core.timefmt import iso_ms
from hashflex.agent.logging import get_logger

log = get_logger("events")

EVENT_TYPES = frozenset(
    {
        "received",
        "accepted",
        "rejected",
        "commands_sent",
        "target_reached",
        "expired",
        "cancelled",
        "failed",
        "failsafe_entered",
        "failsafe_exited",
        "cap_changed",
        "alarm",
        "agent_start",
        "agent_stop",
        "target_changed",
    }
)

Subscriber = Callable[[dict[str, Any]], None]


class EventLog:
    def __init__(self, clock: Callable[[], float], capacity: int = 2000) -> None:
        self._clock = clock
        self._ring: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def emit(self, event_type: str, **data: Any) -> dict[str, Any]:
        if event_type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {event_type!r}")
        doc: dict[str, Any] = {"type": event_type, "ts": iso_ms(self._clock()), "data": data}
        self._ring.append(doc)
        for subscriber in self._subscribers:
            try:
                subscriber(doc)
            except Exception:  # a broken subscriber must not stop the control loop
                log.exception("event subscriber failed", type=event_type)
        return doc

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        return list(self._ring)[-limit:]
