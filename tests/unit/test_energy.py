"""Energy integration and rollups: exact on shapes the trapezoid rule integrates exactly, consistent per miner."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hashflex.agent.core.energy import (
    DAY_S,
    QUARTER_S,
    EnergyIntegrator,
    EnergyMinute,
    SiteSample,
    rollup,
    total,
)

T0 = 1_700_000_040  # a minute boundary


def run(samples: list[SiteSample], **kw: float) -> list[EnergyMinute]:
    integ = EnergyIntegrator(**kw)
    out = []
    for s in samples:
        out += [m for m, _ in integ.add(s)]
    out += [m for m, _ in integ.close_until(math.inf)]
    return out


def test_constant_power_gives_exact_minutes() -> None:
    samples = [SiteSample(T0 + 5 * i, measured_w=60_000.0, estimated_w=0.0) for i in range(121)]  # 10 min
    minutes = run(samples)
    assert [m.minute_ts for m in minutes] == [T0 + 60 * i for i in range(10)]
    for m in minutes:
        assert m.kwh == pytest.approx(1.0)  # 60 kW for a minute
        assert m.measured_kwh == pytest.approx(1.0)
        assert m.estimated_kwh == 0.0
        assert m.covered_s == pytest.approx(60.0)
        assert m.peak_kw == pytest.approx(60.0)


def test_intervals_are_split_exactly_at_minute_boundaries() -> None:
    # a linear ramp from 0 to 120 kW over two minutes, sampled only at its ends (no sample at the boundary)
    minutes = run([SiteSample(T0, 0.0, 0.0), SiteSample(T0 + 120, 120_000.0, 0.0)])
    assert len(minutes) == 2
    # first minute: mean 30 kW -> 0.5 kWh; second: mean 90 kW -> 1.5 kWh
    assert minutes[0].kwh == pytest.approx(0.5)
    assert minutes[1].kwh == pytest.approx(1.5)


def test_measured_and_estimated_are_kept_apart() -> None:
    samples = [SiteSample(T0 + 10 * i, measured_w=30_000.0, estimated_w=6_000.0) for i in range(7)]
    (m,) = run(samples)
    assert m.measured_kwh == pytest.approx(0.5)
    assert m.estimated_kwh == pytest.approx(0.1)
    assert m.kwh == pytest.approx(0.6)


def test_a_long_gap_is_not_bridged() -> None:
    samples = [SiteSample(T0 + 10 * i, 60_000.0, 0.0) for i in range(7)]  # one minute
    samples += [SiteSample(T0 + 600 + 10 * i, 60_000.0, 0.0) for i in range(7)]  # nine minutes later
    minutes = run(samples, max_gap_s=120.0)
    assert [m.minute_ts for m in minutes] == [T0, T0 + 600]
    assert sum(m.kwh for m in minutes) == pytest.approx(2.0)


def test_a_partial_minute_reports_its_coverage() -> None:
    minutes = run([SiteSample(T0 + 30, 60_000.0, 0.0), SiteSample(T0 + 60, 60_000.0, 0.0)])
    (m,) = minutes
    assert m.covered_s == pytest.approx(30.0)
    assert m.kwh == pytest.approx(0.5)


def test_curtailment_time_and_energy_not_drawn() -> None:
    # 100 kW baseline; curtailed to 40 kW for the first 30 s of the minute, then back to 100 kW
    samples = [SiteSample(T0 + 5 * i, 40_000.0, 0.0, curtailed=True, baseline_w=100_000.0) for i in range(6)]
    samples.append(SiteSample(T0 + 30, 40_000.0, 0.0, curtailed=False))  # released at T0+30 (still at 40 kW)
    samples += [SiteSample(T0 + 30 + 5 * i, 100_000.0, 0.0) for i in range(1, 7)]
    (m,) = run(samples)
    assert m.curtailed_s == pytest.approx(30.0)
    assert m.not_drawn_kwh == pytest.approx(60.0 * 30 / 3600)  # 60 kW not drawn for 30 s
    assert m.baseline_kwh == pytest.approx(100.0 * 30 / 3600)


def test_out_of_order_samples_are_ignored() -> None:
    integ = EnergyIntegrator()
    integ.add(SiteSample(T0 + 10, 60_000.0, 0.0))
    assert integ.add(SiteSample(T0 + 5, 1e9, 0.0)) == []
    closed = integ.add(SiteSample(T0 + 70, 60_000.0, 0.0)) + integ.close_until(math.inf)
    assert [m.minute_ts for m, _ in closed] == [T0, T0 + 60]
    assert closed[0][0].kwh == pytest.approx(60.0 * 50 / 3600)  # from T0+10 only: the late sample changed nothing
    assert closed[1][0].kwh == pytest.approx(60.0 * 10 / 3600)


@pytest.mark.parametrize(
    "sample",
    [SiteSample(T0, -1.0, 0.0), SiteSample(T0, 0.0, float("nan")), SiteSample(float("inf"), 0.0, 0.0)],
)
def test_bad_samples_are_refused(sample: SiteSample) -> None:
    with pytest.raises(ValueError, match=r"negative|finite"):
        EnergyIntegrator().add(sample)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.floats(min_value=0.5, max_value=40.0),  # seconds to the next sample
            st.lists(st.floats(min_value=0.0, max_value=4000.0), min_size=3, max_size=3),  # three miners' watts
            st.lists(st.booleans(), min_size=3, max_size=3),  # measured?
        ),
        min_size=2,
        max_size=40,
    )
)
def test_per_miner_minutes_add_up_to_the_site(steps: list[tuple[float, list[float], list[bool]]]) -> None:
    integ = EnergyIntegrator(max_gap_s=60.0)
    ts = float(T0)
    closed = []
    for gap, watts, measured in steps:
        ts += gap
        miners = {f"m{i}": (w, ok) for i, (w, ok) in enumerate(zip(watts, measured, strict=True))}
        m_w = sum(w for w, ok in miners.values() if ok)
        e_w = sum(w for w, ok in miners.values() if not ok)
        closed += integ.add(SiteSample(ts, m_w, e_w), miners)
    closed += integ.close_until(math.inf)
    for site, per_miner in closed:
        assert sum(m.kwh for m in per_miner.values()) == pytest.approx(site.kwh, rel=1e-9, abs=1e-12)
        # a miner counted as measured contributed only measured watts in that minute
        measured_only = sum(m.kwh for m in per_miner.values() if m.measured)
        assert measured_only <= site.measured_kwh + 1e-9


def test_rollups_sum_minutes_into_quarters_and_days() -> None:
    day0 = (T0 // DAY_S) * DAY_S
    minutes = [
        EnergyMinute(day0 + 60 * i, 1.0, 0.75, 0.25, 60.0, 30.0 if i < 30 else 0.0, 2.0, 0.5, 60.0 + i % 7, 12)
        for i in range(0, 2 * 1440, 1)
    ]
    quarters = rollup(minutes, QUARTER_S)
    assert len(quarters) == 2 * 96
    assert quarters[0].kwh == pytest.approx(15.0)
    assert quarters[0].curtailed_share == pytest.approx(0.5)
    assert quarters[2].curtailed_share == 0.0
    days = rollup(minutes, DAY_S)
    assert [d.start for d in days] == [day0, day0 + DAY_S]
    assert days[0].kwh == pytest.approx(1440.0)
    assert days[0].estimated_share == pytest.approx(0.25)
    assert days[0].coverage == pytest.approx(1.0)
    assert days[0].peak_kw == 66.0
    whole = total(days, day0, 2 * DAY_S)
    assert whole.kwh == pytest.approx(2880.0)
    assert whole.minutes == 2880
    assert total(quarters, day0, 2 * DAY_S).kwh == pytest.approx(whole.kwh)


def test_rollup_refuses_odd_periods() -> None:
    with pytest.raises(ValueError, match="multiple of 60"):
        rollup([], 90)
