"""The systemd unit: `systemd-analyze verify` passes (and fails on a broken unit), the sandbox scores well, the
sysusers entry parses, the repo's files match what `install-service` writes, and install-service itself."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from hashflex.agent.cli.main import app
from hashflex.agent.config import load_config
from hashflex.agent.service_files import (
    DYNAMIC_USER_DROPIN,
    SYSUSERS,
    render_example_config,
    render_unit,
)

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]
HASHFLEX = str(Path(sys.executable).parent / "hashflex")  # the installed venv's executable: it must exist for verify
runner = CliRunner(env={"COLUMNS": "200"})


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )


def test_repo_files_are_the_rendered_defaults() -> None:
    assert (REPO / "systemd/hashflex.service").read_text() == render_unit()
    assert (REPO / "systemd/hashflex.sysusers").read_text() == SYSUSERS
    assert (REPO / "systemd/hashflex.service.d/dynamicuser.conf").read_text() == DYNAMIC_USER_DROPIN
    assert (REPO / "systemd/site.yaml.example").read_text() == render_example_config()


def test_systemd_analyze_verify_passes_cleanly(tmp_path: Path) -> None:
    unit = tmp_path / "hashflex.service"
    unit.write_text(render_unit(HASHFLEX, "/etc/hashflex/site.yaml"))
    done = verify(unit)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
    assert done.stderr.strip() == ""


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a missing executable and an unknown key are reported."""
    unit = tmp_path / "hashflex.service"
    text = render_unit("/nonexistent/bin/hashflex", "/etc/hashflex/site.yaml").replace(
        "Type=notify", "Type=notify\nWatchdogSeconds=30"
    )
    unit.write_text(text)
    done = verify(unit)
    assert done.returncode != 0
    assert "/nonexistent/bin/hashflex is not executable" in done.stderr
    assert "Unknown key 'WatchdogSeconds'" in done.stderr


def test_sandbox_exposure_is_low(tmp_path: Path) -> None:
    unit = tmp_path / "hashflex.service"
    unit.write_text(render_unit(HASHFLEX))
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Invalid" not in done.stderr
    assert "ignoring" not in done.stderr
    level = float(re.search(r"Overall exposure level for hashflex.service: ([\d.]+)", done.stdout).group(1))  # type: ignore[union-attr]
    assert level <= 2.0, done.stdout


def test_unit_has_the_settings_the_agent_relies_on() -> None:
    lines = set(render_unit().splitlines())
    for required in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30s",
        "Restart=on-failure",
        "User=hashflex",
        "Group=hashflex",
        "RuntimeDirectory=hashflex",
        "StateDirectory=hashflex",
        "ConfigurationDirectory=hashflex",
        "ExecStartPre=/opt/hashflex/bin/hashflex config check --config /etc/hashflex/site.yaml",
        "ExecStart=/opt/hashflex/bin/hashflex run --config /etc/hashflex/site.yaml",
        "LoadCredential=mqtt-password:/etc/hashflex/credentials/mqtt-password",
        "LoadCredential=miners.yaml:/etc/hashflex/credentials/miners.yaml",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "LimitNOFILE=65536",
    ):
        assert required in lines, required
    assert not any(line.startswith("ProcSubset=") for line in lines)  # gateway health reads /proc/meminfo


def test_render_refuses_relative_or_spaced_paths() -> None:
    with pytest.raises(ValueError, match="absolute path"):
        render_unit("hashflex")
    with pytest.raises(ValueError, match="without spaces"):
        render_unit("/opt/my hashflex/bin/hashflex")


def test_sysusers_entry_parses(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    args = ["systemd-sysusers", f"--root={tmp_path}", "--dry-run", str(REPO / "systemd/hashflex.sysusers")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "Creating user 'hashflex'" in done.stdout + done.stderr


def test_example_config_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(render_example_config(str(path)))
    cfg = load_config(path)
    assert cfg.site.id == "my-site"
    assert str(cfg.socket_path) == "/run/hashflex/control.sock"


# ------------------------------------------------------------------------------------------ install-service
def install(root: Path, *extra: str) -> Result:
    return runner.invoke(app, ["install-service", "--root", str(root), "--bin", HASHFLEX, *extra])


def test_install_service_into_a_root(tmp_path: Path) -> None:
    result = install(tmp_path, "--dynamic-user")
    assert result.exit_code == 0, result.output
    unit = tmp_path / "etc/systemd/system/hashflex.service"
    assert unit.read_text() == render_unit(HASHFLEX, "/etc/hashflex/site.yaml")
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert (tmp_path / "etc/sysusers.d/hashflex.conf").read_text() == SYSUSERS
    assert (tmp_path / "etc/systemd/system/hashflex.service.d/dynamicuser.conf").read_text() == DYNAMIC_USER_DROPIN
    assert load_config(tmp_path / "etc/hashflex/site.yaml").site.id == "my-site"
    assert stat.S_IMODE((tmp_path / "etc/hashflex/credentials").stat().st_mode) == 0o700
    assert (tmp_path / "etc/hashflex/keys").is_dir()
    out = result.stdout
    assert "Next steps:" in out
    assert "systemd-sysusers" in out
    assert "systemctl enable --now hashflex" in out
    assert "usermod -aG hashflex" in out
    done = verify(unit)  # the installed unit, with its drop-in next to it
    assert done.returncode == 0, done.stderr


def test_install_service_is_idempotent_and_keeps_an_existing_config(tmp_path: Path) -> None:
    assert install(tmp_path).exit_code == 0
    site = tmp_path / "etc/hashflex/site.yaml"
    site.write_text("site: {id: real-site, cap_kw: 1000}\nmqtt: {enabled: false}\n")
    result = install(tmp_path, "--json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    actions = {f["path"]: f["action"] for f in doc["files"]}
    assert actions["/etc/systemd/system/hashflex.service"] == "unchanged"
    assert actions["/etc/hashflex/site.yaml"] == "kept"
    assert actions["/etc/hashflex/site.yaml.example"] == "written"
    assert site.read_text().startswith("site: {id: real-site")
    assert doc["bin"] == HASHFLEX
    assert doc["next_steps"][0].startswith("copy the staged tree")


def test_install_service_will_not_clobber_an_edited_unit_without_force(tmp_path: Path) -> None:
    assert install(tmp_path).exit_code == 0
    unit = tmp_path / "etc/systemd/system/hashflex.service"
    unit.write_text(unit.read_text() + "# local edit\n")
    result = install(tmp_path)
    assert result.exit_code == 1
    assert "exists and differs" in result.stderr
    assert "--force" in result.stderr
    assert unit.read_text().endswith("# local edit\n")
    assert install(tmp_path, "--force").exit_code == 0
    assert unit.read_text() == render_unit(HASHFLEX, "/etc/hashflex/site.yaml")


def test_install_service_custom_paths(tmp_path: Path) -> None:
    result = install(
        tmp_path,
        "--config-path",
        "/srv/hashflex/site.yaml",
        "--unit-dir",
        "/usr/lib/systemd/system",
        "--sysusers-dir",
        "/usr/lib/sysusers.d",
    )
    assert result.exit_code == 0
    unit = (tmp_path / "usr/lib/systemd/system/hashflex.service").read_text()
    assert f"ExecStart={HASHFLEX} run --config /srv/hashflex/site.yaml" in unit
    assert (tmp_path / "usr/lib/sysusers.d/hashflex.conf").exists()
    assert (tmp_path / "srv/hashflex/site.yaml").exists()


def test_install_service_refuses_a_bin_path_with_spaces(tmp_path: Path) -> None:
    result = runner.invoke(app, ["install-service", "--root", str(tmp_path), "--bin", "/opt/a b/hashflex"])
    assert result.exit_code == 1
    assert "without spaces" in result.stderr
    assert not (tmp_path / "etc").exists()
