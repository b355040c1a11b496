"""`hashflex install-service`: put the systemd unit, the sysusers entry and an example config in place.

Writes under --root (default `/`; a temporary folder for tests and packaging) and runs nothing itself: it
prints the commands that finish the job (create the user, reload systemd, enable). An existing site config is
never overwritten (the example goes next to it as site.yaml.example); an existing unit that differs is only
replaced with --force.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from hashflex.agent.cli.common import EXIT_REFUSED, JsonOpt, emit_json, err, fail, out
from hashflex.agent.service_files import (
    DEFAULT_CONFIG,
    DYNAMIC_USER_DROPIN,
    SYSUSERS,
    UNIT_NAME,
    render_example_config,
    render_unit,
)


def installed_hashflex() -> str:
    """The hashflex executable of this installation (a venv's bin/, or on PATH)."""
    beside = Path(sys.executable).parent / "hashflex"
    if beside.exists():
        return str(beside)
    found = shutil.which("hashflex")
    return str(Path(found).absolute()) if found else str(beside)


@dataclass
class Written:
    path: Path  # where on the target system (without --root)
    action: str  # written | unchanged | kept | replaced


def _place(
    root: Path, target: str, text: str, *, mode: int, force: bool, written: list[Written], as_json: bool
) -> None:
    dest = root / target.lstrip("/")
    if dest.exists():
        if dest.read_text() == text:
            written.append(Written(Path(target), "unchanged"))
            return
        if not force:
            fail(
                f"{dest} exists and differs: compare it, then use --force to replace it", EXIT_REFUSED, as_json=as_json
            )
        action = "replaced"
    else:
        action = "written"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, dest)
    written.append(Written(Path(target), action))


def install_service(
    *,
    root: Annotated[Path, typer.Option("--root", help="Install under this folder (packaging, tests).")] = Path("/"),
    bin_path: Annotated[
        str | None, typer.Option("--bin", help="hashflex executable for ExecStart= (default: this one).")
    ] = None,
    config_path: Annotated[str, typer.Option("--config-path", help="Config file the unit runs with.")] = DEFAULT_CONFIG,
    unit_dir: Annotated[str, typer.Option("--unit-dir", help="Folder for the unit.")] = "/etc/systemd/system",
    sysusers_dir: Annotated[str, typer.Option("--sysusers-dir", help="Folder for sysusers.d.")] = "/etc/sysusers.d",
    dynamic_user: Annotated[
        bool, typer.Option("--dynamic-user", help="Also install the DynamicUser=yes drop-in (demo gateways).")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a unit or sysusers file that differs.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Install the systemd unit, sysusers entry and an example config; print the steps that remain."""
    exe = bin_path or installed_hashflex()
    try:
        unit = render_unit(exe, config_path)
    except ValueError as exc:
        fail(str(exc), as_json=as_json)
    if root == Path("/") and os.geteuid() != 0:
        fail("installing into / needs root: run it with sudo (or pass --root DIR to stage the files)", as_json=as_json)
    written: list[Written] = []
    _place(root, f"{unit_dir}/{UNIT_NAME}", unit, mode=0o644, force=force, written=written, as_json=as_json)
    _place(root, f"{sysusers_dir}/hashflex.conf", SYSUSERS, mode=0o644, force=force, written=written, as_json=as_json)
    if dynamic_user:
        _place(
            root,
            f"{unit_dir}/{UNIT_NAME}.d/dynamicuser.conf",
            DYNAMIC_USER_DROPIN,
            mode=0o644,
            force=force,
            written=written,
            as_json=as_json,
        )
    config_dir = Path(config_path).parent
    example = render_example_config(config_path)
    config_dest = root / config_path.lstrip("/")
    if config_dest.exists():
        written.append(Written(Path(config_path), "kept"))
        _place(root, f"{config_path}.example", example, mode=0o644, force=True, written=written, as_json=as_json)
    else:
        _place(root, config_path, example, mode=0o644, force=False, written=written, as_json=as_json)
    for folder, mode in ((config_dir / "credentials", 0o700), (config_dir / "keys", 0o755)):
        dest = root / str(folder).lstrip("/")
        dest.mkdir(parents=True, exist_ok=True)
        os.chmod(dest, mode)
    steps = next_steps(config_path, exe, staged=root != Path("/"))
    if as_json:
        emit_json(
            {
                "root": str(root),
                "bin": exe,
                "files": [{"path": str(w.path), "action": w.action} for w in written],
                "next_steps": steps,
            }
        )
        return
    for w in written:
        err.print(f"{w.action:>9}  {root / str(w.path).lstrip('/')}", highlight=False)
    out.print("\nNext steps:", highlight=False)
    for i, step in enumerate(steps, 1):
        out.print(f"  {i}. {step}", markup=False, highlight=False)


def next_steps(config_path: str, exe: str, *, staged: bool) -> list[str]:
    config_dir = Path(config_path).parent
    steps = [
        "create the user and group: `systemd-sysusers`",
        f"edit {config_path}: site id, cap_kw, miner addresses, broker",
        f"put the grid operator's public key at {config_dir}/keys/grid.pub; secrets go in "
        f"{config_dir}/credentials/ (mqtt-password, miners.yaml), root-only",
        f"check it: `{exe} config check --config {config_path}`",
        "start it: `systemctl daemon-reload && systemctl enable --now hashflex`",
        "let operators use the CLI without sudo: `usermod -aG hashflex USER` (then log in again)",
        "see it: `hashflex status` · logs: `hashflex logs` or `journalctl -u hashflex -f`",
    ]
    if staged:
        steps.insert(0, "copy the staged tree onto the gateway (or package it), then on the gateway:")
    return steps


def register(app: typer.Typer) -> None:
    app.command("install-service")(install_service)
