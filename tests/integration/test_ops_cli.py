"""Operator CLI: argument parsing, output (text and --json), exit codes, and what it says when no agent is
listening. Commands run in-process (typer's runner) against a stand-in agent on a real socket, and a few run
as the installed `hashflex` executable."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from hashflex.agent.cli import discover
from hashflex.agent.cli.main import app
from hashflex.agent.cli.render import print_table, watts
from hashflex.agent.core.timefmt import iso_ms as iso
from hashflex.drivers.base import Family, Identity, Presets
from tests.integration.ops_agent import MINERS, StandInAgent

pytestmark = pytest.mark.timeout(120)
runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})
HASHFLEX = str(Path(sys.executable).parent / "hashflex")


@pytest.fixture
def agent() -> Iterator[StandInAgent]:
    stand_in = StandInAgent().start()
    yield stand_in
    stand_in.stop()


@pytest.fixture
def no_agent_config() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="hf-none-", dir="/tmp"))
    config = folder / "site.yaml"
    config.write_text(
        "site: {id: demo, cap_kw: 45000}\nmqtt: {enabled: false}\n"
        f"state_dir: {folder / 'state'}\ncontrol_socket: {{path: {folder / 'run' / 'control.sock'}}}\n"
    )
    yield config
    shutil.rmtree(folder, ignore_errors=True)


def run(*args: str) -> Any:
    return runner.invoke(app, list(args))


def one_json(text: str) -> Any:
    return json.loads(text)  # raises if stdout holds anything but exactly one document


# --------------------------------------------------------------------------- no agent: say what to do, exit 2
ALL_COMMANDS = [
    ["status"],
    ["miners"],
    ["curtail", "--to", "12MW"],
    ["curtail", "--by", "3MW", "--for", "2h"],
    ["resume"],
    ["cap", "18MW"],
    ["cap"],
    ["preview", "--target", "12MW"],
    ["dispatches"],
    ["watch", "--count", "1"],
    ["logs"],
]


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=" ".join)
def test_no_agent_listening_says_what_to_do(command: list[str], no_agent_config: Path) -> None:
    result = run(*command, "--config", str(no_agent_config))
    assert result.exit_code == 2, result.output
    assert "no agent listening on" in result.stderr
    assert "systemctl status hashflex" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=" ".join)
def test_no_agent_with_json_is_one_error_document(command: list[str], no_agent_config: Path) -> None:
    args = [*command, "--config", str(no_agent_config), "--json"]
    result = run(*args)
    assert result.exit_code == 2
    doc = one_json(result.stdout)
    assert doc["status"] == "error"
    assert "no agent listening" in doc["error"]
    assert doc["data"]["reason"] == "missing"
    assert doc["data"]["socket"].endswith("control.sock")


def test_missing_config_file_names_it(tmp_path: Path) -> None:
    result = run("status", "--config", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2
    assert "nope.yaml: no such file" in result.stderr


def test_invalid_config_file_names_field(tmp_path: Path) -> None:
    bad = tmp_path / "site.yaml"
    bad.write_text("site: {id: demo, cap_kw: -5}\nmqtt: {enabled: false}\n")
    result = run("status", "--config", str(bad), "--json")
    assert result.exit_code == 2
    assert "site.cap_kw" in one_json(result.stdout)["error"]


def test_config_from_environment_variable(no_agent_config: Path) -> None:
    result = runner.invoke(app, ["status"], env={"HASHFLEX_CONFIG": str(no_agent_config)})
    assert result.exit_code == 2
    assert str(no_agent_config.parent / "run" / "control.sock") in result.stderr


# ------------------------------------------------------------------------- bad arguments: refused before sending
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["curtail"], "exactly one of --to"),
        (["curtail", "--to", "12MW", "--by", "1MW"], "exactly one of --to"),
        (["curtail", "--to", "twelve"], "--to: not a power"),
        (["curtail", "--to", "-3MW"], "--to: must be zero or more"),
        (["curtail", "--by", "0"], "--by: must be more than zero"),
        (["curtail", "--to", "12MW", "--for", "soon"], "--for: not a duration"),
        (["curtail", "--to", "12MW", "--for", "0s"], "--for: must be longer than zero"),
        (["curtail", "--to", "12MW", "--wait-timeout", "x"], "--wait-timeout: not a duration"),
        (["cap", "lots"], "POWER: not a power"),
        (["cap", "0MW"], "must be more than zero"),
        (["preview", "--target", "12 parsecs"], "--target: not a power"),
        (["miners", "--ip", "10.0.0.300"], "--ip:"),
        (["watch", "--json"], "--json needs --count"),
        (["logs", "--json", "--follow"], "--json and --follow do not mix"),
        (["logs", "--type", "bogus"], "--type: no event type 'bogus' (one of: accepted, agent_start,"),
    ],
)
def test_bad_arguments_are_refused_with_exit_1(args: list[str], words: str, no_agent_config: Path) -> None:
    result = run(*args, "--config", str(no_agent_config))
    assert result.exit_code == 1, result.output
    assert words in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["preview"],
        ["miners", "--state", "dancing"],
        ["miners", "--sort", "colour"],
        ["watch", "--count", "0"],
        ["logs", "--limit", "0"],
        ["status", "--bogus"],
        ["cap", "1MW", "2MW"],
    ],
)
def test_usage_errors_exit_2(args: list[str], no_agent_config: Path) -> None:
    result = run(*args, "--config", str(no_agent_config))
    assert result.exit_code == 2
    # one line that says what is wrong and where the help is: no usage block, no framed box (issue 16 item 9)
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ")
    assert "--help` lists what it takes" in line
    assert not set("╭╮╰╯│") & set(result.output)
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "sent"),
    [
        (["curtail", "--to", "12", "MW"], ("curtail", "to_kw", 12000.0)),
        (["curtail", "--to=12", "MW"], ("curtail", "to_kw", 12000.0)),
        (["curtail", "--by", "850", "kW", "--for", "2", "h"], ("curtail", "by_kw", 850.0)),
        (["cap", "18", "MW"], ("cap", "cap_kw", 18000.0)),
        (["preview", "--target", "3000", "W"], ("preview", "target_kw", 3.0)),
    ],
)
def test_a_space_between_number_and_unit_is_accepted(
    args: list[str], sent: tuple[str, str, float], agent: StandInAgent
) -> None:
    """`--to 12 MW` unquoted: the shell makes two words of it; before issue 16 the unit was an unexpected extra
    argument and the command ended in a framed usage box."""
    result = run(*args, "--config", str(agent.config))
    assert result.exit_code == 0, result.output
    verb, body = agent.handler.calls[-1]
    assert (verb, sent[1], body[sent[1]]) == sent
    if "--for" in args:
        assert body["for_s"] == 7200.0


# ---------------------------------------------------------------------------------- against a stand-in agent
def test_status_text(agent: StandInAgent) -> None:
    result = run("status", "--config", str(agent.config))
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "site demo" in text
    assert "tick 8 123" in text
    assert "41.20 MW" in text
    assert "3.80 MW under target" in text
    assert "45.00 MW — the site cap binds" in text
    assert "3 hashing · 1 throttled · 1 sleeping · 0 waking · 1 unreachable  (6 total)" in text
    assert "disconnected" in text
    assert "cpu 12% · mem 40% · disk 2.0 GB free · agent 310 MB" in text
    assert "no dispatch in force" in text


def test_status_says_what_releases_the_failsafe_and_when(agent: StandInAgent) -> None:
    releases_at = time.time() + 240
    status = agent.handler.status
    status.update(target_source="failsafe", target_reason="failsafe:heartbeat_lost")
    status["failsafe"] = {
        "active": True,
        "since": iso(time.time() - 60),
        "reason": "heartbeat_lost",
        "applies": True,
        "last_heartbeat": iso(time.time() - 5),
        "released_by": "grid_command",
        "releases_at": iso(releases_at),
        "release_after_s": 300.0,
    }
    text = " ".join(run("status", "--config", str(agent.config)).stdout.split())
    at = datetime.fromtimestamp(releases_at, UTC).strftime("%H:%M:%SZ")
    assert f"released by a grid command or by itself at {at} (in " in text, text
    assert "if the heartbeat holds" in text
    # not heard: nothing releases it before a heartbeat
    status["failsafe"].update(released_by="heartbeat", releases_at=None)
    text = " ".join(run("status", "--config", str(agent.config)).stdout.split())
    assert "released once the grid is heard: a heartbeat, then a grid command, or 5m00s of heartbeats" in text, text


def test_status_json_is_the_status_doc(agent: StandInAgent) -> None:
    result = run("status", "--config", str(agent.config), "--json")
    assert result.exit_code == 0
    doc = one_json(result.stdout)
    assert doc["site_id"] == "demo"
    assert doc["cap_kw"] == 45000.0
    assert doc["miners"]["total"] == 6


def test_curtail_sends_kw_and_seconds_then_status_explains_the_target(agent: StandInAgent) -> None:
    result = run("curtail", "--to", "12MW", "--for", "2h", "--config", str(agent.config))
    assert result.exit_code == 0, result.output
    verb, body = agent.handler.calls[-1]
    assert verb == "curtail"
    assert body["to_kw"] == 12000.0
    assert body["for_s"] == 7200.0
    assert body["id"].startswith("cli-")
    assert f"override {body['id']} holds the site at or under 12.00 MW until" in result.stderr
    status = run("status", "--config", str(agent.config)).stdout
    assert f"operator override {body['id']} binds (`hashflex resume` ends it)" in status
    assert "dispatches in force" in status


def test_curtail_by_with_units(agent: StandInAgent) -> None:
    result = run("curtail", "--by", "3000kW", "--config", str(agent.config), "--json")
    assert result.exit_code == 0
    doc = one_json(result.stdout)
    assert doc["dispatch"]["curtail_kw"] == 3000.0
    assert doc["dispatch"]["end"] is None
    assert agent.handler.calls[-1][1]["by_kw"] == 3000.0
    assert "for_s" not in agent.handler.calls[-1][1]


def test_curtail_wait_follows_the_site_to_its_level(agent: StandInAgent) -> None:
    result = run("curtail", "--to", "30MW", "--wait", "--config", str(agent.config), "--json")
    assert result.exit_code == 0, result.output
    doc = one_json(result.stdout)
    assert doc["status"]["power_kw_estimated"] <= 30000.0


def test_refusal_exits_1_with_the_agents_reason(agent: StandInAgent) -> None:
    result = run("curtail", "--to", "50MW", "--config", str(agent.config))
    assert result.exit_code == 1
    assert "the agent refused 'curtail'" in result.stderr
    assert "above the site cap" in result.stderr
    result = run("cap", "60MW", "--config", str(agent.config), "--json")
    assert result.exit_code == 1
    doc = one_json(result.stdout)
    assert doc["data"]["code"] == "out_of_range"


def test_resume_lists_what_it_ended(agent: StandInAgent) -> None:
    assert run("resume", "--config", str(agent.config)).stderr.startswith("no operator override")
    run("curtail", "--to", "20MW", "--config", str(agent.config))
    override_id = agent.handler.calls[-1][1]["id"]
    result = run("resume", "--config", str(agent.config))
    assert result.exit_code == 0
    assert f"ended override(s) {override_id}" in result.stderr
    assert agent.handler.calls[-1][0] == "resume"


def test_cap_set_and_show(agent: StandInAgent) -> None:
    result = run("cap", "18MW", "--config", str(agent.config))
    assert result.exit_code == 0
    assert "site cap set to 18.00 MW" in result.stderr
    verb, body = agent.handler.calls[-1]
    assert verb == "cap"
    assert body["cap_kw"] == 18000.0
    assert isinstance(body["issued_at"], float)
    shown = one_json(run("cap", "--config", str(agent.config), "--json").stdout)
    assert shown == {"cap_kw": 18000.0, "licensed_cap_kw": 45000.0}
    assert "cap 18.00 MW (licensed 45.00 MW)" in run("cap", "--config", str(agent.config)).stdout


def test_miners_table_sorted_filtered_limited(agent: StandInAgent) -> None:
    result = run("miners", "--sort", "power", "--desc", "--config", str(agent.config))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split("\t") == [
        "ip",
        "model",
        "firmware",
        "state",
        "power",
        "limit",
        "hashrate",
        "J/TH",
        "temp",
        "last seen",
    ]
    ips = [line.split("\t")[0] for line in lines[1:]]
    assert ips == ["10.0.0.9", "10.0.1.1", "10.0.0.10", "10.0.0.2", "10.0.0.3", "10.0.0.4"]  # unknown power last
    row = dict(zip(lines[0].split("\t"), lines[1].split("\t"), strict=True))
    assert row["power"] == "3.40 kW"
    assert row["hashrate"] == "112.0 TH/s"
    assert row["J/TH"] == "30.4"
    assert row["temp"] == "74°C"
    by_ip = [line.split("\t")[0] for line in run("miners", "--config", str(agent.config)).stdout.splitlines()[1:]]
    assert by_ip == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.9", "10.0.0.10", "10.0.1.1"]  # numeric IP order


def test_miners_filters_and_json(agent: StandInAgent) -> None:
    result = run("miners", "--state", "hashing", "--model", "s19", "--json", "--config", str(agent.config))
    doc = one_json(result.stdout)
    assert [m["ip"] for m in doc["miners"]] == ["10.0.0.10", "10.0.1.1"]
    assert doc["total"] == 2
    assert agent.handler.calls[-1] == ("miners", {"state": "hashing"})
    doc = one_json(
        run(
            "miners",
            "--ip",
            "10.0.0.0/28",
            "--sort",
            "efficiency",
            "--limit",
            "2",
            "--json",
            "--config",
            str(agent.config),
        ).stdout
    )
    assert [m["ip"] for m in doc["miners"]] == ["10.0.0.2", "10.0.0.10"]
    assert doc["total"] == 5


def test_preview_sends_target_and_prints_the_plan(agent: StandInAgent) -> None:
    result = run("preview", "--target", "12MW", "--config", str(agent.config))
    assert result.exit_code == 0
    assert agent.handler.calls[-1] == ("preview", {"target_kw": 12000.0})
    assert "Preview only: nothing is sent to any miner. The plan is for 12.00 MW." in result.stdout
    assert "it would draw about 12.00 MW, and at most 12.00 MW" in result.stdout
    assert one_json(run("preview", "-t", "2kW", "--json", "--config", str(agent.config)).stdout)["sleep"] == 3


PLAN = {
    "target_kw": 30000.0,
    "requested_kw": 50000.0,
    "method": "optimal",
    "worst_case_kw": 29950.0,
    "expected_kw": 29100.0,
    "expected_ths": 900_000.0,
    "baseline_ths": 820_000.0,
    "present_kw": 41200.0,
    "running": 150,
    "sleeping": 50,
    "uncontrolled": 2,
    "changes": {"sleep": 40, "set_power": 10},
    "alarms": [],
    "circuits": {"site": 29950.0},
    "wake_budget": 20,
    "plan_ms": 3.1,
}


def test_preview_says_in_sentences_what_it_would_do_and_why(agent: StandInAgent) -> None:
    """Issue 16 item 9: `preview` printed its reply as a raw key dump (`worst_case_kw  12.00 MW`, `plan_ms ...`)."""
    agent.handler.preview_reply = PLAN
    result = run("preview", "--target", "50MW", "--config", str(agent.config))
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "You asked for 50.00 MW; the site cap binds, so the plan holds 30.00 MW instead." in text
    assert "The site draws 41.20 MW now; with this plan it would draw about 29.10 MW, and at most 29.95 MW" in text
    assert "150 miner(s) would run and 50 sleep." in text
    assert "To get there, miners would be 40 put to sleep, 10 given a new power limit." in text
    assert "Chosen because it keeps the most hashrate under the target (900.00 PH/s against 820.00 PH/s" in text
    assert "2 miner(s) cannot be controlled and count at their worst case." in text
    assert "plan_ms" not in text
    assert "_kw" not in text


def test_dispatches_table_and_all(agent: StandInAgent) -> None:
    assert "no dispatch in force" in run("dispatches", "--config", str(agent.config)).stderr
    run("curtail", "--to", "20MW", "--config", str(agent.config))
    run("resume", "--config", str(agent.config))
    run("curtail", "--to", "25MW", "--config", str(agent.config))
    rows = run("dispatches", "--config", str(agent.config)).stdout.splitlines()
    assert rows[0].startswith("id\tsource\tlevel")
    assert len(rows) == 2
    assert "25.00 MW" in rows[1]
    every = one_json(run("dispatches", "--all", "--json", "--config", str(agent.config)).stdout)["dispatches"]
    assert [d["status"] for d in every] == ["cancelled", "active"]
    assert agent.handler.calls[-1] == ("dispatches", {"all": True})


def test_watch_refreshes_count_times(agent: StandInAgent) -> None:
    result = run("watch", "--count", "3", "--interval", "0.1", "--config", str(agent.config))
    assert result.exit_code == 0
    assert result.stdout.count("site demo") == 3
    assert [verb for verb, _ in agent.handler.calls] == ["status"] * 3
    docs = one_json(run("watch", "--count", "2", "-n", "0.1", "--json", "--config", str(agent.config)).stdout)
    assert len(docs) == 2
    assert all(d["site_id"] == "demo" for d in docs)


def test_logs_shows_events_oldest_first_and_filters(agent: StandInAgent) -> None:
    run("cap", "40MW", "--config", str(agent.config))
    agent.handler.refuse["curtail"] = ("stale", "issued too long ago")
    assert run("curtail", "--to", "1MW", "--config", str(agent.config)).exit_code == 1
    result = run("logs", "--config", str(agent.config))
    lines = result.stdout.splitlines()
    assert "cap_changed cap_kw=40000.0" in lines[0]
    assert "rejected verb=curtail code=stale" in lines[1]
    only = one_json(run("logs", "--type", "rejected", "--json", "--config", str(agent.config)).stdout)
    assert [e["type"] for e in only["events"]] == ["rejected"]
    assert agent.handler.calls[-1] == ("events", {"limit": 50})


def test_logs_follow_prints_only_new_events(agent: StandInAgent) -> None:
    run("cap", "40MW", "--config", str(agent.config))
    result = run("logs", "--follow", "--count", "2", "--interval", "0.1", "--config", str(agent.config))
    assert result.exit_code == 0
    assert result.stdout.count("cap_changed") == 1  # seen once, not once per poll


def test_the_installed_executable_keeps_stdout_to_one_json_document(agent: StandInAgent) -> None:
    done = subprocess.run(
        [HASHFLEX, "status", "--json", "--config", str(agent.config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert one_json(done.stdout)["site_id"] == "demo"


def test_the_installed_executable_without_an_agent(no_agent_config: Path) -> None:
    done = subprocess.run(
        [HASHFLEX, "curtail", "--to", "12MW", "--config", str(no_agent_config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert "no agent listening on" in done.stderr
    assert "systemctl status hashflex" in done.stderr


@pytest.mark.parametrize("as_json", [False, True])
def test_logs_journal_without_a_journal_says_so_and_exits_non_zero(as_json: bool, no_agent_config: Path) -> None:
    """--journal reads journald (no agent needed). Here there is no journal (no journald in a container), or the
    unit has never run: either way the answer is a sentence and exit 2, not an empty output and exit 0 (issue 16
    item 9)."""
    result = run("logs", "--journal", "-n", "5", "--config", str(no_agent_config), *(["--json"] if as_json else []))
    assert result.exit_code == 2, result.output
    assert "journal" in result.stderr
    assert "hashflex logs` without --journal" in result.stderr or "has not run as that systemd unit" in result.stderr
    if as_json:
        assert one_json(result.stdout)["status"] == "error"
    else:
        assert result.stdout == ""


# --------------------------------------------------------------------- tables at ordinary widths (issue 16 item 3)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
tty_80 = CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1", "TTY_COMPATIBLE": "1"})  # Rich sees a terminal
pipe_80 = CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1"})


def on_tty_80(*args: str) -> list[str]:
    result = tty_80.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.stdout).splitlines()


def row_of(lines: list[str], first_cell: str) -> list[str]:
    [row] = [line for line in lines if line.startswith(f"│ {first_cell} ")]
    return [cell.strip() for cell in row.strip("│").split("│")]


def test_miners_at_80_columns_keep_ip_state_and_power_whole(agent: StandInAgent) -> None:
    lines = on_tty_80("miners", "--config", str(agent.config))
    assert max(map(len, lines)) <= 80
    assert not any("…" in line for line in lines)  # nothing cut short: columns are left out instead
    header = [cell.strip() for cell in lines[1].strip("┃").split("┃")]
    assert header[:1] == ["ip"]
    assert {"state", "power"} <= set(header)
    for miner in MINERS:
        cells = dict(zip(header, row_of(lines, miner["ip"]), strict=True))
        assert cells["state"] == miner["state"]
        assert cells["power"] == watts(miner["power_w"])
    assert "--wide shows them" in lines[-1] or "--wide shows them" in lines[-2]
    wide = on_tty_80("miners", "--wide", "--config", str(agent.config))
    header = [cell.strip() for cell in wide[1].strip("┃").split("┃")]
    assert header == ["ip", "model", "firmware", "state", "power", "limit", "hashrate", "J/TH", "temp", "last seen"]
    assert not any("…" in line for line in wide)


def test_dispatches_at_80_columns_keep_level_and_status_and_show_what_binds(agent: StandInAgent) -> None:
    run("curtail", "--by", "3MW", "--config", str(agent.config))
    override = agent.handler.calls[-1][1]["id"]
    for lines in (
        on_tty_80("dispatches", "--config", str(agent.config)),
        on_tty_80("status", "--config", str(agent.config)),
    ):
        table = [line for line in lines if line[:1] in "┏┃┡│└"]
        assert max(map(len, table)) <= 80
        header = [cell.strip() for cell in table[1].strip("┃").split("┃")]
        cells = dict(zip(header, row_of(table, override), strict=True))
        # a reduction is listed as the level that binds, from the power it was taken from (issue 16 item 7)
        assert cells["level"] == "present − 3.00 MW → 38.20 MW"
        assert cells["status"] == "active"


def test_piped_output_is_never_wrapped_mid_phrase(agent: StandInAgent) -> None:
    reason = "grid link lost: no heartbeat for 90 s, the fail-safe level holds until a fresh grid command arrives"
    agent.handler.status.update(
        target_source="failsafe", failsafe={"active": True, "since": None, "reason": reason, "last_heartbeat": None}
    )
    result = pipe_80.invoke(app, ["status", "--config", str(agent.config)])
    assert result.exit_code == 0, result.output
    assert f"FAIL-SAFE holds it: {reason} (last heartbeat —)" in result.stdout.splitlines()[2]
    assert not any(line != line.rstrip() for line in result.stdout.splitlines())
    result = pipe_80.invoke(app, ["curtail", "--by", "3MW", "--config", str(agent.config)])
    [line] = result.stderr.splitlines()
    assert "holds the site at or under 38.20 MW (present − 3.00 MW) until `hashflex resume`" in line


def test_discover_table_at_80_columns_abbreviates_presets_and_keeps_ips() -> None:
    presets = Presets(tuple(range(1600, 3500, 160))[:12])
    found = [
        Identity(
            ip=f"10.20.{i}.{100 + i}",
            family=Family.LUXOS,
            make="AntMiner",
            model="S19j Pro",
            firmware="luxos 2024.8",
            driver_class="LUXMinerS19jPro",
            capability=presets,
            nominal_w=3250.0,
            nominal_ths=104.0,
            mac=f"aa:bb:cc:dd:ee:{i:02x}",
        )
        for i in range(3)
    ]
    stream = io.StringIO()
    console = Console(file=stream, width=80, force_terminal=True, no_color=True)
    print_table(
        console,
        discover.COLUMNS,
        discover.identity_rows(found),
        priority=discover.PRIORITY,
        right=["NOMINAL", "HASHRATE"],
    )
    lines = ANSI.sub("", stream.getvalue()).splitlines()
    assert max(map(len, lines)) <= 80
    for identity in found:
        cells = row_of(lines, identity.ip)
        assert "3.25 kW" in cells
        assert "12 presets 1.6–3.4 kW" in cells
    assert discover.identity_rows(found, wide=True)[0][4] == "presets " + "/".join(map(str, presets.watts)) + " W"


def test_curtail_add_is_sent_only_when_asked(agent: StandInAgent) -> None:
    """Issue 16 item 7: a new curtail replaces the override in force; `--add` asks the agent to keep both. The field
    is left out unless asked, so an agent that predates it sees the request it always did."""
    assert run("curtail", "--to", "20MW", "--config", str(agent.config)).exit_code == 0
    first = agent.handler.calls[-1][1]
    assert "add" not in first
    result = run("curtail", "--to", "30MW", "--config", str(agent.config))
    assert f"holds the site at or under 30.00 MW until `hashflex resume`; it replaces override(s) {first['id']}" in (
        result.stderr
    )
    result = run("curtail", "--to", "25MW", "--add", "--config", str(agent.config))
    assert result.exit_code == 0
    assert agent.handler.calls[-1][1]["add"] is True
    assert "replaces" not in result.stderr
