"""The project installs as one import package (issue 16 item 12): a wheel holds `hashflex/…` and nothing else at
its top, so an installed hashflex claims one name in site-packages, and the `python -m` entry points run from it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("agent", "drivers", "sim", "coordinator", "contract")


def test_the_wheel_claims_only_hashflex_and_runs_from_outside_the_checkout(tmp_path: Path) -> None:
    had_build = (ROOT / "build").exists()  # setuptools builds in the tree: leave the checkout as it was
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if not had_build:
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("hashflex-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path / "site")
    assert {n.split("/")[0] for n in names} == {"hashflex", wheel.name.split("-py3")[0] + ".dist-info"}
    # every module of every folder is in the wheel, under hashflex/ (the symlinks were followed, not copied as links)
    shipped = {n for n in names if n.endswith(".py")}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                assert f"hashflex/{path.relative_to(ROOT).as_posix()}" in shipped, path
    assert "hashflex/py.typed" in names

    # run from the unpacked wheel, far from the checkout: nothing may come from the repository's folders
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}
    probe = "import hashflex.agent.cli.main as m, hashflex.sim.cli as s; print(m.__file__); print(s.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert all(line.startswith(str(tmp_path / "site")) for line in out.stdout.split()), out.stdout
    for module in ("hashflex", "hashflex.sim"):
        run = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "usage" in run.stdout.lower(), run.stdout
