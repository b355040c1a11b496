"""Energy from the site meter's import counter (agent.core.energy.MeteredEnergy): pure, clock passed in.

Properties: with the meter fresh every minute is metered and the minutes add up to the counter's delta; a stale span
falls back to the miners' sum, marked, and the counter's delta over it is carried into the first metered minute after
it, so the run still adds up to the counter; a counter that goes back, changes epoch or jumps further than the site
can draw never yields a negative, non-finite or absurd figure.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hashflex.agent.core.energy import (
    FALLBACK,
    METERED,
    MINUTE_S,
    ClosedMinute,
    CounterReading,
    EnergyMinute,
    MeteredEnergy,
    rollup,
    total,
)

T0 = 1_700_000_040  # a minute boundary
MAX_KW = 500.0


def miners_minute(minute_ts: int, kwh: float, covered_s: float = 60.0) -> ClosedMinute:
    return EnergyMinute(minute_ts, kwh, kwh, 0.0, covered_s, 0.0, 0.0, 0.0, kwh * 60, 6), {}


def run(
    powers_kw: list[float],
    miners_share: float,
    stale: set[int],
    *,
    step_s: float = 10.0,
    resets: frozenset[int] = frozenset(),
) -> tuple[list[EnergyMinute], float, MeteredEnergy]:
    """A site drawing powers_kw[i] in minute i, the counter read every step_s (not while a minute is in `stale`, and
    restarted from 0 in a minute in `resets`), the miners reporting miners_share of it; the pictures come at each
    minute's end. Returns the released minutes, the counter's true delta over the run, and the integrator."""
    me = MeteredEnergy(max_gap_s=3600, wait_s=30, slack_s=1.0, max_kw=MAX_KW)
    out: list[EnergyMinute] = []
    wh, epoch, true_kwh = 1e6, 0, 0.0
    t = float(T0)
    me.add_reading(CounterReading(t, wh, epoch))
    for i, kw in enumerate(powers_kw):
        steps = round(MINUTE_S / step_s)
        for _ in range(steps):
            t += step_s
            wh += kw * step_s / 3.6
            true_kwh += kw * step_s / 3600
            if i in resets:
                wh, epoch = 0.0, epoch + 1
            if i in stale:
                me.mark_stale()
            else:
                me.add_reading(CounterReading(t, wh, epoch))
        me.add_minutes([miners_minute(T0 + MINUTE_S * i, kw * miners_share / 60)])
        out += [m for m, _ in me.release(t)]
    out += [m for m, _ in me.flush()]
    return out, true_kwh, me


powers = st.lists(st.floats(0.0, MAX_KW * 0.9, allow_nan=False), min_size=3, max_size=40)


@settings(max_examples=150, deadline=None)
@given(powers, st.floats(0.5, 1.2))
def test_a_fresh_meter_makes_every_minute_metered_and_the_run_adds_up_to_the_counter(
    kw: list[float], share: float
) -> None:
    minutes, true_kwh, _ = run(kw, share, set())
    assert [m.minute_ts for m in minutes] == [T0 + MINUTE_S * i for i in range(len(kw))]
    assert all(m.source == METERED for m in minutes)
    assert sum(m.kwh for m in minutes) == pytest.approx(true_kwh, rel=1e-9, abs=1e-9)
    for m, p in zip(minutes, kw, strict=True):
        assert m.kwh == pytest.approx(p / 60, rel=1e-9, abs=1e-9)  # each minute its own energy
        assert m.miners_kwh == pytest.approx(p * share / 60)  # the miners' sum kept beside it
        assert m.carried_kwh == 0
    period = total(minutes, T0, MINUTE_S * len(kw))
    assert period.source == METERED
    assert period.gap_kwh == pytest.approx(true_kwh * (1 - share), rel=1e-6, abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(powers.filter(lambda p: len(p) >= 6), st.floats(0.3, 1.0), st.data())
def test_a_stale_span_falls_back_marked_and_its_energy_is_carried_to_where_the_meter_is_read_again(
    kw: list[float], share: float, data: st.DataObject
) -> None:
    a = data.draw(st.integers(1, len(kw) - 4))
    b = data.draw(st.integers(a + 1, len(kw) - 2))
    stale = set(range(a, b))
    minutes, true_kwh, me = run(kw, share, stale)
    by_ts = {m.minute_ts: m for m in minutes}
    for i in range(len(kw)):
        m = by_ts[T0 + MINUTE_S * i]
        assert m.kwh >= 0
        assert math.isfinite(m.kwh)
        if i in stale:
            assert m.source == FALLBACK
            assert m.kwh == pytest.approx(kw[i] * share / 60)  # the miners' sum
            assert m.metered_kwh == 0
    back = by_ts[T0 + MINUTE_S * (b + 1)]  # the minute after the one the meter came back in
    assert back.source == METERED
    # every kWh of the run is the counter's, but for what the miners reported beyond it over a span (not taken back)
    assert sum(m.kwh for m in minutes) == pytest.approx(true_kwh + me.overcount_kwh, rel=1e-9, abs=1e-9)
    assert back.carried_kwh == pytest.approx(
        max(0.0, sum(kw[i] for i in range(a, b + 1)) / 60 - sum(kw[i] * share for i in range(a, b + 1)) / 60),
        rel=1e-6,
        abs=1e-9,
    )
    quarter = rollup(minutes, 900)
    assert any(q.source == FALLBACK for q in quarter)
    assert sum(q.fallback_minutes for q in quarter) == len(stale) + 1  # the minute it came back in is partial


@settings(max_examples=200, deadline=None)
@given(powers, st.floats(0.3, 1.2), st.frozensets(st.integers(0, 39), max_size=4), st.sets(st.integers(0, 39)))
def test_resets_and_stale_spans_never_give_a_negative_or_absurd_minute(
    kw: list[float], share: float, resets: frozenset[int], stale: set[int]
) -> None:
    minutes, true_kwh, me = run(kw, share, stale, resets=resets)
    assert len(minutes) == len(kw)
    for m in minutes:
        for v in (m.kwh, m.metered_kwh, m.carried_kwh):
            assert math.isfinite(v)
            assert v >= 0
        assert m.metered_kwh <= MAX_KW / 60 + 1e-9  # never more than the site can draw in a minute
    # what is booked never exceeds what was drawn plus the miners' over-reports; nothing across a reset is invented
    assert (
        sum(m.kwh for m in minutes)
        <= true_kwh + me.overcount_kwh + sum(m.kwh for m in minutes if m.source == FALLBACK) + 1e-6
    )


def test_a_jump_beyond_what_the_site_can_draw_is_a_break_not_energy() -> None:
    me = MeteredEnergy(max_gap_s=600, wait_s=30, max_kw=100.0)
    me.add_reading(CounterReading(T0, 1000.0))
    me.add_reading(CounterReading(T0 + 30, 1000.0 + 100.0 * 30 / 3.6 * 1000))  # 1000× the site's maximum
    me.add_reading(CounterReading(T0 + 60, 1e9 + 10.0))
    me.add_reading(CounterReading(T0 + 120, 1e9 + 10.0 + 50.0 * 60 / 3.6))  # 50 kW for the next minute
    me.add_minutes([miners_minute(T0, 0.5), miners_minute(T0 + 60, 0.8)])
    (first, _), (second, _) = me.release(T0 + 120)
    assert first.source == FALLBACK
    assert first.kwh == pytest.approx(0.5)
    assert second.source == METERED
    assert second.kwh == pytest.approx(50.0 / 60)
    assert second.carried_kwh == 0  # across a break the counter's delta is unknown: not carried
    assert me.dropped_kwh == pytest.approx(0.0)


def test_a_minute_waits_for_the_counter_only_while_the_meter_is_stale() -> None:
    me = MeteredEnergy(max_gap_s=600, wait_s=30)
    me.add_reading(CounterReading(T0, 0.0))
    me.add_reading(CounterReading(T0 + 50, 500.0))
    me.add_minutes([miners_minute(T0, 0.4)])
    assert me.release(T0 + 70) == []  # the counter not read past the minute yet, and not stale for 30 s
    me.add_reading(CounterReading(T0 + 75, 750.0))
    ((m, _),) = me.release(T0 + 75)
    assert m.source == METERED
    assert m.kwh == pytest.approx(0.6)
    me.add_minutes([miners_minute(T0 + 60, 0.4)])
    me.mark_stale()
    assert me.release(T0 + 125) == []
    ((m, _),) = me.release(T0 + 150)  # 30 s past its end with no reading: falls back
    assert m.source == FALLBACK
    assert m.kwh == pytest.approx(0.4)
    assert me.owed_kwh == pytest.approx(0.15 - 0.4)  # 15 s of counter in it, less the miners' sum counted


@pytest.mark.parametrize("bad", [{"max_gap_s": 0}, {"wait_s": math.nan}, {"slack_s": -1}, {"max_kw": math.inf}])
def test_settings_are_checked(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        MeteredEnergy(**{"max_gap_s": 60.0, "wait_s": 5.0, **bad})  # type: ignore[arg-type]


def test_readings_must_be_finite_and_not_negative() -> None:
    me = MeteredEnergy(max_gap_s=60, wait_s=5)
    for wh in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="finite"):
            me.add_reading(CounterReading(T0, wh))
