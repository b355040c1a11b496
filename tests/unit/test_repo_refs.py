"""What ships in the repository points only at the repository: a comment or docstring that names a file elsewhere
(a helper's notes, a path on the machine the code was written on) is a dead end for every reader (issue 16 item 13:
drivers/pyasic_driver.py cited /work/shared/PYASIC-NOTES.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("agent", "drivers", "sim", "tests", "scripts", "docs", "configs", "systemd")
OUTSIDE = re.compile(r"/work/|PYASIC-NOTES|\.\./shared/|/home/\w+/")


@pytest.mark.parametrize("package", SHIPPED)
def test_shipped_code_cites_no_file_outside_the_repository(package: str) -> None:
    files = sorted(
        p
        for p in (ROOT / package).rglob("*")
        if p.is_file()
        and p.suffix in (".py", ".md", ".sh", ".yaml", ".service", ".conf")
        and p.name != "test_repo_refs.py"
    )
    assert files
    cited = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in files
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert cited == []
