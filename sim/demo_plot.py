"""The demo's plot: ground-truth site power against the cap and the agent's target, with the scenario marked, over
the miners by state. matplotlib with the Agg backend (no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.dates as mdates
import matplotlib.pyplot as plt

from sim.demo_support import Mark, Ramp, Sample, SiteClock, Span

STATE_COLOURS = {"hashing": "#2e7d32", "throttled": "#9ccc65", "waking": "#ffb300", "sleeping": "#90a4ae",
                 "offline": "#d32f2f"}  # fmt: skip
SPAN_COLOURS = {"grid": "#ef6c00", "schedule": "#6a1b9a"}


def plot(path: Path, samples: Sequence[Sample], clock: SiteClock, *, cap_kw: float, spans: Sequence[Span],
         marks: Sequence[Mark], ramps: Sequence[Ramp], title: str, subtitle: str) -> None:  # fmt: skip
    mw = cap_kw >= 2000  # megawatts read better on a large site
    unit, k = ("MW", 1000.0) if mw else ("kW", 1.0)
    times = [clock.local(s.site_ts) for s in samples]

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(12, 7.5), sharex=True, height_ratios=(3, 1.3),
                                 constrained_layout=True)  # fmt: skip
    fig.suptitle(title, fontsize=13, fontweight="bold")
    ax.set_title(subtitle, fontsize=9.5, color="#444444")

    top = max([cap_kw, *(s.truth_kw for s in samples)]) / k * 1.12  # room for the span labels above the cap
    for span in spans:
        colour = SPAN_COLOURS.get(span.kind, "#999999")
        ax.axvspan(clock.local(span.start), clock.local(span.end), color=colour, alpha=0.08, lw=0)
        ax.text(clock.local(span.start), top * 0.985, f" {span.label}", va="top", ha="left", fontsize=8.5,
                color=colour, fontweight="bold")  # fmt: skip

    cap_text = f"{cap_kw / k:,.2f} MW" if mw else f"{cap_kw:,.0f} kW"
    ax.axhline(cap_kw / k, color="#c62828", ls="--", lw=1.6, zorder=4, label=f"site cap ({cap_text})")
    target = [(t, s.target_kw / k) for t, s in zip(times, samples, strict=True) if s.target_kw is not None]
    if target:
        ax.step(*zip(*target, strict=True), where="post", color="#ef6c00", lw=1.8, label="agent's target")
    for i, ramp in enumerate(ramps):
        ax.plot([clock.local(ramp.start), clock.local(ramp.end)], [ramp.start_kw / k, ramp.ceiling_kw / k],
                color="#8d6e63", lw=1.2, ls=(0, (4, 2)),
                label=f"ramp-up limit ({ramp.kw_per_min / k:,.{2 if mw else 0}f} {unit}/min)" if i == 0 else None)
    ax.plot(times, [s.truth_kw / k for s in samples], color="#1565c0", lw=2.0,
            label="site power, ground truth (simulator)")  # fmt: skip
    agent = [(t, s.agent_kw / k) for t, s in zip(times, samples, strict=True) if s.agent_kw is not None]
    if agent:
        ax.plot(*zip(*agent, strict=True), color="#1565c0", lw=0.8, alpha=0.45, ls=":",
                label="site power, as the agent reads it")  # fmt: skip
    for mark in marks:
        at = clock.local(mark.site_ts)
        ax.axvline(at, color="#555555", lw=0.8, ls=":")
        ax.annotate(mark.label, (at, top * 0.06), rotation=90, fontsize=7.5, color="#333333",
                    ha="right", va="bottom", xytext=(-2, 0), textcoords="offset points")  # fmt: skip
    ax.set_ylim(0, top)
    ax.set_ylabel(f"power ({unit})")
    ax.grid(alpha=0.25)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=5, fontsize=8.5, frameon=False)

    stacks = {state: [s.states.get(state, 0) for s in samples] for state in STATE_COLOURS}
    bx.stackplot(times, *stacks.values(), labels=list(stacks), colors=list(STATE_COLOURS.values()), alpha=0.9)
    bx.set_ylabel("miners")
    bx.set_ylim(0, max(1, max((sum(s.states.values()) for s in samples), default=1)))
    bx.legend(loc="upper left", ncols=5, fontsize=8, framealpha=0.92)
    bx.grid(alpha=0.25)
    bx.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))  # type: ignore[no-untyped-call]
    bx.set_xlabel(f"site time (UTC{clock.utc_offset_h:+g})")
    if times:
        bx.set_xlim(times[0], _last(times))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _last(times: Sequence[datetime]) -> datetime:
    return times[-1]
