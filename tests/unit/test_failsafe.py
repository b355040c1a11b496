"""The grid-link fail-safe state machine (EEBUS LPC analog); each test names the clause it proves."""

from __future__ import annotations

import dataclasses

import pytest

from hashflex.agent.core.failsafe import (
    FailsafeRules,
    FailsafeState,
    SavedLink,
    command,
    evaluate,
    heartbeat,
    limit_kw,
    link_doc,
    link_from_doc,
    release,
    resume,
    saved_link,
    start,
)

T0 = 1_000_000.0
RULES = FailsafeRules(heartbeat_timeout_s=180.0, level_kw=300.0, hold_at_start=False, release_after_s=300.0)


def running(rules: FailsafeRules = RULES) -> FailsafeState:
    """Started, heard from the grid, not in fail-safe."""
    s = heartbeat(start(T0, rules, hold_kw=900.0), T0 + 1)
    return evaluate(s, T0 + 1, rules, hold_kw=900.0)


def test_failsafe_holds_at_first_start_until_the_grid_is_heard() -> None:
    rules = FailsafeRules(level_kw=300.0, hold_at_start=True)
    s = start(T0, rules, hold_kw=900.0)
    assert s.active
    assert s.reason == "startup"
    assert limit_kw(s) == 300.0


def test_failsafe_at_start_is_optional() -> None:
    s = start(T0, RULES, hold_kw=900.0)
    assert not s.active
    assert limit_kw(s) is None


def test_failsafe_enters_on_heartbeat_loss() -> None:
    s = running()
    s = evaluate(s, T0 + 180, RULES, hold_kw=900.0)
    assert not s.active
    s = evaluate(s, T0 + 181, RULES, hold_kw=900.0)
    assert s.active
    assert s.reason == "heartbeat_lost"
    assert s.since == T0 + 181
    assert limit_kw(s) == 300.0


def test_failsafe_enters_when_the_grid_is_never_heard_after_start() -> None:
    s = evaluate(start(T0, RULES, hold_kw=900.0), T0 + 180, RULES, hold_kw=900.0)
    assert s.active
    assert s.reason == "heartbeat_lost"


def test_failsafe_hold_level_keeps_the_target_from_the_moment_it_was_entered() -> None:
    rules = FailsafeRules(heartbeat_timeout_s=180.0, level_kw=None, hold_at_start=False)
    s = evaluate(running(rules), T0 + 200, rules, hold_kw=640.0)
    assert limit_kw(s) == 640.0
    s = evaluate(s, T0 + 300, rules, hold_kw=100.0)  # a later "last target" does not move the held level
    assert limit_kw(s) == 640.0


def test_heartbeat_keeps_failsafe_away() -> None:
    s = running()
    for k in range(1, 20):
        s = evaluate(heartbeat(s, T0 + 60 * k), T0 + 60 * k + 30, RULES, hold_kw=900.0)
        assert not s.active


def _in_failsafe() -> FailsafeState:
    s = evaluate(running(), T0 + 200, RULES, hold_kw=900.0)
    assert s.active
    return s


def test_failsafe_left_on_heartbeat_with_a_fresh_command() -> None:
    s = heartbeat(_in_failsafe(), T0 + 400)
    s = evaluate(s, T0 + 400, RULES, hold_kw=900.0)
    assert s.active, "heartbeat alone does not release before the release window"
    s = evaluate(command(s, T0 + 410), T0 + 410, RULES, hold_kw=900.0)
    assert not s.active
    assert limit_kw(s) is None
    assert s.since == T0 + 410


def test_failsafe_not_left_on_a_command_without_heartbeat() -> None:
    s = command(_in_failsafe(), T0 + 400)
    s = evaluate(s, T0 + 401, RULES, hold_kw=900.0)
    assert s.active


def test_failsafe_not_left_on_a_command_from_before_it_was_entered() -> None:
    s = command(running(), T0 + 100)
    s = evaluate(s, T0 + 300, RULES, hold_kw=900.0)
    assert s.active
    s = evaluate(heartbeat(s, T0 + 310), T0 + 310, RULES, hold_kw=900.0)
    assert s.active


def test_failsafe_left_when_heartbeat_is_back_for_the_release_window() -> None:
    s = _in_failsafe()
    for t in range(400, 700, 60):
        s = evaluate(heartbeat(s, T0 + t), T0 + t, RULES, hold_kw=900.0)
        assert s.active
    s = evaluate(heartbeat(s, T0 + 700), T0 + 700, RULES, hold_kw=900.0)
    assert not s.active


def test_release_window_restarts_when_the_heartbeat_drops_again() -> None:
    s = _in_failsafe()
    s = evaluate(heartbeat(s, T0 + 400), T0 + 400, RULES, hold_kw=900.0)
    s = evaluate(s, T0 + 600, RULES, hold_kw=900.0)  # 200 s without heartbeat: run broken
    assert s.heartbeat_back_at is None
    s = evaluate(heartbeat(s, T0 + 650), T0 + 650, RULES, hold_kw=900.0)
    s = evaluate(heartbeat(s, T0 + 800), T0 + 800, RULES, hold_kw=900.0)
    assert s.active, "only 150 s of unbroken heartbeat since the drop"
    s = evaluate(heartbeat(s, T0 + 950), T0 + 950, RULES, hold_kw=900.0)
    assert not s.active


def test_unseen_gap_in_heartbeats_restarts_the_release_window() -> None:
    s = _in_failsafe()
    s = heartbeat(s, T0 + 400)
    s = heartbeat(s, T0 + 650)  # a 250 s gap with no evaluate in between
    s = evaluate(s, T0 + 720, RULES, hold_kw=900.0)
    assert s.active
    assert s.heartbeat_back_at == T0 + 650


@pytest.mark.parametrize(("enabled", "grid_link"), [(False, True), (True, False)])
def test_failsafe_applies_only_where_a_grid_link_is_configured(enabled: bool, grid_link: bool) -> None:
    rules = FailsafeRules(enabled=enabled, grid_link=grid_link, hold_at_start=True, level_kw=0.0)
    s = start(T0, rules, hold_kw=900.0)
    assert not s.active
    assert not evaluate(s, T0 + 10_000, rules, hold_kw=900.0).active


def test_failsafe_rules_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="positive"):
        FailsafeRules(heartbeat_timeout_s=0)
    with pytest.raises(ValueError, match="non-negative"):
        FailsafeRules(level_kw=-1.0)


# ------------------------------------------------------------------------------------------------ across a restart
HOLD = FailsafeRules(heartbeat_timeout_s=180.0, level_kw=300.0, hold_at_start=True, release_after_s=300.0)
W0 = 1_700_000_000.0  # the wall clock when the last run wrote its record
BOOT = "b0a7-1"


def healthy_record(*, heartbeat_age_s: float = 5.0, boot_s: float | None = 5_000.0) -> SavedLink:
    """What a run with a healthy link (heard `heartbeat_age_s` ago, not in fail-safe) leaves at wall time W0. Its
    own clock (T0…) is not the wall's: only the wall times recorded count across the restart."""
    s = heartbeat(start(T0, HOLD, hold_kw=900.0), T0 + 10)
    s = evaluate(command(s, T0 + 11), T0 + 11, HOLD, hold_kw=900.0)
    assert not s.active
    now = T0 + 10 + heartbeat_age_s
    return saved_link(s, now, W0, boot=None if boot_s is None else (BOOT, boot_s))


def test_restart_within_the_timeout_of_a_healthy_link_resumes_without_failsafe() -> None:
    saved = link_from_doc(link_doc(healthy_record()))  # through the store's JSON form
    assert saved is not None
    assert saved.last_heartbeat_wall == W0 - 5.0
    t1 = 42.0  # the new run's clock: anything (it starts again at the wall clock)
    s = resume(t1, W0 + 60, HOLD, 900.0, saved, boot=(BOOT, 5_060.0))
    assert not s.active
    assert limit_kw(s) is None
    # the heartbeat timeout runs on from the last heartbeat heard before the stop, 65 s ago: 115 s are left
    assert not evaluate(s, t1 + 114, HOLD, hold_kw=900.0).active
    lost = evaluate(s, t1 + 116, HOLD, hold_kw=900.0)
    assert (lost.active, lost.reason, limit_kw(lost)) == (True, "heartbeat_lost", 300.0)
    # restarted again with no heartbeat in between: the record still dates from that heartbeat (no restart loop
    # keeps a silent link out of fail-safe)
    again = saved_link(s, t1 + 100, W0 + 160)
    assert again.last_heartbeat_wall == W0 - 5.0
    assert not resume(7.0, W0 + 174, HOLD, 900.0, again).active  # 179 s after it
    assert resume(7.0, W0 + 176, HOLD, 900.0, again).reason == "startup"  # 181 s


def test_first_start_keeps_the_start_rule() -> None:
    s = resume(T0, W0, HOLD, 900.0, link_from_doc(None))
    assert (s.active, s.reason, limit_kw(s)) == (True, "startup", 300.0)


def test_restart_of_a_link_in_failsafe_keeps_the_start_rule() -> None:
    in_failsafe = evaluate(heartbeat(start(T0, HOLD, hold_kw=900.0), T0 + 10), T0 + 11, HOLD, hold_kw=900.0)
    assert in_failsafe.active  # heard, but no grid command yet: still held [LPC-916]
    saved = saved_link(in_failsafe, T0 + 12, W0)
    s = resume(T0, W0 + 5, HOLD, 900.0, saved)
    assert (s.active, s.reason) == (True, "startup")


def test_restart_after_a_stop_longer_than_the_timeout_keeps_the_start_rule() -> None:
    saved = healthy_record(heartbeat_age_s=5.0)
    assert not resume(T0, W0 + 174, HOLD, 900.0, saved).active  # 179 s since the heartbeat
    s = resume(T0, W0 + 175, HOLD, 900.0, saved)  # 180 s: the link would have been lost by now
    assert (s.active, s.reason) == (True, "startup")


def test_restart_with_no_heartbeat_heard_keeps_the_start_rule() -> None:
    never = evaluate(start(T0, RULES, hold_kw=900.0), T0 + 1, RULES, hold_kw=900.0)
    assert not never.active
    assert never.last_heartbeat is None
    assert resume(T0, W0 + 1, HOLD, 900.0, saved_link(never, T0 + 1, W0)).active


def test_wall_clock_that_went_back_keeps_the_start_rule() -> None:
    saved = healthy_record()
    # 10 s before the record was written: the time the agent was down is unknown
    assert resume(T0, W0 - 10, HOLD, 900.0, saved).reason == "startup"
    assert resume(T0, W0 - 10, HOLD, 900.0, saved, boot=None).active


@pytest.mark.parametrize("boot_now", [5_000.0 + 3_600.0, 5_000.0 + 1.0])
def test_wall_clock_that_jumped_while_down_keeps_the_start_rule(boot_now: float) -> None:
    saved = healthy_record()
    # the wall says 30 s passed; the boot clock (never steps) says an hour (the wall was set back) or 1 s (set ahead)
    s = resume(T0, W0 + 30, HOLD, 900.0, saved, boot=(BOOT, boot_now), jump_tolerance_s=2.0)
    assert (s.active, s.reason) == (True, "startup")
    # the same wall reading with a boot clock that agrees resumes
    assert not resume(T0, W0 + 30, HOLD, 900.0, saved, boot=(BOOT, 5_030.5), jump_tolerance_s=2.0).active


def test_after_a_reboot_the_wall_clock_alone_decides() -> None:
    saved = healthy_record()
    assert not resume(T0, W0 + 30, HOLD, 900.0, saved, boot=("another-boot", 12.0)).active


def test_wall_clock_out_of_step_when_recorded_keeps_the_start_rule() -> None:
    saved = dataclasses.replace(healthy_record(), clock_stepped=True)
    assert link_from_doc(link_doc(saved)) == saved
    assert resume(T0, W0 + 5, HOLD, 900.0, saved).active


@pytest.mark.parametrize(
    "doc",
    [
        {},
        [],
        "x",
        {"active": "no", "saved_wall": W0, "clock_stepped": False},
        {"active": False, "saved_wall": float("nan"), "clock_stepped": False},
        {"active": False, "saved_wall": W0, "clock_stepped": None},
    ],
)
def test_damaged_record_reads_as_a_first_start(doc: object) -> None:
    assert link_from_doc(doc) is None


def test_resume_only_where_the_failsafe_applies() -> None:
    off = FailsafeRules(enabled=False, hold_at_start=True)
    s = resume(T0, W0 + 5, off, 900.0, healthy_record())
    assert not s.active
    assert s.last_heartbeat is None  # a start, not a resumed link


# ------------------------------------------------------------------------------------------------ what releases it
def test_release_waits_for_the_heartbeat_then_a_command_or_the_window() -> None:
    s = start(T0, HOLD, hold_kw=900.0)
    assert release(s, T0 + 1, HOLD) == ("heartbeat", None)
    s = evaluate(heartbeat(s, T0 + 20), T0 + 20, HOLD, hold_kw=900.0)
    assert release(s, T0 + 21, HOLD) == ("grid_command", T0 + 20 + 300.0)  # [LPC-916] or [LPC-921]
    # the heartbeat drops again: back to waiting for it
    s = evaluate(s, T0 + 20 + 181, HOLD, hold_kw=900.0)
    assert s.active
    assert release(s, T0 + 20 + 181, HOLD) == ("heartbeat", None)


def test_release_by_the_next_heartbeat_once_a_command_came() -> None:
    s = evaluate(command(start(T0, HOLD, hold_kw=900.0), T0 + 5), T0 + 5, HOLD, hold_kw=900.0)
    assert s.active
    assert release(s, T0 + 6, HOLD) == ("next_heartbeat", None)
    s = evaluate(heartbeat(s, T0 + 7), T0 + 7, HOLD, hold_kw=900.0)
    assert not s.active
    assert release(s, T0 + 7, HOLD) == (None, None)
