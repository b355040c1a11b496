"""The efficiency curve and capability levels."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hashflex.agent.core.efficiency import (
    DEFAULT_CURVE,
    EfficiencyCurve,
    expected_ths,
    range_step,
    run_levels,
    snap_down,
    stock_w,
)
from hashflex.drivers.base import OnOff, PowerRange, Presets

NOMINAL_W, NOMINAL_THS = 3250.0, 110.0


def test_nominal_power_gives_nominal_hashrate() -> None:
    assert expected_ths(NOMINAL_W, NOMINAL_W, NOMINAL_THS) == pytest.approx(NOMINAL_THS)


def test_j_per_th_improves_when_underclocked_down_to_the_floor() -> None:
    c = DEFAULT_CURVE
    jth = [c.j_per_th(NOMINAL_W * f, NOMINAL_W, NOMINAL_THS) for f in (1.0, 0.9, 0.75, 0.55)]
    assert jth == sorted(jth, reverse=True)
    assert jth[-1] / jth[0] == pytest.approx(0.55**0.25)  # ≈ 14 % better at the floor


def test_below_the_floor_efficiency_stops_improving() -> None:
    c = DEFAULT_CURVE
    at_floor = c.j_per_th(NOMINAL_W * 0.55, NOMINAL_W, NOMINAL_THS)
    assert c.j_per_th(NOMINAL_W * 0.3, NOMINAL_W, NOMINAL_THS) == pytest.approx(at_floor)


def test_overclocking_costs_efficiency() -> None:
    c = DEFAULT_CURVE
    assert c.j_per_th(NOMINAL_W * 1.1, NOMINAL_W, NOMINAL_THS) > c.j_per_th(NOMINAL_W, NOMINAL_W, NOMINAL_THS)


@given(st.floats(0.0, 2.0), st.floats(0.0, 2.0), st.floats(0.0, 1.0))
def test_curve_is_monotone_and_concave(a: float, b: float, mix: float) -> None:
    """Concavity (with h(0) = 0) is what makes marginal TH/W a consistent order for the planner."""

    def h(f: float) -> float:
        return expected_ths(f * NOMINAL_W, NOMINAL_W, NOMINAL_THS)

    lo, hi = min(a, b), max(a, b)
    assert h(lo) <= h(hi) + 1e-9
    assert h(mix * lo + (1 - mix) * hi) >= mix * h(lo) + (1 - mix) * h(hi) - 1e-9


def test_unknown_or_zero_values_hash_nothing() -> None:
    assert expected_ths(0, NOMINAL_W, NOMINAL_THS) == 0.0
    assert expected_ths(1000, 0, NOMINAL_THS) == 0.0
    assert math.isinf(DEFAULT_CURVE.j_per_th(1000, NOMINAL_W, 0.0))


@pytest.mark.parametrize(("alpha", "floor"), [(0.0, 0.5), (1.5, 0.5), (0.75, 0.0), (0.75, 1.5)])
def test_curve_refuses_nonsense_parameters(alpha: float, floor: float) -> None:
    with pytest.raises(ValueError, match="must be in"):
        EfficiencyCurve(alpha, floor)


@pytest.mark.parametrize(
    ("cap", "expected"),
    [
        (PowerRange(1500, 4000, 5), 3250),  # nominal inside the range
        (PowerRange(1500, 3000, 7), 2998),  # clamped to max, snapped down to the step
        (PowerRange(3500, 4000, 5), 3500),  # nominal below the range: the lowest level
        (Presets((2000, 3000, 3600)), 3000),  # highest preset not above nominal
        (Presets((3600, 4000)), 3600),  # all above nominal: the lowest preset
        (OnOff(), 3250),
    ],
)
def test_stock_level(cap: PowerRange | Presets | OnOff, expected: int) -> None:
    assert stock_w(cap, NOMINAL_W) == expected


def test_run_levels_span_floor_to_stock_on_the_step() -> None:
    levels = run_levels(PowerRange(1000, 4000, 5), NOMINAL_W, DEFAULT_CURVE, points=8)
    assert levels[0] == 1790  # 0.55 × 3250 = 1787.5, snapped up to the 5 W step
    assert levels[-1] == 3250
    assert list(levels) == sorted(set(levels))
    assert len(levels) == 8
    assert all((w - 1000) % 5 == 0 for w in levels)


def test_run_levels_start_at_min_when_the_hardware_floor_is_higher() -> None:
    assert run_levels(PowerRange(2500, 3500, 10), NOMINAL_W, DEFAULT_CURVE, points=3)[0] == 2500


def test_run_levels_for_presets_and_on_off() -> None:
    assert run_levels(Presets((500, 2000, 3000, 3600)), NOMINAL_W, DEFAULT_CURVE) == (2000, 3000)
    assert run_levels(Presets((500,)), NOMINAL_W, DEFAULT_CURVE) == (500,)
    assert run_levels(OnOff(), NOMINAL_W, DEFAULT_CURVE) == (3250,)


@pytest.mark.parametrize(
    ("cap", "watts", "expected"),
    [
        (PowerRange(1500, 3500, 5), 2503.0, 2500),
        (PowerRange(1500, 3500, 5), 1400.0, None),
        (PowerRange(1500, 3500, 5), 9000.0, 3500),
        (Presets((2000, 3000)), 2999.0, 2000),
        (Presets((2000, 3000)), 1999.0, None),
        (OnOff(), 3250.0, 3250),
        (OnOff(), 3000.0, None),
    ],
)
def test_snap_down(cap: PowerRange | Presets | OnOff, watts: float, expected: int | None) -> None:
    assert snap_down(cap, NOMINAL_W, watts) == expected


def test_range_step_only_for_continuous_ranges() -> None:
    assert range_step(PowerRange(1, 2, 0)) == 1
    assert range_step(Presets((1,))) is None
    assert range_step(OnOff()) is None
