"""The site's control rules from its config, in one place: the circuit tree and each miner's circuit and priority,
the time-of-use schedule, and the rules of arbitration, the fail-safe, the planner, the wake stagger and the miners'
observation (agent.core.observe). Built once at start; the pure core takes them as values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hashflex.agent.config import AgentConfig
from hashflex.agent.core import failsafe as fs
from hashflex.agent.core.addresses import expand
from hashflex.agent.core.arbitration import ArbitrationRules
from hashflex.agent.core.circuits import Circuit, CircuitTree, membership
from hashflex.agent.core.observe import ObserveRules
from hashflex.agent.core.planning import PlannerRules
from hashflex.agent.core.ramp import WakeStaggerRule
from hashflex.agent.core.schedule import ScheduleRule


@dataclass(frozen=True, slots=True)
class ControlRules:
    tree: CircuitTree
    circuit_of: Mapping[str, str]  # miner → the deepest circuit that lists it
    priority_of: Mapping[str, int]
    schedule: list[ScheduleRule]
    arbitration: ArbitrationRules
    failsafe: fs.FailsafeRules
    planner: PlannerRules
    stagger: WakeStaggerRule
    observe: ObserveRules

    @classmethod
    def from_config(cls, cfg: AgentConfig, *, grid_link: bool) -> ControlRules:
        ctl = cfg.control
        tree = CircuitTree(cfg.site.cap_kw, [Circuit(c.id, c.parent, c.cap_kw) for c in cfg.site.circuits])
        circuit_of = membership(tree, [(c.id, c.miners) for c in cfg.site.circuits])
        priority_of = _priority_map(cfg)
        level = cfg.failsafe.level
        return cls(
            tree=tree,
            circuit_of=circuit_of,
            priority_of=priority_of,
            schedule=[
                ScheduleRule.from_hhmm(w.name, w.start, w.end, w.days, w.target_kw, cfg.site.tzinfo)
                for w in cfg.schedule
            ],
            arbitration=ArbitrationRules(
                debounce_s=cfg.dispatch.debounce_s,
                min_hold_s=cfg.dispatch.min_hold_s,
                cooldown_s=cfg.dispatch.cooldown_s,
                max_event_s=cfg.dispatch.max_event_s,
            ),
            failsafe=fs.FailsafeRules(
                enabled=cfg.failsafe.enabled,
                grid_link=grid_link,
                heartbeat_timeout_s=cfg.failsafe.heartbeat_timeout_s,
                level_kw=None if level == "hold" else float(level),
                hold_at_start=cfg.failsafe.hold_at_start,
                release_after_s=cfg.failsafe.release_after_s,
            ),
            planner=PlannerRules(
                min_on_s=ctl.min_on_s,
                min_off_s=ctl.min_off_s,
                headroom_pct=ctl.headroom_pct,
                use_power_limits=ctl.use_power_limits,
            ),
            stagger=WakeStaggerRule(ctl.wake.max_per_interval, ctl.wake.interval_s),
            observe=ObserveRules(
                cfg.polling.stale_after_s,
                ctl.confirm_after_s,
                min(0.9 * cfg.polling.interval_s, ctl.confirm_after_s / 2),
                circuit_of,
                priority_of,
            ),
        )


def _priority_map(cfg: AgentConfig) -> dict[str, int]:
    out: dict[str, int] = {}
    for group in cfg.miners.priority_groups:
        for ip in expand(group.addresses):
            out.setdefault(ip, group.priority)
    return out
