"""File-system faults for the store tests: a small tmpfs the test mounts (root only, as in CI here), filled on
demand, and a second process holding SQLite's write lock on a database."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    """A fresh tmpfs of `size` mounted at `path` for the block; unmounted after (lazily if still busy)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill(folder: Path, name: str = "ballast") -> Path:
    """Fill the file system of `folder` to the last byte; returns the ballast file (delete it to free space)."""
    ballast = folder / name
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        chunk = b"\0" * 65536
        while True:
            try:
                os.write(fd, chunk)
            except OSError:
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)
    return ballast


_LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
if sys.argv[2] == "exclusive":
    db.execute("PRAGMA locking_mode = EXCLUSIVE")
db.execute("BEGIN EXCLUSIVE")
db.execute("CREATE TABLE IF NOT EXISTS locker_probe (x)")
print("locked", flush=True)
sys.stdin.read()  # until the parent closes our stdin
db.execute("ROLLBACK")
"""


@contextlib.contextmanager
def locked(db: Path, mode: str = "write") -> Iterator[subprocess.Popen[str]]:
    """Another process holds the database's write lock (`mode="exclusive"`: no reader either) for the block."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOCKER, str(db), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "locked", f"the locker did not get the lock: {line!r}"
        yield proc
    finally:
        with contextlib.suppress(Exception):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
