"""The program core (coordinator/program.py): the gate for program commands, the state they leave, the site
dispatches derived from them (accepted by a real in-process agent, once), delivery and re-allocation.

Properties are checked against bounds computed here from the sites' published figures, not against the module's
own helpers."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hashflex.agent.core.flexibility import flexibility
from hashflex.agent.protocol import Channel
from hashflex.contract.reply import Reply
from hashflex.contract.signing import sign_command
from hashflex.coordinator.allocation import SiteLimits
from hashflex.coordinator.program import (
    CAP_ID,
    Accepted,
    ProgramState,
    Refusal,
    Repeat,
    SiteCommand,
    SiteConfig,
    SiteView,
    acknowledge,
    apply,
    pending_commands,
    step,
    worst_case_w,
)
from tests.coordinator.support import COORD, GRID, MW, PROGRAM, RULES, T0, Fabric, accept, ack_all, command, flex, gate
from tests.runtime_support import ManualClock, grid_config, start_parts, stop_parts
from tests.unit.fleets import Case, cases

OTHER = Ed25519PrivateKey.generate()
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------- helpers


def floor_for(view: SiteView, horizon: float) -> float:
    assert view.flex is not None
    return min([view.present_w or 0.0, *(r.floor_w for r in view.flex.reach if r.within_s <= horizon)])


# -------------------------------------------------------------------------------------------------- gate


def test_a_hold_is_accepted_applied_and_answered_again_as_a_repeat() -> None:
    state = ProgramState(PROGRAM)
    payload = command("hold", {"id": "h1", "target_kw": "40MW", "end": T0 + 3600})
    out = gate("hold", payload, state)
    assert isinstance(out, Accepted)
    state2, reply = apply(state, out, now=T0, present_w=54 * MW)
    assert reply.is_ok
    assert reply.data["target_kw"] == 40_000
    held = state2.dispatches["h1"]
    assert (held.kind, held.target_w, held.start, held.end, held.from_w) == ("hold", 40 * MW, T0, T0 + 3600, 54 * MW)
    assert state2.revision == 1
    # the same command again (a retry, re-signed later): the stored answer, nothing changes
    again = gate("hold", command("hold", {"id": "h1", "target_kw": "40MW", "end": T0 + 3600}, at=T0 + 5), state2)
    assert isinstance(again, Repeat)
    assert again.reply.to_dict() == reply.to_dict()
    # the same id with other content: a conflict
    other = gate("hold", command("hold", {"id": "h1", "target_kw": "39MW", "end": T0 + 3600}, at=T0 + 6), state2)
    assert isinstance(other, Refusal)
    assert other.code == "conflict"


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("unsigned", "unsigned"),
        ("other key", "bad_signature"),
        ("tampered", "bad_signature"),
        ("wrong program", "wrong_scope"),
        ("wrong verb", "wrong_scope"),
        ("no scope", "bad_request"),
        ("above the sites' caps", "out_of_range"),
        ("negative", "out_of_range"),
        ("nan", "bad_json"),
        ("inf string", "bad_request"),
        ("unknown field", "bad_request"),
        ("no id", "bad_request"),
        ("window over", "expired"),
        ("old", "expired"),
        ("future", "future"),
        ("milliseconds", "bad_request"),
        ("unknown verb", "unknown_verb"),
        ("cancel unknown", "unknown_dispatch"),
        ("reserved id", "bad_request"),
    ],
)
def test_bad_program_commands_are_refused_with_a_reason(case: str, code: str) -> None:
    body: dict[str, Any] = {"id": "h1", "target_kw": 40_000, "end": T0 + 3600}
    verb = "hold"
    payload: bytes
    if case == "unsigned":
        payload = json.dumps({"program": PROGRAM, "verb": verb, "issued_at": T0, **body}).encode()
    elif case == "other key":
        payload = command(verb, body, key=OTHER)
    elif case == "tampered":
        doc = json.loads(command(verb, body))
        doc["target_kw"] = 1
        payload = json.dumps(doc).encode()
    elif case == "wrong program":
        payload = command(verb, body, program="other-program")
    elif case == "wrong verb":
        payload = command("shed", body)
    elif case == "no scope":
        payload = json.dumps(sign_command({"issued_at": T0, **body}, GRID)).encode()
    elif case == "above the sites' caps":
        payload = command(verb, {**body, "target_kw": "101MW"})
    elif case == "negative":
        payload = command(verb, {**body, "target_kw": -5})
    elif case == "nan":
        payload = command(verb, body).replace(b'"target_kw": 40000', b'"target_kw": NaN')
        assert b"NaN" in payload
    elif case == "inf string":
        payload = command(verb, {**body, "target_kw": "inf"})
    elif case == "unknown field":
        payload = command(verb, {**body, "site": "a"})
    elif case == "no id":
        payload = command(verb, {"target_kw": 40_000, "end": T0 + 3600})
    elif case == "window over":
        payload = command(verb, {**body, "end": T0 - 1})
    elif case == "old":
        payload = command(verb, body, at=T0 - 301)
    elif case == "future":
        payload = command(verb, body, at=T0 + 31)
    elif case == "milliseconds":
        payload = command(verb, {**body, "end": (T0 + 3600) * 1000})
    elif case == "unknown verb":
        verb = "release"
        payload = command(verb, body)
    elif case == "cancel unknown":
        verb = "cancel"
        payload = command(verb, {"id": "c1", "dispatch_id": "nope"})
    else:
        payload = command(verb, {**body, "id": CAP_ID})
    state = ProgramState(PROGRAM)
    out = gate(verb, payload, state)
    assert isinstance(out, Refusal), out
    assert out.code == code, out.message
    assert out.message
    assert state == ProgramState(PROGRAM)  # nothing changed


def test_replays_are_refused_by_the_newest_issue_time_per_verb() -> None:
    state = accept(
        ProgramState(PROGRAM), "hold", {"id": "h1", "target_kw": 40_000, "end": T0 + 3600}, now=T0, present_w=54 * MW
    )
    # an older (or equally old) hold with another id: a replay or a late command
    for at in (T0 - 10, T0):
        out = gate("hold", command("hold", {"id": "h0", "target_kw": 30_000, "end": T0 + 3600}, at=at), state, now=T0)
        assert isinstance(out, Refusal)
        assert out.code == "stale"
    # other verbs keep their own order: a shed issued before the hold is fine
    shed = gate("shed", command("shed", {"id": "s1", "shed_kw": 1000}, at=T0 - 10), state, now=T0)
    assert isinstance(shed, Accepted)
    # a revision of the hold needs a higher rev
    same_rev = gate(
        "hold",
        command("hold", {"id": "h1", "target_kw": 30_000, "end": T0 + 3600, "rev": 0}, at=T0 + 1),
        state,
        now=T0 + 1,
    )
    assert isinstance(same_rev, Refusal)
    assert same_rev.code == "conflict"  # rev 0 of h1 was answered with other content
    rev1 = gate(
        "hold",
        command("hold", {"id": "h1", "target_kw": 30_000, "end": T0 + 3600, "rev": 1}, at=T0 + 1),
        state,
        now=T0 + 1,
    )
    assert isinstance(rev1, Accepted)


FIELDS = [
    "id",
    "target_kw",
    "shed_kw",
    "cap_kw",
    "end",
    "start",
    "rev",
    "dispatch_id",
    "ramp_kw_per_min",
    "program",
    "verb",
    "issued_at",
    "signature",
    "extra",
]


@PROPS
@given(
    st.sampled_from(["hold", "shed", "cancel", "cap", "x"]),
    st.dictionaries(
        st.sampled_from(FIELDS),
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        max_size=8,
    ),
    st.booleans(),
)
def test_any_payload_is_answered_never_raises(verb: str, body: dict[str, Any], signed: bool) -> None:
    """Whatever arrives (signed or not): an answer, never an exception; a refusal carries a code and a reason."""
    doc = {k: v for k, v in body.items() if not (isinstance(v, float) and not math.isfinite(v))}
    if signed:
        doc = sign_command(doc, GRID)
    out = gate(verb, json.dumps(doc).encode(), ProgramState(PROGRAM))
    if isinstance(out, Refusal):
        assert out.code
        assert out.message
    else:  # only a complete, signed, in-range command passes
        assert signed
        assert doc.get("program") == PROGRAM
        assert doc.get("verb") == verb


# ---------------------------------------------------------------------------------------- site dispatches


def test_a_hold_becomes_site_dispatches_within_every_sites_range() -> None:
    fab = Fabric.make()
    state = accept(
        ProgramState(PROGRAM),
        "hold",
        {"id": "h1", "target_kw": 30_000, "end": T0 + 3600},
        now=T0,
        present_w=fab.present(),
    )
    result = step(state, fab.configs, fab.views, now=T0)
    (report,) = result.reports
    assert report.unmet_w == 0.0
    assert report.alarm is None
    shares = {s.site_id: s.target_w for s in report.sites}
    assert math.fsum(v or 0.0 for v in shares.values()) <= 30 * MW
    for cfg in fab.configs:
        share = shares[cfg.site_id]
        assert share is not None
        assert floor_for(fab.views[cfg.site_id], RULES.min_horizon_s) <= share <= cfg.cap_w
    # one dispatch per site, the agent's own format: id from the program dispatch, rev 0, whole watts
    assert sorted(c.site_id for c in result.commands) == ["a", "b", "c"]
    for cmd in result.commands:
        assert cmd.doc["id"] == f"{PROGRAM}.h1"
        assert cmd.doc["rev"] == 0
        assert (cmd.doc["site"], cmd.doc["verb"]) == (cmd.site_id, "dispatch")
        assert cmd.doc["target_kw"] * 1000 == pytest.approx(math.floor(shares[cmd.site_id] or 0.0))
        assert cmd.doc["end"] == T0 + 3600
    # the cheapest hashrate is shed first: the least efficient MW (site b, 20 TH/s per MW) go before c's (40)
    b, c = (shares[s] or 0.0 for s in "bc")
    assert (20 * MW - b) / 20 >= (30 * MW - c) / 30


def test_retries_and_failovers_send_the_same_revision() -> None:
    fab = Fabric.make()
    state = accept(
        ProgramState(PROGRAM),
        "hold",
        {"id": "h1", "target_kw": 30_000, "end": T0 + 3600},
        now=T0,
        present_w=fab.present(),
    )
    first = step(state, fab.configs, fab.views, now=T0)
    # a new leader reads the replicated state (JSON) and steps again, a little later, readings a little moved
    restored = ProgramState.from_dict(json.loads(json.dumps(first.state.to_dict())))
    assert restored == first.state
    fab.set("a", present_w=(fab.views["a"].present_w or 0.0) - 2000.0)
    again = step(restored, fab.configs, fab.views, now=T0 + 5)
    assert [(c.site_id, c.doc["id"], c.doc["rev"], c.doc["target_kw"]) for c in again.commands] == [
        (c.site_id, c.doc["id"], c.doc["rev"], c.doc["target_kw"]) for c in first.commands
    ]
    assert again.state.revision == first.state.revision  # nothing new decided
    # acknowledged: nothing left to send
    done = ack_all(again.state, again)
    assert step(done, fab.configs, fab.views, now=T0 + 10).commands == ()
    # a late reply to an older revision changes nothing
    old = SiteCommand("a", "dispatch", "h1", 99, {})
    assert acknowledge(done, "a", old, Reply.ok("x")) == done


def test_an_offline_site_is_counted_at_its_worst_case_and_the_others_take_its_share() -> None:
    fab = Fabric.make()
    state = accept(
        ProgramState(PROGRAM),
        "hold",
        {"id": "h1", "target_kw": 35_000, "end": T0 + 3600},
        now=T0,
        present_w=fab.present(),
    )
    first = step(state, fab.configs, fab.views, now=T0)
    state = ack_all(first.state, first)
    fab.obey(first)
    before = {s.site_id: s.target_w or 0.0 for s in first.reports[0].sites}
    fab.set("a", online=False)  # its last will
    result = step(state, fab.configs, fab.views, now=T0 + 20)
    report = result.reports[0]
    by_site = {s.site_id: s for s in report.sites}
    assert by_site["a"].failure == "offline"
    assert by_site["a"].counted_w == worst_case_w(fab.configs[0], fab.views["a"]) == 10 * MW
    assert by_site["a"].target_w == before["a"]  # it keeps its share: it holds it when it is back
    # the others are lowered at once, by as much as a would draw above its share
    assert math.fsum(s.counted_w for s in report.sites) <= 35 * MW
    for sid in "bc":
        assert by_site[sid].target_w is not None
        assert (by_site[sid].target_w or 0.0) < before[sid]
        assert (by_site[sid].rev or 0) == 1
    assert sorted(c.site_id for c in result.commands) == ["b", "c"]


@pytest.mark.parametrize("failure", ["stale", "own_stale", "not_met"])
def test_stale_or_undelivering_sites_are_counted_at_their_worst_case(failure: str) -> None:
    fab = Fabric.make()
    state = accept(
        ProgramState(PROGRAM),
        "hold",
        {"id": "h1", "target_kw": 40_000, "end": T0 + 3600},
        now=T0,
        present_w=fab.present(),
    )
    first = step(state, fab.configs, fab.views, now=T0)
    state = ack_all(first.state, first)
    fab.obey(first)
    later = T0 + RULES.min_horizon_s + RULES.grace_s + 1
    for sid in "abc":
        fab.set(sid, flex_received_at=later)
    if failure == "stale":
        fab.set("c", flex_received_at=later - RULES.stale_after_s - 1)
    elif failure == "own_stale":
        view = fab.views["c"]
        assert view.flex is not None
        fab.set("c", flex=replace(view.flex, stale=True))
    else:
        fab.set("c", present_w=29.5 * MW)  # never came down to its share (27 MW)
    report = step(state, fab.configs, fab.views, now=later).reports[0]
    c = next(s for s in report.sites if s.site_id == "c")
    assert c.failure == ("not_met" if failure == "not_met" else "stale")
    assert c.counted_w == 30 * MW  # its cap (above its reading)
    assert report.allocated_w <= 40 * MW  # a and b (floors 2 + 4 MW in 60 s) take c's shortfall
    assert report.unmet_w == 0.0


def test_a_program_that_cannot_be_met_says_by_how_much() -> None:
    fab = Fabric.make()
    fab.set("c", online=False)  # 30 MW counted
    state = accept(ProgramState(PROGRAM), "shed", {"id": "s1", "shed_kw": "40MW"}, now=T0, present_w=fab.present())
    level = fab.present() - 40 * MW
    assert state.dispatches["s1"].target_w == pytest.approx(level)
    result = step(state, fab.configs, fab.views, now=T0)
    report = result.reports[0]
    # a and b at their 60-s floors (0.2 of their caps), c at its cap
    expected = 0.2 * 10 * MW + 0.2 * 20 * MW + 30 * MW
    assert report.allocated_w == pytest.approx(expected, abs=2.0)
    assert report.unmet_w == pytest.approx(expected - level, abs=2.0)
    assert result.alarms
    assert f"cannot be met by {report.unmet_w:.0f} W" in result.alarms[0]


def test_a_site_back_online_rises_only_into_room() -> None:
    """When an offline site is back, its share is evened out again, but the others come down first: each site is
    counted at the most it may draw meanwhile, and Σ stays under the level."""
    fab = Fabric.make()
    state = accept(
        ProgramState(PROGRAM),
        "hold",
        {"id": "h1", "target_kw": 40_000, "end": T0 + 3600},
        now=T0,
        present_w=fab.present(),
    )
    fab.set("a", online=False)
    r1 = step(state, fab.configs, fab.views, now=T0)
    state = ack_all(r1.state, r1)
    fab.obey(r1)
    fab.set("a", online=True, present_w=9 * MW)  # back, still drawing what it drew before it went
    r2 = step(state, fab.configs, fab.views, now=T0 + 30)
    by_site = {s.site_id: s for s in r2.reports[0].sites}
    assert by_site["a"].failure is None
    drawn = math.fsum(
        max(fab.views[s].present_w or 0.0, by_site[s].target_w or 0.0) for s in "abc"
    )  # what the sites may draw until the lowered ones are down
    assert drawn <= 40 * MW + 1.0
    # b and c rise only by what a's descent leaves: 40 − (9 + their present shares) MW, not to their new level
    rises = [(by_site[s].target_w or 0.0) - (fab.views[s].present_w or 0.0) for s in "bc"]
    assert math.fsum(rises) <= 40 * MW - 9 * MW - math.fsum(fab.views[s].present_w or 0.0 for s in "bc") + 1.0
    assert max(rises) > 0.0  # room there was, and it was used


def test_cancel_sends_cancels_until_acknowledged() -> None:
    fab = Fabric.make()
    state = accept(
        ProgramState(PROGRAM),
        "hold",
        {"id": "h1", "target_kw": 40_000, "end": T0 + 3600},
        now=T0,
        present_w=fab.present(),
    )
    r1 = step(state, fab.configs, fab.views, now=T0)
    state = ack_all(r1.state, r1)
    state = accept(state, "cancel", {"id": "c1", "dispatch_id": "h1"}, now=T0 + 10, present_w=fab.present())
    assert "h1" not in state.dispatches
    r2 = step(state, fab.configs, fab.views, now=T0 + 10)
    assert sorted((c.site_id, c.verb, c.doc["dispatch_id"]) for c in r2.commands) == [
        (s, "cancel", f"{PROGRAM}.h1") for s in "abc"
    ]
    done = ack_all(r2.state, r2)
    r3 = step(done, fab.configs, fab.views, now=T0 + 11)
    assert r3.commands == ()
    assert r3.state.assignments == {}


def test_a_ramped_hold_splits_its_ramp_over_the_sites() -> None:
    fab = Fabric.make()
    state = accept(
        ProgramState(PROGRAM),
        "hold",
        {"id": "h1", "target_kw": 30_000, "end": T0 + 7200, "ramp_kw_per_min": 1000},
        now=T0,
        present_w=fab.present(),
    )
    result = step(state, fab.configs, fab.views, now=T0)
    ramps = [c.doc["ramp_kw_per_min"] for c in result.commands]
    assert math.fsum(ramps) == pytest.approx(1000.0)
    report = result.reports[0]
    assert report.level_now_w == pytest.approx(fab.present())  # the ramp starts where the sites are
    assert report.level_w == 30 * MW
    assert step(state, fab.configs, fab.views, now=T0 + 60).reports[0].level_now_w == pytest.approx(
        fab.present() - 1000 * 1000.0
    )


def test_config_limits_keep_a_share_and_exclude_a_site() -> None:
    fab = Fabric.make()
    fab.configs[0] = SiteConfig("a", 10 * MW, SiteLimits(excluded=True))
    fab.configs[1] = SiteConfig("b", 20 * MW, SiteLimits(min_keep_share=0.5))
    state = accept(
        ProgramState(PROGRAM),
        "hold",
        {"id": "h1", "target_kw": 20_000, "end": T0 + 3600},
        now=T0,
        present_w=fab.present(),
    )
    result = step(state, fab.configs, fab.views, now=T0)
    by_site = {s.site_id: s for s in result.reports[0].sites}
    assert by_site["a"].target_w is None  # not dispatched
    assert by_site["a"].counted_w == 9 * MW  # at its present power
    assert (by_site["b"].target_w or 0.0) >= 10 * MW
    assert "a" not in {c.site_id for c in result.commands}


# ------------------------------------------------------------------------------------------- properties


@st.composite
def fabrics(draw: st.DrawFn) -> tuple[list[SiteConfig], dict[str, SiteView]]:
    n = draw(st.integers(1, 8))
    configs: list[SiteConfig] = []
    views: dict[str, SiteView] = {}
    for i in range(n):
        sid = f"s{i}"
        cap = draw(st.floats(1.0, 40.0)) * MW
        present = cap * draw(st.floats(0.0, 1.2))
        f0 = present * draw(st.floats(0.0, 1.0))
        f1 = f0 * draw(st.floats(0.0, 1.0))
        f2 = f1 * draw(st.floats(0.0, 1.0))
        cost = draw(st.floats(5.0, 60.0))
        health = draw(st.sampled_from(["ok", "ok", "ok", "offline", "stale", "none"]))
        configs.append(SiteConfig(sid, cap, SiteLimits(min_keep_share=draw(st.sampled_from([0.0, 0.0, 0.3])))))
        fl = (
            None
            if health == "none"
            else flex(sid, cap=cap, present=present, floors=(f0, f1, f2), at=T0, ths_per_mw=cost)
        )
        received = T0 - (RULES.stale_after_s + 5 if health == "stale" else 1.0)
        views[sid] = SiteView(sid, health != "offline", fl, received, present)
    return configs, views


@PROPS
@given(fabrics(), st.floats(0.0, 1.3), st.booleans())
def test_shares_respect_ranges_and_the_program_level(
    fabric: tuple[list[SiteConfig], dict[str, SiteView]], share: float, ramped: bool
) -> None:
    configs, views = fabric
    present = math.fsum(v.present_w or 0.0 for v in views.values())
    caps = math.fsum(c.cap_w for c in configs)
    body: dict[str, Any] = {"id": "h1", "target_kw": round(caps * share / 1000.0, 3), "end": T0 + 3600}
    if ramped:
        body["ramp_kw_per_min"] = 5000
    body["target_kw"] = min(body["target_kw"], 100_000)
    state = accept(ProgramState(PROGRAM), "hold", body, now=T0, present_w=present)
    level = state.dispatches["h1"].target_w
    result = step(state, configs, views, now=T0)
    report = result.reports[0]
    horizon = max(RULES.min_horizon_s, state.dispatches["h1"].reached_at() - T0)
    worst_total = 0.0
    floors_total = 0.0
    for cfg, s in zip(configs, report.sites, strict=True):
        view = views[cfg.site_id]
        healthy = view.online and view.flex is not None and T0 - (view.flex_received_at or 0) <= RULES.stale_after_s
        if not healthy:
            # counted at its worst case, never dispatched a new share
            assert s.counted_w == max(cfg.cap_w, view.flex.cap_w if view.flex else 0.0, view.present_w or 0.0)
            assert s.failure is not None
            worst_total += s.counted_w
            continue
        assert s.failure is None
        assert s.target_w is not None
        low = max(floor_for(view, horizon), cfg.limits.min_keep_share * cfg.cap_w)
        high = max(view.present_w or 0.0, cfg.cap_w)
        assert math.floor(low) - 1.0 <= s.target_w <= high  # whole watts, rounded down
        floors_total += low
    # Σ within the level whenever the sites can get there in time; otherwise the shortfall is said exactly
    if floors_total + worst_total <= level - len(configs):
        assert report.allocated_w <= level
        assert report.unmet_w == 0.0
        assert report.alarm is None
    else:
        assert report.unmet_w == pytest.approx(max(0.0, report.allocated_w - level))
    assert report.unmet_w == max(0.0, report.allocated_w - level)
    # every command is the agent's format, for a dispatched site
    for cmd in result.commands:
        assert cmd.doc["site"] == cmd.site_id
        assert cmd.doc["verb"] == "dispatch"
        assert cmd.doc["target_kw"] >= 0
        assert math.isfinite(cmd.doc["target_kw"])


def test_pending_commands_reissue_old_shares_fresh() -> None:
    """A share decided long ago (a site away for longer than the agents' max age) goes out with a fresh issue time
    and otherwise the same content."""
    fab = Fabric.make()
    state = accept(
        ProgramState(PROGRAM),
        "hold",
        {"id": "h1", "target_kw": 40_000, "end": T0 + 7200},
        now=T0,
        present_w=fab.present(),
    )
    state = step(state, fab.configs, fab.views, now=T0).state
    now = pending_commands(state, T0 + 10)
    later = pending_commands(state, T0 + 1000)
    assert [c.doc["issued_at"] for c in now] == [T0] * 3
    assert [c.doc["issued_at"] for c in later] == [T0 + 1000] * 3
    strip = [{k: v for k, v in c.doc.items() if k != "issued_at"} for c in now]
    assert strip == [{k: v for k, v in c.doc.items() if k != "issued_at"} for c in later]


# ------------------------------------------------------------------------ a real agent takes them, once


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Any]:
    clock = ManualClock(T0)
    cfg = grid_config(tmp_path, "b", COORD)  # the site trusts the coordinator's key
    parts = await start_parts(cfg, clock, COORD)
    yield parts
    await stop_parts(parts.controller, parts.task, parts.store)


async def test_a_real_agent_applies_a_site_dispatch_once(agent: Any) -> None:
    fab = Fabric.make()
    fab.configs = [SiteConfig("b", 1 * MW)]
    fab.views = {
        "b": replace(
            fab.views["b"],
            flex=flex("b", cap=1 * MW, present=0.9 * MW, floors=(0.0, 0.0, 0.0), at=T0, ths_per_mw=20.0),
            present_w=0.9 * MW,
        )
    }
    state = accept(
        ProgramState(PROGRAM), "hold", {"id": "h1", "target_kw": 600, "end": T0 + 3600}, now=T0, present_w=0.9 * MW
    )
    result = step(state, fab.configs, fab.views, now=T0)
    (cmd,) = result.commands

    async def send(c: SiteCommand) -> Reply:
        payload = json.dumps(sign_command(c.doc, COORD)).encode()
        reply: Reply = await agent.service.handle(c.verb, payload, Channel.MQTT)
        return reply

    first = await send(cmd)
    assert first.is_ok, first
    # a retry, and the same revision from a new leader after a failover: the agent's stored answer, applied once
    restored = ProgramState.from_dict(json.loads(json.dumps(result.state.to_dict())))
    (again,) = pending_commands(restored, T0 + 2)
    second = await send(again)
    assert second.is_ok, second
    assert second.data == first.data
    records = [d for d in agent.controller.book.docs(True) if d["id"] == f"{PROGRAM}.h1"]
    assert len(records) == 1
    assert records[0]["target_kw"] == pytest.approx(600.0)
    # a signature by anyone else is refused by the site
    forged = json.dumps(sign_command(cmd.doc, OTHER)).encode()
    refused = await agent.service.handle("dispatch", forged, Channel.MQTT)
    assert refused.error_code == "bad_signature"
    # the program is cancelled: the site is sent its cancel, and takes it
    state = accept(
        ack_all(result.state, result), "cancel", {"id": "c1", "dispatch_id": "h1"}, now=T0 + 5, present_w=0.6 * MW
    )
    (cancel,) = step(state, fab.configs, fab.views, now=T0 + 5).commands
    done = await send(cancel)
    assert done.is_ok, done


def test_a_revised_hold_and_a_cap_reach_every_site() -> None:
    fab = Fabric.make()
    state = accept(
        ProgramState(PROGRAM),
        "hold",
        {"id": "h1", "target_kw": 40_000, "end": T0 + 3600},
        now=T0,
        present_w=fab.present(),
    )
    r1 = step(state, fab.configs, fab.views, now=T0)
    state = ack_all(r1.state, r1)
    # the grid extends the window (rev 1), same level: every site gets a new revision with the new end
    state = accept(
        state,
        "hold",
        {"id": "h1", "target_kw": 40_000, "end": T0 + 7200, "rev": 1},
        now=T0 + 10,
        present_w=fab.present(),
    )
    r2 = step(state, fab.configs, fab.views, now=T0 + 10)
    assert sorted((c.site_id, c.doc["rev"], c.doc["end"]) for c in r2.commands) == [(s, 1, T0 + 7200) for s in "abc"]
    # a program cap: its own site dispatch, `<program>.cap`, with no end, Σ under it
    state = accept(
        ack_all(r2.state, r2), "cap", {"id": "cap-1", "cap_kw": "45MW"}, now=T0 + 20, present_w=fab.present()
    )
    r3 = step(state, fab.configs, fab.views, now=T0 + 20)
    caps = [c for c in r3.commands if c.dispatch_id == CAP_ID]
    assert sorted(c.site_id for c in caps) == ["a", "b", "c"]
    assert {c.doc["id"] for c in caps} == {f"{PROGRAM}.cap"}
    assert all("end" not in c.doc for c in caps)
    assert math.fsum(c.doc["target_kw"] * 1000 for c in caps) <= 45 * MW
    # a lower cap later: a new revision of the same site dispatch
    state = accept(
        ack_all(r3.state, r3), "cap", {"id": "cap-2", "cap_kw": "30MW"}, now=T0 + 30, present_w=fab.present()
    )
    r4 = step(state, fab.configs, fab.views, now=T0 + 30)
    caps = [c for c in r4.commands if c.dispatch_id == CAP_ID]
    assert {c.doc["rev"] for c in caps} == {1}
    assert math.fsum(c.doc["target_kw"] * 1000 for c in caps) <= 30 * MW


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(cases(faults=True, max_miners=12), min_size=1, max_size=4), st.floats(0.0, 1.0))
def test_shares_from_the_agents_own_flexibility(fleets: list[Case], share: float) -> None:
    """Sites publishing what agent.core.flexibility computes from random fleets (faults, circuits, min on/off):
    every share is within what that site said it can reach and may draw, Σ within the level or the shortfall said."""
    configs: list[SiteConfig] = []
    views: dict[str, SiteView] = {}
    for i, case in enumerate(fleets):
        sid = f"site{i}"
        cap_w = case.tree.caps_kw()[0] * 1000.0
        present = sum(v.power_w or 0.0 for v in case.views)
        f = flexibility(
            case.views,
            site_id=sid,
            tree=case.tree,
            rules=case.rules,
            now=T0,
            cap_w=cap_w,
            target_w=cap_w,
            present_w=present,
            metered=False,
            readings_at=T0,
        )
        configs.append(SiteConfig(sid, cap_w))
        views[sid] = SiteView(sid, True, f, T0, f.present_w)
    caps = math.fsum(c.cap_w for c in configs)
    target_kw = math.floor(caps * share) / 1000.0
    present = math.fsum(v.present_w or 0.0 for v in views.values())
    state = accept(
        ProgramState(PROGRAM), "hold", {"id": "h1", "target_kw": target_kw, "end": T0 + 3600}, now=T0, present_w=present
    )
    report = step(state, configs, views, now=T0).reports[0]
    lows = 0.0
    for s in report.sites:
        published = views[s.site_id].flex
        assert published is not None
        assert s.failure is None
        assert s.target_w is not None
        low = published.floor_within(RULES.min_horizon_s)
        lows += low
        assert math.floor(low) - 1.0 <= s.target_w <= max(published.most_w, published.present_w)
    level = target_kw * 1000.0
    if lows <= level - len(configs):
        assert report.allocated_w <= level
    assert report.unmet_w == max(0.0, report.allocated_w - level)
