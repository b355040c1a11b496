"""The demo's plot: ground-truth site power against the cap and the agent's target, with the scenario marked and
what the agent did numbered on the curve; the hashrate kept against a sleep-only baseline; the miners by state; and
the numbered notes, from the agent's audit trail, under it all. With a frequency dip in the run, a panel of its own
(its own time axis, a few site minutes): grid frequency and the site's power at the meter, read fast. matplotlib
with the Agg backend (no display needed).

Legends sit to the right of their panel, never over the data. The target is drawn above the cap (a thicker dashed
line over a thin solid one), so where they coincide both show, and its legend entry says so.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from hashflex.sim.demo_notes import Note, SleepOnlyBaseline
from hashflex.sim.demo_support import DipView, Mark, Ramp, Sample, SiteClock, Span

STATE_COLOURS = {
    "hashing": "#2e7d32",
    "throttled": "#9ccc65",
    "waking": "#ffb300",
    "sleeping": "#90a4ae",
    "offline": "#d32f2f",
}
SPAN_COLOURS = {"grid": "#ef6c00", "schedule": "#6a1b9a"}
NOTE_COLOUR, SHORT_COLOUR = "#37474f", "#c62828"  # a note's badge; a note after which the site fell below target
Z_CAP, Z_AGENT_READ, Z_TARGET, Z_TRUTH, Z_BADGE = 3, 4, 5, 6, 8  # the target above the cap; the data above both
LINE_PT = 12.5  # a line of the notes' key, in points
WRAP = 160  # characters per line of the key


def plot(
    path: Path,
    samples: Sequence[Sample],
    clock: SiteClock,
    *,
    cap_kw: float,
    spans: Sequence[Span],
    marks: Sequence[Mark],
    ramps: Sequence[Ramp],
    title: str,
    subtitle: str,
    notes: Sequence[Note] = (),
    baseline: SleepOnlyBaseline | None = None,
    dip: DipView | None = None,
) -> None:
    fig = build_figure(
        samples,
        clock,
        cap_kw=cap_kw,
        spans=spans,
        marks=marks,
        ramps=ramps,
        title=title,
        subtitle=subtitle,
        notes=notes,
        baseline=baseline,
        dip=dip,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_figure(
    samples: Sequence[Sample],
    clock: SiteClock,
    *,
    cap_kw: float,
    spans: Sequence[Span],
    marks: Sequence[Mark],
    ramps: Sequence[Ramp],
    title: str,
    subtitle: str,
    notes: Sequence[Note] = (),
    baseline: SleepOnlyBaseline | None = None,
    dip: DipView | None = None,
) -> Figure:
    """The whole figure (the caller saves and closes it)."""
    mw = cap_kw >= 2000  # megawatts read better on a large site
    unit, k = ("MW", 1000.0) if mw else ("kW", 1.0)
    times = [_x(clock, s.site_ts) for s in samples]
    key = key_lines(notes, clock, unit, k)
    heights = [4.2, 2.0, 1.5] + ([2.6] if dip is not None else [])
    heights += [(LINE_PT * (sum(len(lines) for lines in key) + 1) + 16) / 72] if key else []
    fig = plt.figure(figsize=(14, sum(heights) + 1.3), layout="constrained")
    grid = fig.add_gridspec(len(heights), 1, height_ratios=heights)
    ax = fig.add_subplot(grid[0])
    hx = fig.add_subplot(grid[1], sharex=ax)
    bx = fig.add_subplot(grid[2], sharex=ax)
    for panel, name in ((ax, "power"), (hx, "hashrate"), (bx, "states")):
        panel.set_gid(name)
    fig.suptitle(title, fontsize=13, fontweight="bold")
    ax.set_title(subtitle, fontsize=9.5, color="#444444")

    top = max([cap_kw, *(s.truth_kw for s in samples)]) / k * 1.12  # room for the span labels above the cap
    _power_panel(
        ax,
        samples,
        times,
        clock,
        cap_kw=cap_kw,
        spans=spans,
        marks=marks,
        ramps=ramps,
        notes=notes,
        unit=unit,
        k=k,
        top=top,
    )
    _hashrate_panel(hx, samples, times, cap_kw, baseline)
    _states_panel(bx, samples, times)
    for upper in (ax, hx):
        upper.tick_params(labelbottom=False)
    bx.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))  # type: ignore[no-untyped-call]
    bx.set_xlabel(f"site time (UTC{clock.utc_offset_h:+g})")
    bx.xaxis_date()  # x values are matplotlib dates (site-local), shared by the three panels
    if times:
        bx.set_xlim(times[0], times[-1])
    if dip is not None:
        fx = fig.add_subplot(grid[3])
        fx.set_gid("frequency")
        _dip_panel(fx, dip, clock)
    if key:
        kx = fig.add_subplot(grid[len(heights) - 1])
        kx.set_gid("notes")
        _key_panel(kx, key, notes)
    return fig


def _outside_legend(axes: Axes, **kwargs: Any) -> None:
    """The panel's legend to the right of its data area (constrained layout makes room for it)."""
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8.5, frameon=False, **kwargs)


def _power_panel(
    ax: Axes,
    samples: Sequence[Sample],
    times: Sequence[float],
    clock: SiteClock,
    *,
    cap_kw: float,
    spans: Sequence[Span],
    marks: Sequence[Mark],
    ramps: Sequence[Ramp],
    notes: Sequence[Note],
    unit: str,
    k: float,
    top: float,
) -> None:
    mw = unit == "MW"
    for span in spans:
        colour = SPAN_COLOURS.get(span.kind, "#999999")
        ax.axvspan(_x(clock, span.start), _x(clock, span.end), color=colour, alpha=0.08, lw=0)
        ax.text(
            _x(clock, span.start),
            top * 0.985,
            f" {span.label}",
            va="top",
            ha="left",
            fontsize=8.5,
            color=colour,
            fontweight="bold",
        )

    cap_text = f"{cap_kw / k:,.2f} MW" if mw else f"{cap_kw:,.0f} kW"
    ax.axhline(cap_kw / k, color="#c62828", ls="-", lw=1.3, zorder=Z_CAP, label=f"site cap ({cap_text})", gid="cap")
    target = [(t, s.target_kw / k) for t, s in zip(times, samples, strict=True) if s.target_kw is not None]
    if target:
        # thicker and dashed, above the cap: where the target is the cap the red shows between the dashes
        on_cap = any(abs(v * k - cap_kw) <= 0.5 for _, v in target)
        ax.step(
            *zip(*target, strict=True),
            where="post",
            color="#ef6c00",
            lw=2.8,
            ls=(0, (5, 3)),
            zorder=Z_TARGET,
            gid="target",
            label="agent's target" + ("\n(dashed over the cap line where\nonly the cap binds)" if on_cap else ""),
        )
    for i, ramp in enumerate(ramps):
        label = f"ramp-up limit ({ramp.kw_per_min / k:,.{2 if mw else 0}f} {unit}/min)" if i == 0 else None
        ax.plot(
            [_x(clock, ramp.start), _x(clock, ramp.end)],
            [ramp.start_kw / k, ramp.ceiling_kw / k],
            color="#8d6e63",
            lw=1.2,
            ls=(0, (4, 2)),
            zorder=Z_CAP,
            label=label,
        )
    truth = [s.truth_kw / k for s in samples]
    ax.plot(times, truth, color="#1565c0", lw=2.0, zorder=Z_TRUTH, label="site power, ground truth\n(simulator)")
    agent = [(t, s.agent_kw / k) for t, s in zip(times, samples, strict=True) if s.agent_kw is not None]
    if agent:
        ax.plot(
            *zip(*agent, strict=True),
            color="#1565c0",
            lw=0.8,
            alpha=0.45,
            ls=":",
            zorder=Z_AGENT_READ,
            label="site power, as the agent\nreads it",
        )
    shaded = False
    for note in notes:  # where the site fell below a binding target after what the agent did: shaded, see its note
        if note.shortfall is None:
            continue
        inside = [
            (t, s)
            for t, s in zip(times, samples, strict=True)
            if note.site_ts <= s.site_ts <= note.shortfall.until and s.target_kw is not None
        ]
        if len(inside) > 1:
            ax.fill_between(
                [t for t, _ in inside],
                [s.truth_kw / k for _, s in inside],
                [max(s.truth_kw, s.target_kw or 0.0) / k for _, s in inside],
                color=SHORT_COLOUR,
                alpha=0.16,
                lw=0,
                zorder=Z_AGENT_READ,
                label=None if shaded else "below the target\n(why: the red-numbered note)",
            )
            shaded = True
    for mark in marks:
        at = _x(clock, mark.site_ts)
        ax.axvline(at, color="#555555", lw=0.8, ls=":")
        ax.annotate(
            mark.label,
            (at, top * 0.06),
            rotation=90,
            fontsize=7.5,
            color="#333333",
            ha="right",
            va="bottom",
            xytext=(-2, 0),
            textcoords="offset points",
        )
    for i, note in enumerate(notes, 1):  # numbered where the agent acted; the key under the plot says what it did
        y = _truth_at(samples, note.site_ts) / k
        below = y > top * 0.7  # near the top: the badge goes under the curve, clear of the cap and span labels
        ax.annotate(
            str(i),
            (_x(clock, note.site_ts), y),
            xytext=(0, -20 if below else 20),
            textcoords="offset points",
            ha="center",
            va="center",
            fontsize=8,
            fontweight="bold",
            color="white",
            zorder=Z_BADGE,
            gid=f"note-{i}",
            annotation_clip=False,
            bbox={"boxstyle": "circle,pad=0.25", "fc": _badge_colour(note), "ec": "none"},
            arrowprops={"arrowstyle": "-", "color": _badge_colour(note), "lw": 0.9},
        )
    ax.set_ylim(0, top)
    ax.set_ylabel(f"power ({unit})")
    ax.grid(alpha=0.25)
    _outside_legend(ax)


def _hashrate_panel(
    hx: Axes, samples: Sequence[Sample], times: Sequence[float], cap_kw: float, baseline: SleepOnlyBaseline | None
) -> None:
    peta = max((s.hashrate_ths for s in samples), default=0.0) >= 1000.0
    unit, k = ("PH/s", 1000.0) if peta else ("TH/s", 1.0)
    kept = [s.hashrate_ths / k for s in samples]
    hx.plot(
        times, kept, color="#2e7d32", lw=1.8, zorder=Z_TRUTH, label="hashrate kept\n(ground truth)", gid="hashrate-kept"
    )
    caption = "Hashrate."
    if baseline is not None:
        base = [baseline.ths_at(s.truth_kw) / k for s in samples]
        hx.plot(
            times,
            base,
            color="#616161",
            lw=1.5,
            ls=(0, (4, 2)),
            zorder=Z_TARGET,
            gid="hashrate-sleep-only",
            label="sleep-only baseline\n(same power)",
        )
        more = [a > b for a, b in zip(kept, base, strict=True)]
        hx.fill_between(
            times,
            base,
            kept,
            where=more,
            interpolate=True,
            color="#2e7d32",
            alpha=0.18,
            lw=0,
            label="kept over sleep-only",
        )
        hx.fill_between(
            times,
            base,
            kept,
            where=[not m for m in more],
            interpolate=True,
            color="#c62828",
            alpha=0.14,
            lw=0,
            label="under it (e.g. miners\ndrawing power while they boot)",
        )
        caption += (
            " Sleep-only baseline: the same ground-truth power met by sleeping whole miners only, the most TH/s per kW"
            " kept hashing at the stock power and hashrate the simulator's truth showed for each at the start; the"
            " standby draw of sleeping miners is not counted (that flatters the baseline)."
        )
        cut = [
            (a, b)
            for a, b, s in zip(kept, base, samples, strict=True)
            if s.target_kw is not None and s.target_kw < cap_kw - 0.5
        ]
        if cut and sum(b for _, b in cut) > 0:
            gain = sum(a for a, _ in cut) / sum(b for _, b in cut) - 1.0
            caption += f" While a cut bound the site hashed {_against(gain)} sleep-only would have."
    hx.set_title("\n".join(textwrap.wrap(caption, 190)), fontsize=8.5, color="#444444", loc="left")
    hx.set_ylim(0, max([*kept, 1e-9]) * 1.1)
    hx.set_ylabel(f"hashrate ({unit})")
    hx.grid(alpha=0.25)
    _outside_legend(hx)


def _dip_panel(fx: Axes, dip: DipView, clock: SiteClock) -> None:
    """Grid frequency (left axis) and the site's power at the meter (right axis) around the dip, from the fast
    meter trace; the stage's threshold, the restore threshold, and the verdict's moments marked."""
    times = [_x(clock, p.site_ts) for p in dip.points]
    fx.plot(times, [p.hz for p in dip.points], color="#6a1b9a", lw=1.6, label="grid frequency at the meter", gid="hz")
    fx.axhline(dip.below_hz, color="#c62828", lw=1.0, ls=(0, (5, 3)), label=f"stage trips below {dip.below_hz:g} Hz")
    fx.axhline(
        dip.restore_above_hz,
        color="#2e7d32",
        lw=1.0,
        ls=(0, (5, 3)),
        label=f"restores above {dip.restore_above_hz:g} Hz",
    )
    lowest = min(p.hz for p in dip.points)
    fx.set_ylim(min(lowest, dip.below_hz) - 0.15, 50.15)
    fx.set_ylabel("frequency (Hz)")
    fx.grid(alpha=0.25)
    px = fx.twinx()
    px.plot(
        times,
        [p.power_kw for p in dip.points],
        color="#1565c0",
        lw=1.8,
        label="site power at the meter",
        gid="meter-kw",
    )
    px.plot(times, [p.it_kw for p in dip.points], color="#1565c0", lw=0.9, ls=":", label="the miners' part")
    top = max(p.power_kw for p in dip.points)
    px.set_ylim(0, top * 1.15)
    px.set_ylabel("power (kW)")
    v = dip.verdict
    for key, label in (
        ("crossed_ts", "crossed"),
        ("shed_reached_at", "shed reached"),
        ("recovered_at", "frequency back"),
        ("back_at", "site back"),
    ):
        ts = v.get(key)
        at = _x_iso(clock, ts) if isinstance(ts, str) else _x(clock, ts) if isinstance(ts, int | float) else None
        if at is not None:
            fx.axvline(at, color="#555555", lw=0.8, ls=":")
            fx.annotate(
                label,
                (at, 1.0),
                xycoords=("data", "axes fraction"),
                rotation=90,
                fontsize=7.5,
                ha="right",
                va="top",
                xytext=(-2, -2),
                textcoords="offset points",
            )
    caption = "Frequency dip, read fast at the meter."
    if v.get("kw_shed") is not None and v.get("shed_after_s") is not None:
        caption += (
            f" The stage ({v['shed_pct']:g} % of the miners, {v['stage_kw']:,.0f} kW) shed {v['kw_shed']:,.0f}"
            f" kW at the meter {v['shed_after_s']:.0f} site s after the crossing; lowest "
            f"{v['lowest_hz']:.2f} Hz."
        )
    fx.set_title(caption, fontsize=8.5, color="#444444", loc="left")
    fx.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))  # type: ignore[no-untyped-call]
    fx.xaxis_date()
    fx.set_xlabel(f"site time (UTC{clock.utc_offset_h:+g})")
    if times:
        fx.set_xlim(times[0], times[-1])
    lines = fx.get_legend_handles_labels()
    more = px.get_legend_handles_labels()
    fx.legend(
        lines[0] + more[0],
        lines[1] + more[1],
        loc="upper left",
        bbox_to_anchor=(1.06, 1.0),
        borderaxespad=0.0,
        fontsize=8.5,
        frameon=False,
    )


def _x_iso(clock: SiteClock, text: str) -> float:
    return _x(clock, datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


def _against(gain: float) -> str:
    """A share more or less, in words ("12 % more than"; under half a percent: "about as much as")."""
    if abs(gain) < 0.005:
        return "about as much as"
    return f"{abs(gain) * 100:.0f} % {'more' if gain > 0 else 'less'} than"


def _states_panel(bx: Axes, samples: Sequence[Sample], times: Sequence[float]) -> None:
    stacks = {state: [s.states.get(state, 0) for s in samples] for state in STATE_COLOURS}
    bx.stackplot(times, *stacks.values(), labels=list(stacks), colors=list(STATE_COLOURS.values()), alpha=0.9)
    bx.set_ylabel("miners")
    bx.set_ylim(0, max(1, max((sum(s.states.values()) for s in samples), default=1)))
    bx.grid(alpha=0.25)
    _outside_legend(bx, title="miners by state\n(ground truth)", title_fontsize=8.5)


def key_lines(notes: Sequence[Note], clock: SiteClock, unit: str, k: float) -> list[list[str]]:
    """Each note as the lines of the key: site time, what the agent did, and any shortfall with its cause."""
    out: list[list[str]] = []
    for note in notes:
        text = f"{clock.hhmm(note.site_ts, True)}  {note.text}"
        if note.shortfall is not None:
            sf = note.shortfall
            text += (
                f" → the site stayed below the target until {clock.hhmm(sf.until, True)} (by up to "
                f"{sf.worst_kw / k:,.{2 if unit == 'MW' else 0}f} {unit}): {sf.cause}"
            )
        out.append(textwrap.wrap(text, WRAP, subsequent_indent="    ", break_on_hyphens=False))
    return out


def _key_panel(kx: Axes, key: list[list[str]], notes: Sequence[Note]) -> None:
    kx.axis("off")
    kx.annotate(
        "What the agent did, from its audit trail (hashflex audit export); numbered as on the power curve",
        (0, 1),
        xycoords="axes fraction",
        va="top",
        ha="left",
        fontsize=9,
        fontweight="bold",
    )
    line = 1
    for i, (lines, note) in enumerate(zip(key, notes, strict=True), 1):
        y = -line * LINE_PT - 4
        kx.annotate(
            str(i),
            (0, 1),
            xycoords="axes fraction",
            xytext=(7, y),
            textcoords="offset points",
            va="top",
            ha="center",
            fontsize=8,
            fontweight="bold",
            color="white",
            bbox={"boxstyle": "circle,pad=0.2", "fc": _badge_colour(note), "ec": "none"},
        )
        kx.annotate(
            "\n".join(lines),
            (0, 1),
            xycoords="axes fraction",
            xytext=(20, y),
            textcoords="offset points",
            va="top",
            ha="left",
            fontsize=8.5,
            linespacing=1.25,
            gid=f"note-key-{i}",
        )
        line += len(lines)


def _badge_colour(note: Note) -> str:
    return NOTE_COLOUR if note.shortfall is None else SHORT_COLOUR


def _truth_at(samples: Sequence[Sample], ts: float) -> float:
    """Ground-truth power at `ts` on the plotted line (straight between looks; the end looks beyond them)."""
    if not samples:
        return 0.0
    after = next((i for i, s in enumerate(samples) if s.site_ts >= ts), None)
    if after is None:
        return samples[-1].truth_kw
    if after == 0:
        return samples[0].truth_kw
    a, b = samples[after - 1], samples[after]
    share = (ts - a.site_ts) / (b.site_ts - a.site_ts) if b.site_ts > a.site_ts else 1.0
    return a.truth_kw + (b.truth_kw - a.truth_kw) * share


def _x(clock: SiteClock, ts: float) -> float:
    """A site timestamp as an x value: site-local wall time in matplotlib's date numbers."""
    return float(mdates.date2num(clock.local(ts)))  # type: ignore[no-untyped-call]
