"""The test-only crash points: the spec's grammar, and `point@after` counting only arrivals after `after`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from hashflex.agent.runtime.crashpoints import ENV, parse


def test_the_spec_names_a_point_a_count_and_a_gate() -> None:
    assert parse(None) is None
    assert parse("  ") is None
    assert parse("planned") == ("planned", 1, None)
    assert parse("in_flight:3") == ("in_flight", 3, None)
    assert parse("planned@accepted") == ("planned", 1, "accepted")
    assert parse("planned:2@accepted") == ("planned", 2, "accepted")
    assert parse("planned@") == ("planned", 1, None)  # an empty gate is no gate


@pytest.mark.parametrize("spec", ["nowhere", "planned:0", "planned:x", "planned@nowhere", "nowhere@planned"])
def test_a_spec_that_names_nothing_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match=ENV):
        parse(spec)


def _run(spec: str, arrivals: list[str]) -> subprocess.CompletedProcess[str]:
    code = (
        "from hashflex.agent.runtime.crashpoints import crash_point\n"
        f"for name in {arrivals!r}:\n"
        "    print(name, flush=True)\n"
        "    crash_point(name)\n"
    )
    env = {**os.environ, ENV: spec}
    cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_a_gated_point_counts_only_arrivals_after_its_gate() -> None:
    done = _run("planned@accepted", ["planned", "planned", "accepted", "planned", "never reached"])
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout.split() == ["planned", "planned", "accepted", "planned"]
    assert "SIGKILL at planned (arrival 1)" in done.stderr


def test_an_ungated_point_dies_at_its_nth_arrival() -> None:
    done = _run("planned:2", ["accepted", "planned", "planned", "never reached"])
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout.split() == ["accepted", "planned", "planned"]
