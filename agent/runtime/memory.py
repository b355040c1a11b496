"""What the controller remembers between ticks and across restarts: per miner (what it told it, whether it put it
to sleep, when it last switched, whether it obeys) and per dispatch (its status and compliance figures).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from hashflex.agent.core.miner_memory import MinerMemory
from hashflex.agent.core.model import Change, Dispatch, Op, Source, raises_draw
from hashflex.agent.core.timeline import TIMELINE_STATE_KEY
from hashflex.agent.io.records import DispatchRecord, MinerControl
from hashflex.agent.runtime.ports import ControlStore


def control_of(mem: MinerMemory, sending: Change | None = None) -> MinerControl:
    """The part of a miner's memory that survives a restart: never less than the miner may draw. A command that
    raises its draw (`sending`: a wake, a higher limit) counts as done from before it goes out (the miner may take
    it and the agent die before its reply is stored: a restart that believed the old figures woke other miners into
    the room a booting one was about to take); a lower one counts once it is acknowledged."""
    control = MinerControl(
        asleep_by_us=mem.asleep_by_us,
        commanded_w=mem.commanded_w,
        since=mem.last_transition,
        limits_unsupported=mem.limits_unsupported,
        ignores_commands=mem.ignores_commands,
        overdraws_limit=mem.overdraws_limit,
        woken_to_w=mem.woken_to_w,
        wake_pending=mem.pending_op == Op.WAKE.value,
    )
    if sending is None or not raises_draw(sending, mem.commanded_w):
        return control
    if sending.op is Op.WAKE:
        # it may come up at its stored level (or stock, none stored) before any limit takes, or at the limit the
        # wake goes out with: at the higher of the two (chaos kill -9: a whatsminer stored at 1,910 W was woken
        # with 3,472 W, the agent killed before the reply was stored; the restart counted it at 1,910 W and woke
        # another miner into the room it came up to)
        up = control.commanded_w
        if up is not None and sending.watts is not None:
            up = max(up, float(sending.watts))
        return dataclasses.replace(control, commanded_w=up, asleep_by_us=False, woken_to_w=None, wake_pending=True)
    return dataclasses.replace(control, commanded_w=float(sending.watts or 0))


def memory_from(c: MinerControl) -> MinerMemory:
    """A miner's memory as the last run stored it."""
    return MinerMemory(
        commanded_w=c.commanded_w,
        asleep_by_us=c.asleep_by_us and not c.wake_pending,
        last_transition=c.since,
        limits_unsupported=c.limits_unsupported,
        ignores_commands=c.ignores_commands,
        overdraws_limit=c.overdraws_limit,
        woken_to_w=c.woken_to_w,
        # a wake that may have gone out: confirmed (or re-sent) by telemetry as any acknowledged wake is;
        # the restoring controller dates it (pending_at)
        pending_op=Op.WAKE.value if c.wake_pending else None,
    )


def save_on_timeline(
    store: ControlStore,
    doc: Mapping[str, float],
    controls: Mapping[str, MinerControl],
    records: Iterable[DispatchRecord],
) -> None:
    """Store what a restart moved onto its own time (core.timeline) and the record of that time, in one transaction:
    a run killed half-way leaves the last run's times and its record, which the next start moves again."""
    with store.transaction():
        if controls:
            store.save_controls(controls)
        for rec in records:
            store.save_dispatch(rec.dispatch, rec.status, **rec.progress())
        store.set_state(TIMELINE_STATE_KEY, dict(doc))


def ended_copy(dispatch: Dispatch, now: float) -> Dispatch:
    end = now if dispatch.end is None else min(dispatch.end, now)
    return dataclasses.replace(dispatch, end=end)


def is_override(record: DispatchRecord) -> bool:
    return record.dispatch.source is Source.OPERATOR
