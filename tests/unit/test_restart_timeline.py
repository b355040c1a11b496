"""What a run stored, read by the run after it when the wall clock stepped while the last one ran (core.timeline;
closed-loop finding `state after restart`: an override ended by a restart an hour after a forward step)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hashflex.agent.core.model import Dispatch, Source
from hashflex.agent.core.timeline import (
    STEP_THRESHOLD_S,
    TIMELINE_STATE_KEY,
    SenderClock,
    sender_window,
    shift_s,
    timeline_doc,
)
from hashflex.agent.io.records import DispatchRecord, MinerControl
from hashflex.agent.io.store import Store
from hashflex.agent.runtime.memory import save_on_timeline

T0 = 1_760_000_000.0


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (None, 0.0),  # a first start, or a store from before the record
        ("3600", 0.0),
        ({}, 0.0),
        ({"wall_offset_s": True}, 0.0),
        ({"wall_offset_s": math.nan}, 0.0),
        ({"wall_offset_s": math.inf}, 0.0),
        (timeline_doc(1.5), 0.0),  # within the step threshold: the slew, not a step
        (timeline_doc(3600.0), 3600.0),
        (timeline_doc(-30.0), -30.0),
    ],
)
def test_the_shift_is_the_wall_offset_the_last_run_recorded_beyond_the_step_threshold(
    doc: object, expected: float
) -> None:
    assert shift_s(doc, threshold_s=2.0) == expected


def test_the_shift_counts_a_step_this_run_saw_before_it_restored() -> None:
    assert shift_s(timeline_doc(3600.0), wall_offset_s=30.0, threshold_s=2.0) == 3570.0
    assert shift_s(timeline_doc(30.0), wall_offset_s=30.0, threshold_s=2.0) == 0.0


def _override(end: float | None = T0 + 300) -> DispatchRecord:
    d = Dispatch("op:o1", Source.OPERATOR, issued_at=T0 - 1, start=T0, end=end, target_kw=9.0)
    return DispatchRecord(
        d, "active", T0, channel="local", accepted_at=T0, commands_sent_at=T0 + 1, target_met_at=T0 + 20
    )


def test_a_moved_record_keeps_its_window_and_progress_on_the_new_time_and_the_senders_issue_time() -> None:
    rec = _override().moved(3600.0)
    assert (rec.dispatch.start, rec.dispatch.end) == (T0 + 3600, T0 + 3900)
    assert (rec.received_at, rec.accepted_at, rec.commands_sent_at, rec.target_met_at) == (
        T0 + 3600,
        T0 + 3600,
        T0 + 3601,
        T0 + 3620,
    )
    assert rec.closed_at is None
    assert rec.dispatch.issued_at == T0 - 1
    assert rec.doc()["time_to_target_s"] == 20.0
    assert _override(end=None).moved(-60.0).dispatch.end is None
    same = _override()
    assert same.moved(0.0) is same


def test_moved_times_and_the_new_record_are_stored_together(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "state.db")
    try:
        rec = _override().moved(3600.0)
        control = MinerControl(asleep_by_us=True, since=T0 + 3590)
        save_on_timeline(store, timeline_doc(0.0), {"10.0.0.1": control}, [rec])
        assert store.get_state(TIMELINE_STATE_KEY) == {"wall_offset_s": 0.0}
        assert store.load_controls()["10.0.0.1"].since == T0 + 3590
        [stored] = store.load_dispatches(active_only=True)
        assert (stored.dispatch.start, stored.dispatch.end, stored.status) == (T0 + 3600, T0 + 3900, "active")
    finally:
        store.close()


_times = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(
    start=st.none() | _times,
    length=st.none() | st.floats(min_value=0.001, max_value=1e6),
    issued_at=_times,
    agent_ahead_s=st.floats(min_value=-600, max_value=600),
    transits_s=st.lists(st.floats(min_value=0, max_value=300), min_size=1, max_size=5),
)
def test_a_grid_window_on_the_agents_time_holds_wherever_the_grid_meant_it_to(
    start: float | None, length: float | None, issued_at: float, agent_ahead_s: float, transits_s: list[float]
) -> None:
    """The grid's clock is true, the agent's `agent_ahead_s` ahead of it; the grid's messages take `transits_s`
    (the last one is the dispatch). The window the grid meant, placed on the agent's clock, is [start + ahead,
    end + ahead). On the agent's time the window never ends before that (a clock disagreement never un-binds a
    dispatch), starts later only by the quickest transit seen, and is widened by no more than the difference the
    messages showed. Within the step threshold the clocks agree and the window stays as sent."""
    end = None if length is None else (issued_at if start is None else start) + length
    grid = SenderClock()
    for k, transit in enumerate(transits_s[:-1]):  # earlier messages (heartbeats), one a second
        sent = issued_at - len(transits_s) + k
        grid.observe(sent + transit + agent_ahead_s, sent)
    now = issued_at + transits_s[-1] + agent_ahead_s  # the dispatch received, on the agent's clock
    offset = grid.offset_s(now, issued_at=issued_at)
    assert offset is not None
    assert agent_ahead_s - 1e-6 <= offset <= agent_ahead_s + min(transits_s) + 1e-6
    got_start, got_end = sender_window(start, end, offset_s=offset)
    if abs(offset) <= STEP_THRESHOLD_S:
        assert (got_start, got_end) == (start, end)
        return
    eps = 1e-6 * (1 + abs(issued_at) + abs(start or 0.0))
    assert (got_start is None) == (start is None)
    assert (got_end is None) == (end is None)
    if start is not None and got_start is not None:
        assert got_start <= start + agent_ahead_s + min(transits_s) + eps
        assert 0 <= start - got_start <= abs(offset) + eps
    if end is not None and got_end is not None:
        assert got_end >= end + agent_ahead_s - eps
        assert 0 <= got_end - end <= abs(offset) + eps


def test_a_message_late_from_the_broker_does_not_pass_for_a_clock_ahead() -> None:
    grid = SenderClock()
    grid.observe(T0 + 0.05, T0)  # a heartbeat, on time
    # a dispatch queued through a broker outage: issued 120 s before it arrives; the clocks still agree
    assert grid.offset_s(T0 + 130, issued_at=T0 + 10) == pytest.approx(0.05)
    assert sender_window(T0, T0 + 15, offset_s=grid.offset_s(T0 + 130, issued_at=T0 + 10)) == (T0, T0 + 15)
    # the first message of a run (nothing seen yet) is all there is to go by; what was seen is forgotten in time
    assert SenderClock().offset_s(T0 + 30, issued_at=T0) == 30
    assert grid.offset_s(T0 + 10_000, issued_at=T0 + 9_970) == 30
    assert SenderClock().offset_s(T0) is None
