"""The grid-link fail-safe state machine (EEBUS LPC analog); each test names the clause it proves."""

from __future__ import annotations

import pytest

from agent.core.failsafe import FailsafeRules, FailsafeState, command, evaluate, heartbeat, limit_kw, start

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
