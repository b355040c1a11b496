"""Frequency response, the pure part (agent.core.frequency) and its config: stage detection with ride-through,
hold and restore; the pre-armed shed list (Hypothesis: the fewest commands for any stage, never a miner that
cannot shed); the `frequency_response:` section's errors naming file, field and value."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hashflex.agent.config import ConfigError, load_config
from hashflex.agent.core.frequency import (
    Candidate,
    FrequencyRules,
    FrequencyState,
    Stage,
    observe,
    resumed,
    send_order,
    shed_list,
    unknown,
)
from hashflex.agent.core.model import MinerState, MinerView
from hashflex.agent.runtime.frequency import FrequencyResponse
from hashflex.drivers.base import Family, OnOff

RULES = FrequencyRules(
    (Stage(49.4, 0.2, shed_pct=25.0), Stage(49.0, 0.0, shed_pct=60.0)),
    restore_above_hz=49.9,
    restore_after_s=10.0,
    max_gap_s=1.0,
)


def run(readings: list[tuple[float, float]], state: FrequencyState | None = None) -> tuple[FrequencyState, list[Any]]:
    st_ = state or FrequencyState.initial(RULES)
    decisions = []
    for at, hz in readings:
        st_, d = observe(st_, RULES, hz, at)
        decisions.append(d)
    return st_, decisions


def poll(start: float, end: float, hz: float, every: float = 0.1) -> list[tuple[float, float]]:
    n = round((end - start) / every)
    return [(start + i * every, hz) for i in range(n + 1)]


def test_a_dip_longer_than_for_s_trips_the_stage_once() -> None:
    state, ds = run([*poll(0, 1, 50.0), *poll(1.1, 1.5, 49.3)])
    tripped = [(i, d.tripped) for i, d in enumerate(ds) if d.tripped]
    # the first reading below at 1.1; 0.2 s later (1.3) the stage trips, and only once
    assert len(tripped) == 1
    assert tripped[0][1] == (0,)
    assert state.depth == 1
    assert state.first_below_at == pytest.approx(1.1)
    assert state.tripped_at == pytest.approx(1.3)


def test_a_dip_shorter_than_for_s_is_ridden_through() -> None:
    state, ds = run([*poll(0, 1, 50.0), *poll(1.1, 1.2, 49.3), *poll(1.3, 3, 50.0)])
    assert not any(d.tripped for d in ds)
    assert state.depth == 0
    # and a second short dip later does not add up with the first
    state, ds = run(poll(3.1, 3.2, 49.3), state)
    assert not any(d.tripped for d in ds)


def test_a_deeper_stage_trips_on_its_own_timer_and_the_lowest_reading_is_kept() -> None:
    state, ds = run([*poll(0, 0.5, 50.0), *poll(0.6, 0.9, 49.3), (1.0, 48.9), (1.1, 49.2)])
    assert [d.tripped for d in ds if d.tripped] == [(0,), (1,)]
    assert state.depth == 2
    assert state.min_hz == pytest.approx(48.9)


def test_restore_after_the_frequency_has_been_above_the_threshold_for_the_restore_time() -> None:
    state, _ = run([*poll(0, 0.5, 50.0), *poll(0.6, 1.0, 49.3)])
    assert state.depth == 1
    # above the threshold but a dip back to 49.85 restarts the restore time
    state, ds = run([*poll(1.1, 6, 49.95), (6.1, 49.85), *poll(6.2, 16.1, 49.95)], state)
    assert not any(d.restore for d in ds)
    state, ds = run(poll(16.2, 16.4, 49.95), state)
    restored = [d for d in ds if d.restore]
    assert len(restored) == 1
    assert restored[0].ended.min_hz == pytest.approx(49.3)
    assert state.depth == 0


def test_a_stale_meter_or_a_gap_never_restores_an_event() -> None:
    state, _ = run([*poll(0, 0.5, 50.0), *poll(0.6, 1.0, 49.3), *poll(1.1, 9, 50.0)])
    assert state.depth == 1  # 8 s above: not yet the 10 s restore time
    state = unknown(state, 9.5)  # the meter went stale
    state, ds = run(poll(20, 25, 50.0), state)
    assert not any(d.restore for d in ds)  # the time above starts again after the gap
    state, ds = run(poll(40, 41, 50.0), state)  # a gap in the readings (no stale flag): the same
    assert not any(d.restore for d in ds)
    assert state.depth == 1


def test_a_dip_across_a_gap_is_not_counted_as_continuous() -> None:
    _state, ds = run([(0.0, 49.3), (5.0, 49.3)])
    assert not any(d.tripped for d in ds)


@pytest.mark.parametrize(
    ("stages", "why"),
    [
        ((Stage(49.0, 0.2, shed_pct=25.0), Stage(49.4, 0.2, shed_pct=50.0)), "falling"),
        ((Stage(49.4, 0.2, shed_pct=50.0), Stage(49.0, 0.2, shed_pct=25.0)), "at least as much"),
        ((Stage(49.4, 0.2, shed_pct=25.0), Stage(49.0, 0.2, shed_kw=50.0)), "same unit"),
    ],
)
def test_rules_refuse_disordered_stages(stages: tuple[Stage, ...], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        FrequencyRules(stages, restore_above_hz=49.9, restore_after_s=1.0)


# ------------------------------------------------------------------------------------------------ shed list
candidates = st.lists(
    st.builds(
        Candidate,
        id=st.text("abcdef0123", min_size=1, max_size=6),
        kw=st.floats(0.0, 12.0, allow_nan=False),
        cost_ms=st.sampled_from([0.25, 0.4, 2.0, 3.0]),
    ),
    max_size=60,
    unique_by=lambda c: c.id,
)


@settings(max_examples=300, deadline=None)
@given(cands=candidates, share=st.floats(0.0, 1.2))
def test_the_shed_list_reaches_any_kw_and_every_command_in_it_is_needed(cands: list[Candidate], share: float) -> None:
    sl = shed_list(cands)
    usable = [c for c in cands if c.kw > 0]
    total = sum(c.kw for c in usable)
    want = share * total
    chosen = sl.take(want)
    got = sum(c.kw for c in chosen)
    assert all(c.kw > 0 for c in chosen)
    assert len({c.id for c in chosen}) == len(chosen)
    if want <= 1e-9:
        assert chosen == []
    elif got >= want - 1e-9:
        # irredundant: without any one of them the rest fall short
        for c in chosen:
            assert got - c.kw < want - 1e-9, (c, want, got)
    else:
        assert want > total - 1e-9  # short only when the miners cannot reach it ...
        assert len(chosen) == len(usable)  # ... and then every miner that can shed
    assert sl.count_for(want) == len(chosen)
    assert sorted(c.id for c in send_order(chosen)) == sorted(c.id for c in chosen)


@settings(max_examples=300, deadline=None)
@given(cands=candidates, share=st.floats(0.0, 1.0), cost=st.sampled_from([0.25, 0.4, 3.0]))
def test_among_commands_of_one_cost_the_fewest_reach_the_kw(cands: list[Candidate], share: float, cost: float) -> None:
    same = [Candidate(c.id, c.kw, cost) for c in cands]
    want = share * sum(c.kw for c in same if c.kw > 0)
    chosen = shed_list(same).take(want)
    if want > 1e-9:
        # no fewer miners reach it: the k-1 largest draws fall short
        best_smaller = sum(sorted((c.kw for c in same if c.kw > 0), reverse=True)[: max(0, len(chosen) - 1)])
        assert best_smaller < want - 1e-9


@settings(max_examples=200, deadline=None)
@given(cands=candidates, share=st.floats(0.0, 1.0))
def test_cheaper_commands_go_first(cands: list[Candidate], share: float) -> None:
    ranked = shed_list(cands).ranked
    rates = [c.rate for c in ranked]
    assert rates == sorted(rates, reverse=True)
    order = send_order(shed_list(cands).take(share * sum(c.kw for c in cands)))
    assert [c.rate for c in order] == sorted((c.rate for c in order), reverse=True)


@settings(max_examples=200, deadline=None)
@given(cands=candidates, share=st.floats(0.0, 1.0), skip_n=st.integers(0, 10))
def test_taking_around_miners_already_slept_still_reaches_the_kw(
    cands: list[Candidate], share: float, skip_n: int
) -> None:
    sl = shed_list(cands)
    skip = {c.id for c in sl.ranked[:skip_n]}
    rest = [c for c in sl.ranked if c.id not in skip]
    want = share * sum(c.kw for c in rest)
    chosen = sl.take(want, skip=skip)
    assert not skip & {c.id for c in chosen}
    assert sum(c.kw for c in chosen) >= want - 1e-6


def view(ip: str, state: MinerState, power_w: float | None, **kw: Any) -> MinerView:
    return MinerView(
        id=ip,
        family=kw.pop("family", Family.LUXOS),
        capability=OnOff(),
        nominal_w=3500.0,
        nominal_ths=100.0,
        state=state,
        power_w=power_w,
        commanded_w=None,
        **kw,
    )


class _Host:
    def __init__(self) -> None:
        self.in_flight: dict[str, Any] = {}
        self.fired: list[Any] = []
        self.audits: list[dict[str, Any]] = []
        self.saved: list[dict[str, Any] | None] = []  # the event the store would keep, each write
        self.braces: list[bool] = []

    def fire_shed(self, changes: list[Any], level_kw: float, now: float) -> None:
        self.fired.append((changes, level_kw))

    def audit(self, data: dict[str, Any], now: float) -> None:
        self.audits.append(data)

    def save(self, doc: dict[str, Any] | None, now: float, audits: Any = ()) -> None:
        self.saved.append(doc)
        self.audits.extend(audits)

    def brace(self, on: bool) -> None:
        self.braces.append(on)

    def trigger(self) -> None:
        pass


@settings(max_examples=150, deadline=None)
@given(
    states=st.lists(st.sampled_from(list(MinerState)), min_size=1, max_size=40),
    ignores=st.lists(st.booleans(), min_size=40, max_size=40),
    busy=st.sets(st.integers(0, 39)),
)
def test_the_armed_list_never_holds_a_miner_asleep_unreachable_busy_or_ignoring_commands(
    states: list[MinerState], ignores: list[bool], busy: set[int]
) -> None:
    from hashflex.agent.config import FrequencyResponseConfig

    cfg = FrequencyResponseConfig.model_validate(
        {"stages": [{"below_hz": 49.4, "for_s": 0, "shed": "100%"}], "restore_above_hz": 49.9, "restore_after_s": 1}
    )
    host = _Host()
    fr = FrequencyResponse(cfg, host, host, trigger=host.trigger, clock=lambda: 0.0, meter_fresh=lambda: True)
    views = [view(f"10.0.0.{i}", s, 3000.0, ignores_commands=ignores[i]) for i, s in enumerate(states)]
    fr.arm(views, {f"10.0.0.{i}" for i in busy}, 100.0, 0.0)
    allowed = {
        v.id
        for i, v in enumerate(views)
        if v.state in (MinerState.HASHING, MinerState.THROTTLED) and not v.ignores_commands and i not in busy
    }
    assert {c.id for c in fr.armed.ranked} == allowed
    # a trip sleeps from that list only, and holds the site at what it drew less the stage
    fr.on_hz(_Hz(49.0, 1.0))
    assert fr.held_kw is not None
    sent = {c.ip for c in host.fired[0][0]} if host.fired else set()
    assert sent <= allowed
    assert [a["step"] for a in host.audits][:2] == ["tripped", "commands_out"]


class _Hz:
    def __init__(self, hz: float, at: float) -> None:
        self.hz, self.read_at = hz, at


def test_a_reading_while_the_meter_is_stale_is_not_acted_on() -> None:
    from hashflex.agent.config import FrequencyResponseConfig

    cfg = FrequencyResponseConfig.model_validate(
        {"stages": [{"below_hz": 49.4, "for_s": 0, "shed": "25%"}], "restore_above_hz": 49.9, "restore_after_s": 0}
    )
    host, fresh = _Host(), [False]
    fr = FrequencyResponse(cfg, host, host, trigger=host.trigger, clock=lambda: 0.0, meter_fresh=lambda: fresh[0])
    fr.arm([view(f"10.0.0.{i}", MinerState.HASHING, 3000.0) for i in range(8)], set(), 30.0, 0.0)
    fr.on_hz(_Hz(49.0, 1.0))
    assert fr.held_kw is None
    fresh[0] = True
    fr.on_hz(_Hz(49.0, 1.1))
    assert fr.held_kw == pytest.approx(30.0 - 0.25 * 24.0)
    assert len(host.fired[0][0]) == 2  # 6 kW of 3 kW miners: two commands
    fresh[0] = False
    fr.on_hz(_Hz(50.0, 1.2))  # above the threshold, restore time 0: but the meter is stale
    assert fr.held_kw is not None
    fresh[0] = True
    fr.on_hz(_Hz(50.0, 1.3))
    assert fr.held_kw is None
    assert [a["step"] for a in host.audits] == ["tripped", "commands_out", "restored"]


# ------------------------------------------------------------------------------------------------ config
def _write(tmp_path: Path, section: dict[str, Any], meter: bool = True) -> Path:
    doc: dict[str, Any] = {
        "site": {"id": "f", "cap_kw": 1000},
        "frequency_response": section,
        "state_dir": str(tmp_path / "state"),
    }
    if meter:
        doc["site"]["meter"] = {"host": "127.0.0.1", "non_miner_allowance_kw": 50}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


GOOD = {
    "stages": [{"below_hz": 49.4, "for_s": 0.2, "shed": "25%"}, {"below_hz": 49.0, "for_s": 0, "shed": "50%"}],
    "restore_above_hz": 49.9,
    "restore_after_s": "30s",
}


def test_a_good_section_loads(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, GOOD))
    fr = cfg.frequency_response
    assert fr is not None
    assert fr.stages[0].shed_pct == 25.0
    assert fr.stages[0].for_s == pytest.approx(0.2)
    assert fr.restore_after_s == 30.0
    assert fr.poll_s == 0.1


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"stages": [{"below_hz": 49.4, "for_s": 0.2, "shed": "25"}]}, "stages[0].shed = '25'"),
        ({"stages": [{"below_hz": 49.4, "for_s": 0.2, "shed": "125%"}]}, "at most 100 %"),
        ({"stages": [{"below_hz": ".nan", "for_s": 0.2, "shed": "25%"}]}, "stages[0].below_hz"),
        ({"stages": [{"below_hz": 30, "for_s": 0.2, "shed": "25%"}]}, "stages[0].below_hz = 30"),
        (
            {
                "stages": [
                    {"below_hz": 49.0, "for_s": 0.2, "shed": "25%"},
                    {"below_hz": 49.4, "for_s": 0, "shed": "50%"},
                ]
            },
            "stages[1].below_hz = 49.4",
        ),
        (
            {
                "stages": [
                    {"below_hz": 49.4, "for_s": 0.2, "shed": "50%"},
                    {"below_hz": 49.0, "for_s": 0, "shed": "25%"},
                ]
            },
            "stages[1].shed = '25%'",
        ),
        ({"stages": [{"below_hz": 49.4, "for_s": 0.2, "shed": "2000kW"}]}, "above site.cap_kw"),
        ({"restore_above_hz": 49.0}, "restore_above_hz = 49.0"),
        # a stage's own restore rule
        (
            {"stages": [{"below_hz": 49.4, "for_s": 0.2, "shed": "25%", "restore_above_hz": 49.4}]},
            "stages[0].restore_above_hz = 49.4",
        ),
        (
            {
                "stages": [
                    {"below_hz": 49.4, "for_s": 0.2, "shed": "25%"},
                    {"below_hz": 49.0, "for_s": 0, "shed": "50%", "restore_above_hz": 49.2},
                ]
            },
            "stages[1].restore_above_hz = 49.2",
        ),
        (
            {"stages": [{"below_hz": 49.4, "for_s": 0.2, "shed": "25%", "restore_above_hz": float("nan")}]},
            "stages[0].restore_above_hz",
        ),
        (
            {"stages": [{"below_hz": 49.4, "for_s": 0.2, "shed": "25%", "restore_after_s": float("inf")}]},
            "stages[0].restore_after_s",
        ),
        (
            {"stages": [{"below_hz": 49.4, "for_s": 0.2, "shed": "25%", "restore_after_s": "-5s"}]},
            "stages[0].restore_after_s",
        ),
        ({"stages": []}, "stages"),
    ],
)
def test_bad_sections_are_refused_naming_file_field_and_value(
    tmp_path: Path, change: dict[str, Any], expect: str
) -> None:
    path = _write(tmp_path, {**GOOD, "stages": [{**GOOD["stages"][0], "for_s": 0.2}, GOOD["stages"][1]], **change})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:"), message
    assert "frequency_response" in message, message
    assert expect in message, message


def test_a_stage_s_own_restore_rule_loads_and_reaches_the_core(tmp_path: Path) -> None:
    from hashflex.agent.runtime.frequency import rules_from_config

    section = {
        **GOOD,
        "stages": [GOOD["stages"][0], {**GOOD["stages"][1], "restore_above_hz": 49.95, "restore_after_s": "10m"}],
    }
    fr = load_config(_write(tmp_path, section)).frequency_response
    assert fr is not None
    assert fr.stages[0].restore_above_hz is None
    assert fr.stages[1].restore_after_s == 600.0
    rules = rules_from_config(fr)
    assert rules.restore_rule(1) == (49.9, 30.0)
    assert rules.restore_rule(2) == (49.95, 600.0)


def test_the_section_needs_a_site_meter(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"frequency_response needs site\.meter"):
        load_config(
            _write(tmp_path, {**GOOD, "stages": [{"below_hz": 49.4, "for_s": 0.2, "shed": "25%"}]}, meter=False)
        )


def test_stage_totals_are_cumulative() -> None:
    for a, b in itertools.pairwise(RULES.stages):
        assert b.kw(100.0) >= a.kw(100.0)


def test_no_tick_is_wanted_while_a_tripped_stage_s_sleeps_are_unanswered() -> None:
    from hashflex.agent.config import FrequencyResponseConfig
    from hashflex.agent.core.model import Op
    from hashflex.agent.runtime.actuator import OpResult

    cfg = FrequencyResponseConfig.model_validate(
        {"stages": [{"below_hz": 49.4, "for_s": 0, "shed": "50%"}], "restore_above_hz": 49.9, "restore_after_s": 5}
    )
    host = _Host()
    fr = FrequencyResponse(cfg, host, host, trigger=host.trigger, clock=lambda: 0.0, meter_fresh=lambda: True)
    fr.arm([view(f"10.0.0.{i}", MinerState.HASHING, 3000.0) for i in range(4)], set(), 12.0, 0.0)
    assert not fr.defer_tick()
    fr.on_hz(_Hz(49.0, 1.0))
    sent = [c.ip for c in host.fired[0][0]]
    assert len(sent) == 2
    assert fr.defer_tick()
    fr.on_result(OpResult(sent[0], Op.SLEEP, None, "ok", "", 1, 0.0, 0.0))
    assert fr.defer_tick()  # one still on the wire
    fr.on_result(OpResult(sent[1], Op.SLEEP, None, "timeout", "", 1, 0.0, 0.0))
    assert not fr.defer_tick()  # every one answered (one failed): the tick plans around it
    assert [a["step"] for a in host.audits][-1] == "commands_acked"


# ------------------------------------------------------------------------------------------------ per-stage restore
_TENTHS = st.integers(0, 200).map(lambda n: n / 10)  # restore times on the readings' 0.1 s grid


@settings(max_examples=300, deadline=None)
@given(
    programme=st.tuples(st.floats(49.5, 50.2), _TENTHS),
    overrides=st.lists(st.tuples(st.none() | st.floats(49.5, 50.2), st.none() | _TENTHS), min_size=2, max_size=2),
    depth=st.integers(1, 2),
    hz=st.floats(49.5, 50.3),
    polls=st.integers(0, 250),
)
def test_the_deepest_held_stage_s_restore_rule_ends_the_event(
    programme: tuple[float, float],
    overrides: list[tuple[float | None, float | None]],
    depth: int,
    hz: float,
    polls: int,
) -> None:
    """An event holding `depth` stages ends exactly when the frequency has been above the deepest held stage's
    restore_above_hz (the programme's where it has none) for its restore_after_s (likewise), and not before."""
    shallow_deep = ((49.4, 25.0), (49.0, 50.0))
    stages = tuple(
        Stage(below, 0.0, shed_pct=pct, restore_above_hz=above, restore_after_s=after)
        for (below, pct), (above, after) in zip(shallow_deep, overrides, strict=True)
    )
    rules = FrequencyRules(stages, restore_above_hz=programme[0], restore_after_s=programme[1], max_gap_s=1.0)
    dip = 49.3 if depth == 1 else 48.9
    state, _ = observe(FrequencyState.initial(rules), rules, dip, 0.0)
    assert state.depth == depth
    above = overrides[depth - 1][0] if overrides[depth - 1][0] is not None else programme[0]
    after = overrides[depth - 1][1] if overrides[depth - 1][1] is not None else programme[1]
    assert rules.restore_rule(depth) == (above, after)
    restored_at = None
    for i in range(polls + 1):  # readings every 0.1 s, above the threshold or not, for polls / 10 s
        state, d = observe(state, rules, hz, 0.1 + i / 10)
        if d.restore:
            restored_at = i / 10
            break
    if hz <= above or polls / 10 < after - 1e-9:
        assert restored_at is None, (above, after, hz, polls)
    else:
        assert restored_at is not None
        assert restored_at == pytest.approx(after, abs=0.1 + 1e-6)


def test_a_stage_s_restore_threshold_must_be_above_its_below_hz_and_the_first_stage_s() -> None:
    with pytest.raises(ValueError, match=r"restore_above_hz = 49\.0"):
        Stage(49.0, 0.0, shed_pct=50.0, restore_above_hz=49.0)
    with pytest.raises(ValueError, match="restore_after_s"):
        Stage(49.0, 0.0, shed_pct=50.0, restore_after_s=float("nan"))
    with pytest.raises(ValueError, match=r"stages\[1\]\.restore_above_hz = 49.2"):
        FrequencyRules(
            (Stage(49.4, 0.2, shed_pct=25.0), Stage(49.0, 0.0, shed_pct=50.0, restore_above_hz=49.2)),
            restore_above_hz=49.9,
            restore_after_s=10.0,
        )


# ------------------------------------------------------------------------------------------------ over a restart
def test_a_resumed_event_holds_without_tripping_again_and_restores_on_this_run_s_readings() -> None:
    # the last run tripped the first stage and had the frequency above the restore threshold for 8 s of the 10
    state = resumed(RULES, 1, first_below_at=0.6, tripped_at=0.8, min_hz=49.3, min_hz_at=0.7)
    state, ds = run(poll(30, 32, 49.3), state)  # still below the stage: held, not tripped again
    assert not any(d.tripped for d in ds)
    assert state.depth == 1
    state, ds = run(poll(32.1, 32.5, 48.9), state)  # the deeper stage trips on its own timer
    assert [d.tripped for d in ds if d.tripped] == [(1,)]
    state, ds = run(poll(32.6, 42.5, 50.0), state)  # the restore time counts from this run's readings
    assert not any(d.restore for d in ds)
    state, ds = run(poll(42.6, 42.8, 50.0), state)
    restored = [d for d in ds if d.restore]
    assert len(restored) == 1
    assert restored[0].ended.min_hz == pytest.approx(48.9)
    assert restored[0].ended.first_below_at == pytest.approx(0.6)
    with pytest.raises(ValueError, match="depth"):
        resumed(RULES, 0, first_below_at=None, tripped_at=None, min_hz=None, min_hz_at=None)
    assert resumed(RULES, 5, first_below_at=None, tripped_at=None, min_hz=None, min_hz_at=None).depth == 2


def _response(host: _Host, clock: list[float]) -> FrequencyResponse:
    from hashflex.agent.config import FrequencyResponseConfig

    cfg = FrequencyResponseConfig.model_validate(
        {
            "stages": [{"below_hz": 49.4, "for_s": 0, "shed": "25%"}, {"below_hz": 49.0, "for_s": 0, "shed": "50%"}],
            "restore_above_hz": 49.9,
            "restore_after_s": 5,
        }
    )
    return FrequencyResponse(cfg, host, host, trigger=host.trigger, clock=lambda: clock[0], meter_fresh=lambda: True)


def test_the_event_is_kept_while_it_holds_and_resumed_by_the_next_run() -> None:
    clock = [1.0]
    host = _Host()
    fr = _response(host, clock)
    fleet = [view(f"10.0.0.{i}", MinerState.HASHING, 3000.0) for i in range(8)]
    fr.arm(fleet, set(), 30.0, 1.0)
    fr.on_hz(_Hz(49.3, 1.0))
    slept = {c.ip for c in host.fired[0][0]}
    doc = host.saved[-1]
    assert doc is not None
    assert doc["depth"] == 1
    assert doc["level_kw"] == pytest.approx(24.0)
    assert set(doc["fired"]) == slept
    fr.on_hz(_Hz(49.2, 1.1))
    fr.arm(fleet, set(), 24.0, 1.2)  # the lowest frequency changed: kept at the tick
    assert host.saved[-1] is not None
    assert host.saved[-1]["min_hz"] == pytest.approx(49.2)
    n = len(host.saved)
    fr.arm(fleet, set(), 24.0, 1.3)
    assert len(host.saved) == n  # nothing changed: nothing written

    # the agent stops; the next run's clock is 100 s on, the wall was stepped 2 s back meanwhile
    clock[0] = 100.0
    host2 = _Host()
    fr2 = _response(host2, clock)
    fr2.resume(host.saved[-1], shift_s=-2.0, now=100.0)
    assert fr2.held_kw == pytest.approx(24.0)
    assert fr2.event is not None
    assert set(fr2.event.fired) == slept
    assert fr2.event.first_below_at == pytest.approx(-1.0)
    assert [a["step"] for a in host2.audits] == ["resumed"]
    assert host2.audits[0]["min_hz"] == pytest.approx(49.2)
    remaining = [v for v in fleet if v.id not in slept]
    fr2.arm(remaining, set(), 24.0, 100.0)
    fr2.on_hz(_Hz(49.3, 100.1))  # still below the first stage: it does not trip again
    assert host2.fired == []
    fr2.on_hz(_Hz(48.9, 100.2))  # the second stage sheds what the first did not: 12 kW in all, 6 slept already
    assert len(host2.fired) == 1
    assert len(host2.fired[0][0]) == 2
    assert fr2.held_kw == pytest.approx(30.0 - 12.0)
    assert host2.saved[-1] is not None
    assert host2.saved[-1]["depth"] == 2
    for i in range(60):
        fr2.on_hz(_Hz(50.0, 100.3 + i * 0.1))
    assert fr2.held_kw is None
    assert host2.saved[-1] is None  # restored: no event kept
    assert [a["step"] for a in host2.audits][-1] == "restored"


@pytest.mark.parametrize(
    "doc",
    [
        {"v": 99},
        [1, 2],
        {"v": 1, "depth": 1, "base_kw": "x", "site_kw": 3.0, "fired": {}},
        {"v": 1, "depth": 0, "base_kw": 1.0, "site_kw": 3.0, "fired": {}},
        {"v": 1, "depth": 1, "base_kw": 1.0, "site_kw": 3.0, "fired": {"a": float("nan")}},
    ],
)
def test_an_unreadable_stored_event_is_dropped(doc: Any) -> None:
    host = _Host()
    fr = _response(host, [1.0])
    fr.resume(doc, shift_s=0.0, now=1.0)
    assert fr.event is None
    assert host.saved == [None]
    assert host.audits == []


# ------------------------------------------------------------------------------------------------ bracing for a trip
def test_a_ride_through_braces_the_agent_for_a_trip_and_a_dip_ridden_through_lets_go() -> None:
    """From the first reading below a stage, no tick starts and sweeps are held (the host is asked) until the stage
    trips or the dip ends; at most once per BRACE_EVERY_S, so a frequency hovering at a threshold does not hold
    the agent's telemetry back."""
    from hashflex.agent.config import FrequencyResponseConfig
    from hashflex.agent.runtime.frequency import BRACE_EVERY_S

    cfg = FrequencyResponseConfig.model_validate(
        {"stages": [{"below_hz": 49.4, "for_s": 0.3, "shed": "25%"}], "restore_above_hz": 49.9, "restore_after_s": 5}
    )
    host = _Host()
    fr = FrequencyResponse(cfg, host, host, trigger=host.trigger, clock=lambda: 0.0, meter_fresh=lambda: True)
    fr.arm([view(f"10.0.0.{i}", MinerState.HASHING, 3000.0) for i in range(8)], set(), 24.0, 0.0)
    fr.on_hz(_Hz(50.0, 1.0))
    assert host.braces == []
    assert not fr.defer_tick()
    fr.on_hz(_Hz(49.3, 1.1))  # a ride-through begins
    assert host.braces == [True]
    assert fr.defer_tick()
    fr.on_hz(_Hz(49.3, 1.2))
    assert host.braces == [True]  # once per ride-through
    fr.on_hz(_Hz(50.0, 1.3))  # ridden through: let go
    assert host.braces == [True, False]
    assert not fr.defer_tick()
    assert BRACE_EVERY_S > 1.0
    fr.on_hz(_Hz(49.3, 1.4))  # another dip straight after: no second brace (the rate limit)
    assert host.braces == [True, False]
    fr.on_hz(_Hz(49.3, 1.8))  # it trips: sleeps out, with the ordinary hold of a batch from the controller
    assert len(host.fired) == 1
    assert host.braces == [True, False]


def test_a_stale_meter_ends_a_brace() -> None:
    from hashflex.agent.config import FrequencyResponseConfig

    cfg = FrequencyResponseConfig.model_validate(
        {"stages": [{"below_hz": 49.4, "for_s": 0.5, "shed": "25%"}], "restore_above_hz": 49.9, "restore_after_s": 5}
    )
    host, fresh = _Host(), [True]
    fr = FrequencyResponse(cfg, host, host, trigger=host.trigger, clock=lambda: 0.0, meter_fresh=lambda: fresh[0])
    fr.on_hz(_Hz(49.3, 1.0))
    assert host.braces == [True]
    fresh[0] = False
    fr.on_hz(_Hz(49.3, 1.1))
    assert host.braces == [True, False]
    assert not fr.defer_tick()


def test_no_cyclic_collection_while_bracing_or_while_a_stage_s_sleeps_are_on_the_wire() -> None:
    """The collector is held off from the first reading below a stage until the stage's sleeps are all answered
    (or the dip is ridden through), and never past its bound."""
    import asyncio
    import gc

    from hashflex.agent.config import FrequencyResponseConfig
    from hashflex.agent.runtime.actuator import Op, OpResult

    cfg = FrequencyResponseConfig.model_validate(
        {"stages": [{"below_hz": 49.4, "for_s": 0.3, "shed": "25%"}], "restore_above_hz": 49.9, "restore_after_s": 5}
    )
    assert gc.isenabled()

    async def run() -> None:
        host = _Host()
        fr = FrequencyResponse(cfg, host, host, trigger=host.trigger, clock=lambda: 0.0, meter_fresh=lambda: True)
        fr.arm([view(f"10.0.0.{i}", MinerState.HASHING, 3000.0) for i in range(8)], set(), 24.0, 0.0)
        try:
            fr.on_hz(_Hz(49.3, 1.0))  # bracing
            assert not gc.isenabled()
            fr.on_hz(_Hz(49.3, 1.4))  # tripped: two sleeps out
            assert not gc.isenabled()
            sent = [c.ip for c in host.fired[0][0]]
            fr.on_result(OpResult(sent[0], Op.SLEEP, None, "ok", "", 1, 0.0, 0.0))
            assert not gc.isenabled()
            fr.on_result(OpResult(sent[1], Op.SLEEP, None, "ok", "", 1, 0.0, 0.0))
            assert gc.isenabled()  # all answered
        finally:
            fr.close()

    async def bounded() -> None:
        host = _Host()
        fr = FrequencyResponse(cfg, host, host, trigger=host.trigger, clock=lambda: 0.0, meter_fresh=lambda: True)
        try:
            fr._hold_gc(True, 0.05)
            assert not gc.isenabled()
            await asyncio.sleep(0.15)
            assert gc.isenabled()  # the bound let it go
        finally:
            fr.close()

    asyncio.run(run())
    asyncio.run(bounded())
    assert gc.isenabled()
