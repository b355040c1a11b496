"""The site's flexibility from the running controller, and when to publish it (retained on `<root>/flex`).

Read-only on the controller: the fleet views come from `readout.observe_now` (agent.core.observe, nothing
applied), everything else from attributes the controller already exposes. `FlexSink` is a controller status sink
(`Controller.publisher.add_sink`): after a tick it recomputes the flexibility when it may have changed (the target,
the cap or the fail-safe moved, or `compute_every_s` passed) and hands the document to `publish` when
`FlexPublishPolicy` says it is due (changed enough, or 30 s since the last one).

Cost: `agent.core.flexibility.flexibility` makes one planner call per loss depth plus two (about 235 ms for 10,000
miners on the development machine, 7 calls), so it is not recomputed every tick: at most every `compute_every_s`
unless what the coordinator must hear at once (target, cap, fail-safe) changed.
"""

from __future__ import annotations

from collections.abc import Callable

from hashflex.agent.core.flexibility import FlexPublishPolicy, flexibility
from hashflex.agent.logging import get_logger
from hashflex.agent.runtime.readout import SiteState, observe_now
from hashflex.contract.flex import FlexDoc, Flexibility
from hashflex.contract.status import StatusDoc

log = get_logger("flex")

COMPUTE_EVERY_S = 10.0


def site_flexibility(ctl: SiteState) -> Flexibility:
    """The site's flexibility as the controller sees it now (its last tick's target and fail-safe, the latest
    fleet snapshot and meter reading). Powers at the meter when there is a fresh one."""
    now = ctl.clock.time()
    snap = ctl.fleet.latest()
    views = observe_now(ctl).views
    cfg = ctl.cfg
    cap_kw = ctl.caps.effective_kw()
    target = ctl.target
    tick = None if ctl.meter is None else ctl.meter.last
    miners_kw = snap.power_w / 1000.0
    if tick is not None:
        present_kw, other_kw = tick.site_kw, tick.base_kw
        metered = tick.fresh
        read_at = snap.ts if tick.read_at is None else min(snap.ts, tick.read_at)
    else:
        present_kw, other_kw, metered, read_at = miners_kw, 0.0, False, snap.ts
    up = cfg.control.ramp_up_kw_per_min
    return flexibility(
        views,
        site_id=cfg.site.id,
        tree=ctl.rules.tree,
        rules=ctl.rules.planner,
        now=now,
        cap_w=cap_kw * 1000.0,
        target_w=(cap_kw if target is None else min(target.kw, cap_kw)) * 1000.0,
        present_w=max(0.0, present_kw) * 1000.0,
        metered=metered,
        other_load_w=max(0.0, other_kw) * 1000.0,
        ramp_up_w_per_s=None if up is None else up * 1000.0 / 60.0,
        stagger=ctl.rules.stagger,
        failsafe=ctl.failsafe,
        readings_at=read_at,
        stale_after_s=cfg.polling.stale_after_s,
    )


class FlexSink:
    """A controller status sink that publishes the flexibility document when it is due (see the module doc)."""

    def __init__(
        self,
        ctl: SiteState,
        publish: Callable[[FlexDoc], None],
        *,
        policy: FlexPublishPolicy | None = None,
        compute_every_s: float = COMPUTE_EVERY_S,
    ) -> None:
        self._ctl = ctl
        self._publish = publish
        self.policy = policy or FlexPublishPolicy()
        self._every = compute_every_s
        self._computed_at: float | None = None
        self._inputs: tuple[object, ...] | None = None
        self.last: Flexibility | None = None
        self.published = 0

    def _watched(self) -> tuple[object, ...]:
        ctl = self._ctl
        target = ctl.target
        fs = ctl.failsafe
        return (
            ctl.caps.effective_kw(),
            None if target is None else round(target.kw, 3),
            None if fs is None else (fs.active, fs.level_kw),
        )

    def __call__(self, doc: StatusDoc) -> None:  # a status sink; the doc is not needed
        now = self._ctl.clock.time()
        inputs = self._watched()
        fresh_enough = self._computed_at is not None and 0.0 <= now - self._computed_at < self._every
        if fresh_enough and inputs == self._inputs:
            return
        try:
            flex = site_flexibility(self._ctl)
        except ValueError as exc:  # a non-finite reading: nothing published, said once per kind of failure
            log.warning("flexibility not computed", error=str(exc)[:200])
            return
        self._computed_at, self._inputs, self.last = now, inputs, flex
        if self.policy.due(flex, now):
            self._publish(flex.to_dict())
            self.policy.published(flex, now)
            self.published += 1
