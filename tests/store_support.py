"""Shared by the store tests: a site config pointing at a state directory, and the CLI runner."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner, Result

from hashflex.agent.cli.main import app


def write_config(tmp_path: Path, *, signing_key: Path | None = None) -> Path:
    state = tmp_path / "state"
    lines = [
        "site: {id: audit-site, cap_kw: 5000}",
        "mqtt: {enabled: false}",
        f"state_dir: {state}",
    ]
    if signing_key is not None:
        lines.append(f"audit: {{sign_daily_head: true, signing_key: {signing_key}}}")
    path = tmp_path / "site.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def hashflex(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)
