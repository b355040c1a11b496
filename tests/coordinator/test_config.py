"""The program config (`coordinator.config`), `hashflex coordinator check` and the coordinator's systemd unit.

Every refusal is one line naming the file, the field and the value; the example config validates (with real key
files made beside it); the unit passes `systemd-analyze verify` as the agent's does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from hashflex.agent.cli.main import app
from hashflex.contract.signing import generate_keypair
from hashflex.coordinator.config import ConfigError, load

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs/program.example.yaml"
UNIT = REPO / "systemd/hashflex-coordinator.service"
HASHFLEX = str(Path(sys.executable).parent / "hashflex")
runner = CliRunner(env={"COLUMNS": "200"})


def example_dir(tmp_path: Path) -> Path:
    """The example config copied into `tmp_path`, with the key files it names made there."""
    shutil.copy(EXAMPLE, tmp_path / "program.yaml")
    (tmp_path / "keys").mkdir()
    for name in ("coordinator", "grid"):
        private, public = generate_keypair()
        (tmp_path / "keys" / name).write_bytes(private)
        (tmp_path / "keys" / f"{name}.pub").write_bytes(public)
    return tmp_path / "program.yaml"


def edited(tmp_path: Path, change: Any) -> Path:
    path = example_dir(tmp_path)
    data = yaml.safe_load(path.read_text())
    change(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    return bad


def test_the_example_maps_onto_the_service_config(tmp_path: Path) -> None:
    cfg, service = load(example_dir(tmp_path))
    assert cfg.program_id == service.program_id == "pk-mining"
    assert [(s.site_id, s.cap_w) for s in service.sites] == [
        ("lhr-07", 30_000_000.0),
        ("mul-02", 25_000_000.0),
        ("khi-11", 18_000_000.0),
    ]
    assert service.sites[1].limits.min_keep_share == 0.2
    assert service.sites[2].limits.excluded
    assert len(service.grid_keys) == 1
    assert cfg.brokers[0] == ("nats-1.example", 1883)
    assert cfg.lease.to_lease().replicas == 3
    assert service.rules.stale_after_s == 90.0


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.update(bogus=1), "bogus: unknown key"),
        (lambda d: d["sites"][0].update(cpa_kw=3), "sites[0].cpa_kw: unknown key, did you mean 'cap_kw'?"),
        (lambda d: d["sites"][1].update(cap_kw=float("inf")), "sites[1].cap_kw = inf: Input should be a finite"),
        (lambda d: d["rules"].update(grace_s=float("nan")), "rules.grace_s = nan: Input should be a finite"),
        (lambda d: d["lease"].update(ttl_s=1e400), "lease.ttl_s = inf: Input should be a finite"),
        (lambda d: d.update(step_s="5"), "step_s = '5': Input should be a valid number"),
        (lambda d: d["fabric"].update(brokers=["nats-1"]), "fabric.brokers = ['nats-1']: must be host:port"),
        (lambda d: d["sites"][2].update(id="lhr-07"), "sites: site id 'lhr-07' is listed twice"),
        (lambda d: d.pop("grid_public_keys"), "grid_public_keys: required field is missing"),
        (lambda d: d["lease"].update(ttl_s=1, renew_every_s=0.9), "lease: renew_every_s (0.9)"),
    ],
)
def test_a_bad_config_is_one_line_naming_the_field(tmp_path: Path, change: Any, expected: str) -> None:
    bad = edited(tmp_path, change)
    with pytest.raises(ConfigError) as caught:
        load(bad)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{bad}: {expected}"), message


def test_a_missing_key_file_names_the_field_and_the_path(tmp_path: Path) -> None:
    bad = edited(tmp_path, lambda d: d.update(signing_key="keys/nope"))
    with pytest.raises(ConfigError) as caught:
        load(bad)
    assert str(caught.value) == f"{bad.resolve()}: signing_key = '{tmp_path.resolve() / 'keys/nope'}': no such file"
    (tmp_path / "keys/grid.pub").write_text("not a key")
    with pytest.raises(ConfigError, match=r"grid_public_keys\[0\] = '.*grid.pub': not an Ed25519 public key"):
        load(tmp_path / "program.yaml")


def test_coordinator_check_exits_0_on_the_example_and_2_with_the_error(tmp_path: Path) -> None:
    good = example_dir(tmp_path)
    done = runner.invoke(app, ["coordinator", "check", "--config", str(good)])
    assert done.exit_code == 0, done.output
    assert "config OK" in done.output
    assert "program pk-mining, 3 site(s), 73.00 MW of caps" in done.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("cap_kw: 30000", "cap_kw: .nan"))
    done = runner.invoke(app, ["coordinator", "check", "--config", str(bad)])
    assert done.exit_code == 2
    assert done.output.strip() == f"config error: {bad}: sites[0].cap_kw = nan: Input should be a finite number"


def test_hashflex_run_does_not_load_the_coordinator() -> None:
    code = (
        "import sys, hashflex.agent.cli.main\n"
        "print(sorted(m for m in sys.modules if 'coordinator' in m or m.split('.')[0] == 'nats'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "['hashflex.agent.cli.coordinator']"


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "ExecStart=/opt/hashflex/bin/hashflex coordinator run --config /etc/hashflex/program.yaml" in text
    assert "ExecStartPre=/opt/hashflex/bin/hashflex coordinator check --config /etc/hashflex/program.yaml" in text
    unit = tmp_path / "hashflex-coordinator.service"
    unit.write_text(text.replace("/opt/hashflex/bin/hashflex", HASHFLEX))  # verify needs the binary to exist
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert security.returncode == 0, security.stdout + security.stderr
    assert "Overall exposure level for hashflex-coordinator.service: 1." in security.stdout, security.stdout
