"""Every ```sh block of README.md and docs/*.md, run or checked, so the documents cannot drift (issue 16, item 6).

Blocks that can run here run, in the order a reader meets them, with `hashflex` taken from PATH (where
`scripts/setup.sh` leaves it), in the folder of a site config that is the README's own "essentials" block (its
miner addresses pointed at a simulated site, its broker port at a throwaway Mosquitto, its metrics port free):
  - before the agent starts: the grid key pair the config lists (`hashflex keygen`);
  - with the agent running (`hashflex run`, a subprocess): the MQTT signing example (its reply is waited for)
    and the everyday commands of docs/operations.md.
Blocks that cannot run here are only checked: `bash -n`, and every `hashflex <verb> --option` in them exists in
the CLI's command tree. Which ones, and why, is CHECK_ONLY below. A new block in a document fails the test until it
is listed in one of the tables: nothing documented goes unexercised by accident.

Loopback range of this file: 127.92.0.0 - 127.92.255.255.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hashflex.agent.cli.main import app
from hashflex.agent.config import load_config
from hashflex.sim.testing import SimProcess
from tests.agent_harness import ROOT, AgentConfigFiles, AgentProcess
from tests.broker import Mosquitto

pytestmark = pytest.mark.timeout(180)

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent  # where scripts/setup.sh installs `hashflex` (.venv/bin)

# first command line of a block -> why it is only checked
CHECK_ONLY: dict[str, str] = {
    "scripts/demo.sh": "the demo (~2 min) and the whole suite (~15 min); tests/integration/test_demo.py runs the demo",
    "hashflex discover 10.20.0.0/22": "installs and starts a systemd unit on this machine (install-service, "
    "systemctl) and scans a real network",
    "sudo hashflex install-service": "installs a systemd unit, a system user and /etc/hashflex on this machine",
}
BEFORE_AGENT = {"mkdir -p keys && hashflex keygen --out keys/grid"}  # the key the config lists: made before start
# first command line -> what its output must show (waited for: background jobs print after the block returns)
WITH_AGENT: dict[str, str] = {
    "mosquitto_sub -h 127.0.0.1 -p 1883 -t 'hashflex/demo/reply/#' -v &": (
        r'hashflex/demo/reply/dispatch \{.*"status": ?"ok"'
    ),
    "hashflex config check": r"",
}


@dataclass(frozen=True)
class Block:
    doc: str  # README.md, docs/operations.md
    line: int
    text: str

    @property
    def first(self) -> str:
        """The first command line, without its comment: the block's name in the tables above."""
        for raw in self.text.splitlines():
            line = raw.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                return line
        return ""

    def __str__(self) -> str:
        return f"{self.doc}:{self.line} ({self.first})"


def sh_blocks() -> list[Block]:
    blocks = []
    for path in DOCS:
        text = path.read_text()
        for match in re.finditer(r"^```sh\n(.*?)^```", text, flags=re.M | re.S):
            line = text.count("\n", 0, match.start()) + 2
            blocks.append(Block(str(path.relative_to(ROOT)), line, match.group(1)))
    return blocks


BLOCKS = sh_blocks()


# ------------------------------------------------------------------------------------ the CLI's command tree
def hashflex_invocations(text: str) -> list[list[str]]:
    """The arguments of every `hashflex …` in command position (after `sudo`, `|`, `&&`, …), per shell line."""
    found: list[list[str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
        at_start = True
        current: list[str] | None = None
        for token in tokens:
            if set(token) <= set(";&|()<>"):
                at_start, current = True, None
                continue
            if current is not None:
                current.append(token)
            elif at_start:
                if token in ("sudo", "exec") or re.fullmatch(r"[A-Za-z_]+=.*", token):
                    continue
                at_start = False
                if Path(token).name == "hashflex":
                    current = []
                    found.append(current)
    return found


def unknown_in(args: list[str]) -> str | None:
    """What in `hashflex ARGS` the CLI does not have (a verb or an option), else None."""
    command: Any = typer.main.get_command(app)  # a click group (typer vendors click: duck-typed here)
    words = list(args)
    path = ["hashflex"]
    while hasattr(command, "commands") and words and not words[0].startswith("-"):
        sub = command.commands.get(words[0])
        if sub is None:
            return f"`{' '.join(path)} {words[0]}`: no such command"
        path.append(words.pop(0))
        command = sub
    known = {"--help"} | {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    for word in words:
        if word.startswith("-") and len(word) > 1 and not re.fullmatch(r"-\d.*", word):
            name = word.split("=", 1)[0]
            if name not in known:
                return f"`{' '.join(path)}` has no option {name} (it has {', '.join(sorted(known))})"
    return None


def test_the_checker_finds_a_wrong_verb_or_option() -> None:
    """The checks below can fail: a misspelt verb or option in a block is caught, wherever it sits."""
    text = "sudo hashflex install-servic\nX=1 hashflex curtail --to 5kW --untill 2h | tee x\nsystemctl start hashflex\n"
    invocations = hashflex_invocations(text)
    assert invocations == [["install-servic"], ["curtail", "--to", "5kW", "--untill", "2h"]]
    assert "no such command" in (unknown_in(invocations[0]) or "")
    assert "has no option --untill" in (unknown_in(invocations[1]) or "")
    assert unknown_in(["config", "check", "--config", "x.yaml"]) is None


def test_every_block_is_run_or_checked_for_a_stated_reason() -> None:
    assert len(BLOCKS) >= 6, BLOCKS
    named = set(CHECK_ONLY) | BEFORE_AGENT | set(WITH_AGENT)
    unlisted = [str(b) for b in BLOCKS if b.first not in named]
    assert not unlisted, f"new command blocks: list each in CHECK_ONLY (why), BEFORE_AGENT or WITH_AGENT: {unlisted}"
    gone = named - {b.first for b in BLOCKS}
    assert not gone, f"listed blocks no longer in the documents: {gone}"


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_every_block_parses_and_names_only_commands_and_options_that_exist(block: Block) -> None:
    syntax = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True, check=False)
    assert syntax.returncode == 0, f"{block}: {syntax.stderr}"
    invocations = hashflex_invocations(block.text)
    for args in invocations:
        problem = unknown_in(args)
        assert problem is None, f"{block}: {problem}"


# ------------------------------------------------------------------------------------ running them
@dataclass
class DocSite:
    folder: Path
    config: Path
    broker: Mosquitto
    env: dict[str, str]


def readers_config(sim_ips: list[str], broker_port: int) -> str:
    """The README's essentials block, pointed at the simulated site and the test's broker."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^```yaml\n(site: \{id: demo.*?)^```", text, flags=re.M | re.S)
    assert match, "README.md has no essentials config block (```yaml starting `site: {id: demo`)"
    doc = yaml.safe_load(match.group(1))
    assert doc["grid"]["public_keys"] == ["keys/grid.pub"], "the MQTT example signs with keys/grid"
    doc["miners"]["addresses"] = [f"{sim_ips[0]}-{sim_ips[-1]}"]
    doc["mqtt"]["port"] = broker_port
    doc["metrics"] = {"port": 0}  # the default 9708 may be taken on a shared machine
    return yaml.safe_dump(doc, sort_keys=False)


def run_block(block: Block, site: DocSite, expect: str = "") -> str:
    text = block.text.replace("-p 1883", f"-p {site.broker.plain_port}")
    out = site.folder / f"block-{block.line}.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", "-c", text],
            cwd=site.folder,
            env=site.env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(60)
            deadline = time.monotonic() + 20
            while expect and not re.search(expect, out.read_text()) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            with contextlib.suppress(ProcessLookupError):  # background jobs of the block (mosquitto_sub &)
                os.killpg(proc.pid, signal.SIGTERM)
    output = out.read_text()
    assert code == 0, f"{block} exited {code}:\n{output}"
    if expect:
        assert re.search(expect, output), f"{block}: no {expect!r} in:\n{output}"
    return output


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DocSite]:
    base = tmp_path_factory.mktemp("docs")
    folder = base / "site"
    folder.mkdir()
    with SimProcess(miners=6, base_ip="127.92.0.1") as sim, Mosquitto(base / "broker") as broker:
        config = folder / "site.yaml"
        config.write_text(readers_config(sim.ips, broker.plain_port))
        env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "HASHFLEX_CONFIG": str(config),
            "COLUMNS": "120",
            "NO_COLOR": "1",
        }
        yield DocSite(folder, config, broker, env)


def test_the_documented_blocks_run_against_a_simulated_site(site: DocSite) -> None:
    for block in BLOCKS:
        if block.first in BEFORE_AGENT:
            run_block(block, site)
    cfg = load_config(site.config)
    assert cfg.mqtt.enabled
    assert cfg.site.id == "demo"
    files = AgentConfigFiles(site.config, cfg.state_path, cfg.socket_path, Ed25519PrivateKey.generate())
    with AgentProcess.start(files) as agent:
        for block in BLOCKS:
            if block.first in WITH_AGENT:
                run_block(block, site, WITH_AGENT[block.first])
        dispatched = [d for d in agent.status()["dispatches"] if d.get("target_kw") == 600]
        assert dispatched, "the README's signed dispatch was not applied"


def test_setup_leaves_hashflex_on_path(tmp_path: Path) -> None:
    """What scripts/setup.sh ends with: `hashflex` on PATH in a new shell (here a bin folder of the test's)."""
    assert "scripts/link-cli.sh" in (ROOT / "scripts/setup.sh").read_text()
    env = {**os.environ, "HASHFLEX_BIN_DIR": str(tmp_path)}
    for _ in range(2):  # idempotent
        subprocess.run([str(ROOT / "scripts/link-cli.sh")], env=env, check=True, capture_output=True)
    assert (tmp_path / "hashflex").resolve() == (ROOT / ".venv/bin/hashflex").resolve()
    shell = subprocess.run(
        ["bash", "-c", "hashflex version"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"},
    )
    assert shell.returncode == 0, shell.stderr
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "hashflex").write_text("#!/bin/sh\n")  # a packaged hashflex: never replaced
    note = subprocess.run(
        [str(ROOT / "scripts/link-cli.sh")],
        env={**env, "HASHFLEX_BIN_DIR": str(other)},
        check=True,
        capture_output=True,
        text=True,
    )
    assert not (other / "hashflex").is_symlink()
    assert "left alone" in note.stderr
    # another clone's live CLI (a CI clone) is not taken over; once that clone is gone its dangling link is
    third, gone = tmp_path / "third", tmp_path / "gone-clone-hashflex"
    third.mkdir()
    gone.write_text("#!/bin/sh\n")
    (third / "hashflex").symlink_to(gone)
    subprocess.run(
        [str(ROOT / "scripts/link-cli.sh")],
        env={**env, "HASHFLEX_BIN_DIR": str(third)},
        check=True,
        capture_output=True,
    )
    assert (third / "hashflex").resolve() == gone.resolve()
    gone.unlink()
    subprocess.run(
        [str(ROOT / "scripts/link-cli.sh")],
        env={**env, "HASHFLEX_BIN_DIR": str(third)},
        check=True,
        capture_output=True,
    )
    assert (third / "hashflex").resolve() == (ROOT / ".venv/bin/hashflex").resolve()


def test_shipped_configs_agree_on_the_socket_and_its_group() -> None:
    """The example, the file install-service writes, the unit and the docs name one socket, and no group the unit
    cannot give it."""
    example = yaml.safe_load((ROOT / "configs/agent.example.yaml").read_text())
    installed = yaml.safe_load((ROOT / "systemd/site.yaml.example").read_text())
    unit = (ROOT / "systemd/hashflex.service").read_text()
    documented = "/run/hashflex/control.sock"
    assert example["control_socket"] == {"path": documented}
    assert installed["control_socket"] == {"path": documented}
    assert "RuntimeDirectory=hashflex\n" in unit
    assert "leave control_socket.group unset" in unit
    for doc in ("README.md", "docs/operations.md"):
        text = (ROOT / doc).read_text()
        assert documented in text, doc
        assert "systemd/site.yaml.example" in text, f"{doc} does not say what install-service writes"
