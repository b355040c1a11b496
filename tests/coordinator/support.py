"""What the coordinator tests share: the program under test (its id, keys and start time), signed program commands
taken through the gate, a three-site fabric's published figures, and the lease timings of the lease tests (also run
alone in a process by lease_proc.py)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hashflex.contract.flex import Flexibility, LossPoint
from hashflex.contract.flex import Reach as FlexReach
from hashflex.contract.reply import Reply
from hashflex.contract.signing import sign_command
from hashflex.coordinator.lease import LeaseConfig
from hashflex.coordinator.program import (
    Accepted,
    ProgramRules,
    ProgramState,
    Refusal,
    Repeat,
    SiteConfig,
    SiteView,
    StepResult,
    acknowledge,
    apply,
    parse_program_command,
)

T0 = 1_760_000_000.0
PROGRAM = "pk-mining"
GRID = Ed25519PrivateKey.generate()
COORD = Ed25519PrivateKey.generate()
MW = 1e6
RULES = ProgramRules()


def command(verb: str, body: dict[str, Any], *, at: float = T0, key: Ed25519PrivateKey = GRID, **scope: Any) -> bytes:
    doc = {"program": PROGRAM, "verb": verb, "issued_at": at, **scope, **body}
    return json.dumps(sign_command(doc, key)).encode()


def gate(verb: str, payload: bytes, state: ProgramState, *, now: float = T0) -> Accepted | Repeat | Refusal:
    return parse_program_command(
        verb, payload, state=state, grid_keys=[GRID.public_key()], now=now, program_max_w=100 * MW
    )


def accept(state: ProgramState, verb: str, body: dict[str, Any], *, now: float, present_w: float) -> ProgramState:
    out = gate(verb, command(verb, body, at=now), state, now=now)
    assert isinstance(out, Accepted), out
    new, reply = apply(state, out, now=now, present_w=present_w)
    assert reply.is_ok
    return new


def flex(
    site: str, *, cap: float, present: float, floors: tuple[float, float, float], at: float, ths_per_mw: float
) -> Flexibility:
    """A site's published figures: a convex loss curve (the first MW shed are the cheapest), floors now/60 s/5 min."""
    depths = (0.1, 0.25, 0.5, 0.75, 1.0)
    loss = tuple(LossPoint(d, d * cap, ths_per_mw * (d * cap / MW) * (1 + d)) for d in depths)
    return Flexibility(
        site_id=site,
        at=at,
        present_w=present,
        metered=True,
        reach=tuple(FlexReach(w, f) for w, f in zip((0.0, 60.0, 300.0), floors, strict=True)),
        most_w=max(present, cap),
        cap_w=cap,
        fleet_max_w=cap,
        target_w=cap,
        ramp_up_w_per_s=None,
        ramp_down_w_per_s=None,
        wake_max_per_interval=200,
        wake_interval_s=10.0,
        min_on_s=120.0,
        min_off_s=120.0,
        ths_at_cap=ths_per_mw * cap / MW * 2,
        ths_now=0.0,
        loss=loss,
        failsafe_active=False,
        failsafe_reason="",
        failsafe_level_w=None,
        readings_at=at,
        readings_age_s=0.0,
        stale=False,
        miners=100,
        unreachable=0,
    )


@dataclass
class Fabric:
    """Three sites of 10, 20 and 30 MW drawing 90 % of their caps, differently efficient."""

    configs: list[SiteConfig]
    views: dict[str, SiteView]

    @classmethod
    def make(cls, now: float = T0) -> Fabric:
        specs = [("a", 10 * MW, 30.0), ("b", 20 * MW, 20.0), ("c", 30 * MW, 40.0)]
        configs = [SiteConfig(s, cap) for s, cap, _ in specs]
        views = {
            s: SiteView(
                s,
                True,
                flex(s, cap=cap, present=0.9 * cap, floors=(0.5 * cap, 0.2 * cap, 0.05 * cap), at=now, ths_per_mw=cost),
                now,
                0.9 * cap,
            )
            for s, cap, cost in specs
        }
        return cls(configs, views)

    def present(self) -> float:
        return math.fsum(v.present_w or 0.0 for v in self.views.values())

    def set(self, site: str, **changes: Any) -> None:
        self.views[site] = replace(self.views[site], **changes)

    def obey(self, result: StepResult) -> None:
        """Every site goes to its share (what a site meeting its dispatch reads), its figures refreshed."""
        for report in result.reports:
            for s in report.sites:
                if s.target_w is not None and s.failure is None:
                    view = self.views[s.site_id]
                    self.set(s.site_id, present_w=min(view.present_w or 0.0, s.target_w))


def ack_all(state: ProgramState, result: StepResult) -> ProgramState:
    for cmd in result.commands:
        state = acknowledge(state, cmd.site_id, cmd, Reply.ok(cmd.doc["id"]))
    return state


# ------------------------------------------------------------------------------------------------- lease
TTL_S = 2.0


def lease_config(name: str) -> LeaseConfig:
    """Short: the tests wait through several TTLs. Renewing 5× a TTL, one request at most a quarter of it."""
    return LeaseConfig(bucket=name, ttl_s=TTL_S, renew_every_s=0.4, op_timeout_s=0.5, safety_s=0.2)
