"""What a run stored, read by the run after it when the wall clock stepped while the last one ran (core.timeline;
closed-loop finding `state after restart`: an override ended by a restart an hour after a forward step)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from hashflex.agent.core.model import Dispatch, Source
from hashflex.agent.core.timeline import TIMELINE_STATE_KEY, shift_s, timeline_doc
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
