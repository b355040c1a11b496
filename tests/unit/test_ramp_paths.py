"""A ramped input's path survives a restart (agent.runtime.level: RAMPS_STATE_KEY), and what a store holds there is
never taken on trust."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from hashflex.agent.config import ControlConfig
from hashflex.agent.runtime.level import PlanningLevel, ramps_from_doc


def test_only_finite_non_negative_figures_are_restored() -> None:
    doc = {"at": 100.0, "paths": {"grid:a": 12.5, "grid:b": math.nan, "grid:c": -1.0, "grid:d": True, 7: 1.0}}
    assert ramps_from_doc(doc) == ({"grid:a": 12.5}, 100.0)
    for junk in (None, [], "ramps", {"paths": [1, 2]}, {"at": "x"}):
        assert ramps_from_doc(junk)[0] == {}
    assert ramps_from_doc({"at": math.inf, "paths": {"grid:a": 1.0}}) == ({"grid:a": 1.0}, None)


@given(at=st.floats(0.0, 1e6), down_s=st.floats(0.0, 3600.0), shift=st.floats(-3600.0, 3600.0))
def test_a_restored_path_goes_on_from_when_it_was_left_never_from_the_future(
    at: float, down_s: float, shift: float
) -> None:
    level = PlanningLevel(ControlConfig(), 1000.0)
    now = at + shift + down_s
    level.restore_ramps({"at": at, "paths": {"grid:a": 500.0}}, shift_s=shift, now=now)
    assert level.ramps == {"grid:a": 500.0}
    assert level._ramps_at is not None
    assert level._ramps_at <= now
    assert abs(level._ramps_at - (at + shift)) < 1e-6
