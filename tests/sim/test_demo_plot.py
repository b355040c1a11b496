"""The demo's plot, built from a small recorded series (no demo run): the target stays visible over the cap, the
legends sit outside the data, what the agent did is numbered on the curve and explained under it (dips below the
target included), and the hashrate panel holds the site's hashrate against a sleep-only baseline.

The series is the dispatch stretch of a real `hashflex demo --short` run (120 miners, 420 kW cap, 155 kW dispatch),
trimmed, with a fail-safe added at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import matplotlib.pyplot as plt
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.text import Annotation

from hashflex.sim.demo_notes import Note, SleepOnlyBaseline, agent_notes
from hashflex.sim.demo_plot import build_figure
from hashflex.sim.demo_support import Mark, Sample, SiteClock, Span

T0 = 1_796_129_560.0  # 17:52:40 site-local (UTC+5)
CAP_KW, FULL_KW, TOLERANCE_KW = 420.0, 387.5, 0.02 * 387.5
CLOCK = SiteClock(scale=50.0, origin=0.0, utc_offset_h=5.0)


def states(hashing: int = 0, throttled: int = 0, sleeping: int = 0, waking: int = 0) -> dict[str, int]:
    return {"hashing": hashing, "throttled": throttled, "sleeping": sleeping, "waking": waking, "offline": 0}


# (site s after T0, truth kW, agent's read kW, target kW, reason, TH/s, miners by state)
RECORDED: list[tuple[float, float, float, float, str, float, dict[str, int]]] = [
    (0, 387.5, 387.6, 420.0, "cap", 16718, states(120)),
    (60, 387.5, 387.6, 420.0, "cap", 16718, states(120)),
    (130, 379.9, 387.6, 155.0, "grid:d1", 16390, states(86, sleeping=34)),
    (160, 150.1, 204.0, 155.0, "grid:d1", 8051, states(44, sleeping=76)),
    (220, 150.1, 150.2, 155.0, "grid:d1", 8051, states(44, sleeping=76)),
    (280, 118.3, 121.0, 155.0, "grid:d1", 6580, states(10, 34, 54, 22)),
    (330, 120.4, 119.9, 155.0, "grid:d1", 6650, states(10, 34, 54, 22)),
    (390, 131.3, 130.0, 155.0, "grid:d1", 7120, states(10, 34, 54, 22)),
    (430, 149.1, 148.0, 155.0, "grid:d1", 7900, states(10, 34, 54, 22)),
    (450, 190.6, 185.0, 420.0, "cap", 9000, states(39, 27, 9, 45)),
    (500, 296.5, 290.0, 300.0, "failsafe", 12800, states(66, 10, 0, 44)),
    (540, 297.0, 296.0, 300.0, "failsafe", 13000, states(76, 10, 0, 34)),
    (560, 330.0, 320.0, 420.0, "cap", 14200, states(92, 0, 0, 28)),
    (600, 387.5, 387.6, 420.0, "cap", 16718, states(120)),
]
SAMPLES = [
    Sample(T0 + dt, truth, ths, st, agent_kw=read, target_kw=target, cap_kw=CAP_KW, reason=reason)
    for dt, truth, read, target, reason, ths, st in RECORDED
]


def actions(
    dt: float, target_kw: float, by_op: dict[str, int], *, fast: bool = False, worst_kw: float = 150.0
) -> dict[str, Any]:
    return {
        "ts": T0 + dt,
        "kind": "actions",
        "data": {
            "by_op": {op: {"ok": n} for op, n in by_op.items()},
            "fast": fast,
            "method": "sleep_only" if fast else "optimal",
            "target_kw": target_kw,
            "worst_case_kw": worst_kw,
            "sent": sum(by_op.values()),
            "failed": [],
            "failed_total": 0,
        },
    }


AUDIT: list[dict[str, Any]] = [
    {"ts": T0 - 30, "kind": "agent_start", "data": {"pid": 1}},  # before the first look: not a note
    {"ts": T0 + 125, "kind": "target_change", "data": {"kw": 155.0, "reason": "grid:d1"}},
    actions(128, 155.0, {"sleep": 76}, fast=True, worst_kw=151.4),
    actions(265, 155.0, {"set_power": 34, "wake": 22}, worst_kw=153.5),
    actions(297, 155.0, {"set_power": 2}, worst_kw=153.5),  # 32 s later, same target: the same note
    actions(440, 420.0, {"set_power": 35, "wake": 10}, worst_kw=201.8),
    actions(448, 420.0, {"wake": 11}, worst_kw=221.2),
    actions(457, 420.0, {"set_power": 9, "wake": 9}, worst_kw=240.9),
    {"ts": T0 + 495, "kind": "failsafe_enter", "data": {"reason": "grid heartbeat lost", "level_kw": 300.0}},
    {"ts": T0 + 550, "kind": "failsafe_exit", "data": {"reason": "heartbeat back", "level_kw": 300.0}},
]

# four kinds of miner at stock (kW, TH/s), 30 of each: the baseline keeps the best TH/s per kW first
STOCK = [(3.5, 200.0), (3.3, 140.0), (2.9, 110.0), (3.2, 107.0)]
TRUTH_AT_START = {
    "miners": [
        {"state": "hashing", "power_w": kw * 1000, "hashrate_ths": ths, "nominal_w": kw * 1000, "nominal_ths": ths}
        for kw, ths in STOCK
        for _ in range(30)
    ]
}


@pytest.fixture
def notes() -> list[Note]:
    return agent_notes(AUDIT, SAMPLES, cap_kw=CAP_KW, tolerance_kw=TOLERANCE_KW)


@pytest.fixture
def figure(notes: list[Note]) -> Iterator[Figure]:
    span = Span(T0 + 125, T0 + 435, "grid dispatch ≤ 155 kW", "grid", 155.0)
    fig = build_figure(
        SAMPLES,
        CLOCK,
        cap_kw=CAP_KW,
        spans=[span],
        marks=[Mark(T0 + 125, "grid dispatch sent")],
        ramps=[],
        title="demo",
        subtitle="recorded",
        notes=notes,
        baseline=SleepOnlyBaseline.from_truth(TRUTH_AT_START),
    )
    fig.canvas.draw()  # lay it out, as savefig would
    yield fig
    plt.close(fig)


def panel(fig: Figure, gid: str) -> Axes:
    return next(ax for ax in fig.axes if ax.get_gid() == gid)


def line(ax: Axes, gid: str) -> Line2D:
    return next(ln for ln in ax.get_lines() if ln.get_gid() == gid)


def test_the_target_is_drawn_above_the_cap_thicker_and_dashed_and_its_legend_says_where_they_meet(
    figure: Figure,
) -> None:
    power = panel(figure, "power")
    cap, target = line(power, "cap"), line(power, "target")
    assert target.get_zorder() > cap.get_zorder()
    assert target.get_linewidth() > cap.get_linewidth()
    assert target.get_linestyle() == "--"
    assert cap.get_linestyle() == "-"
    legend = power.get_legend()
    assert legend is not None
    labels = [t.get_text() for t in legend.get_texts()]
    assert any("agent's target" in label and "cap line" in label for label in labels), labels
    # and the target really runs on the cap where only the cap binds (else the entry would say nothing)
    assert CAP_KW in list(target.get_ydata())  # type: ignore[arg-type]


def test_no_legend_covers_a_panel_of_data(figure: Figure) -> None:
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    data = [panel(figure, gid) for gid in ("power", "hashrate", "states")]
    legends: list[Legend] = [*figure.legends, *(lg for ax in figure.axes if (lg := ax.get_legend()) is not None)]
    assert len(legends) >= 3  # one per panel
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in data:
            assert not box.overlaps(ax.get_window_extent(renderer)), (ax.get_gid(), box)


def test_what_the_agent_did_is_numbered_on_the_curve_and_explained_under_it(figure: Figure, notes: list[Note]) -> None:
    texts = [n.text for n in notes]
    assert len(notes) == 5, texts  # fast cut, swap (two batches), ramp (three batches), fail-safe in and out
    assert texts[0] == "fast cut: slept 76 miners at once to get under 155 kW quickly"
    assert texts[1].startswith("swapped sleep for throttling under 155 kW (woke 22, 36 limit changes)")
    assert texts[2] == "back up toward the cap in 3 batches, paced by the ramp limit: woke 30, 44 limit changes"
    assert texts[3] == "FAIL-SAFE: site held at 300 kW (grid heartbeat lost)"
    assert texts[4] == "fail-safe released (heartbeat back)"
    # the dip below the 155 kW dispatch is put to the swap, with why; nothing else fell below its target
    dip = notes[1].shortfall
    assert dip is not None
    assert dip.worst_kw == pytest.approx(155.0 - 118.3)
    assert dip.until == T0 + 390  # 149.1 kW at +430 s is within the tolerance
    assert "woken miners draw little" in dip.cause
    assert [n.shortfall is None for n in notes] == [True, False, True, True, True]

    power, key = panel(figure, "power"), panel(figure, "notes")
    badges = {a.get_gid(): a for a in power.texts if isinstance(a, Annotation) and a.get_gid()}
    lines = {a.get_gid(): a.get_text() for a in key.texts if a.get_gid()}
    for i, note in enumerate(notes, 1):
        assert badges[f"note-{i}"].get_text() == str(i)
        assert CLOCK.hhmm(note.site_ts, True) in lines[f"note-key-{i}"]
        assert note.text in " ".join(lines[f"note-key-{i}"].split())
    swap = " ".join(lines["note-key-2"].split())
    assert "stayed below the target until 17:59:10 (by up to 37 kW)" in swap
    # the dip itself is shaded on the power panel, with a legend entry pointing at the notes
    legend = power.get_legend()
    assert legend is not None
    assert any("below the target" in t.get_text() for t in legend.get_texts())


def test_the_hashrate_panel_holds_what_the_site_kept_against_a_sleep_only_baseline(figure: Figure) -> None:
    hashrate = panel(figure, "hashrate")
    kept, base = line(hashrate, "hashrate-kept"), line(hashrate, "hashrate-sleep-only")
    assert list(kept.get_ydata()) == pytest.approx([s.hashrate_ths / 1000 for s in SAMPLES])  # type: ignore[arg-type]
    baseline = SleepOnlyBaseline.from_truth(TRUTH_AT_START)
    expected = [baseline.ths_at(s.truth_kw) / 1000 for s in SAMPLES]
    assert list(base.get_ydata()) == pytest.approx(expected)  # type: ignore[arg-type]
    assert expected[0] == pytest.approx(sum(ths for _, ths in STOCK) * 30 / 1000)  # full power: every miner
    caption = hashrate.get_title(loc="left")
    assert "Sleep-only baseline" in caption
    assert "simulator's truth" in caption
    assert hashrate.get_ylabel() == "hashrate (PH/s)"


def test_the_sleep_only_baseline_keeps_the_best_hashrate_per_kw_that_fits() -> None:
    baseline = SleepOnlyBaseline.from_truth(
        {
            "miners": [
                {"state": "hashing", "power_w": 1000.0, "hashrate_ths": 10.0},
                {"state": "hashing", "power_w": 1000.0, "hashrate_ths": 20.0},
                {"state": "hashing", "power_w": 2000.0, "hashrate_ths": 30.0},
                # asleep at the start: counted at its rating
                {"state": "sleeping", "power_w": 8.0, "hashrate_ths": 0.0, "nominal_w": 4000.0, "nominal_ths": 100.0},
            ]
        }
    )
    assert baseline.full_kw == pytest.approx(8.0)
    assert baseline.ths_at(0.5) == 0.0
    assert baseline.ths_at(1.0) == 20.0
    assert baseline.ths_at(3.0) == 50.0  # 20 + 30: the 2 kW miner fits next
    assert baseline.ths_at(4.0) == 100.0  # the 4 kW one alone beats every mix of the others
    assert baseline.ths_at(8.0) == 160.0


def test_a_dip_after_a_plan_from_a_lagging_read_says_so() -> None:
    looks = [
        (0, 380.0, 380.0, states(120)),
        (10, 245.0, 386.0, states(76, sleeping=44)),
        (20, 203.0, 227.0, states(42, 33, 45)),
        (30, 203.0, 203.0, states(42, 33, 45)),
    ]
    samples = [
        Sample(T0 + dt, truth, 40 * truth, st, agent_kw=read, target_kw=252.0, cap_kw=CAP_KW)
        for dt, truth, read, st in looks
    ]
    audit = [
        actions(4, 252.0, {"sleep": 44}, fast=True, worst_kw=246.3),
        actions(14, 252.0, {"set_power": 54, "sleep": 1}, worst_kw=249.4),
    ]
    notes = agent_notes(audit, samples, cap_kw=CAP_KW, tolerance_kw=TOLERANCE_KW)
    assert [n.shortfall is None for n in notes] == [True, False]
    shortfall = notes[1].shortfall
    assert shortfall is not None
    assert shortfall.cause == "the agent planned from a read of 386 kW while the site already drew 245 kW"
