"""A safe start that is pending, remembered outside the database (in a marker file next to it), because the
database is what failed."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hashflex.agent.io.store.database import fsync_dir

SAFE_START_MARKER = "safe-start.pending"


def remember_safe_start(state_dir: Path, reason: str, ts: float) -> None:
    """Remember, outside the database, that the agent must start safe until an operator resumes: the database
    that would hold it is the thing that failed. Written atomically (a temporary file, fsync, rename, fsync of the
    directory), so a crash leaves the old marker or the new one, never half of one."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=f".{SAFE_START_MARKER}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"reason": reason, "ts": ts}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, state_dir / SAFE_START_MARKER)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(state_dir)


def pending_safe_start(state_dir: Path) -> str | None:
    """Why the agent must start safe, if a marker says so (an unreadable marker still means: start safe)."""
    path = state_dir / SAFE_START_MARKER
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"a safe start is pending ({path} cannot be read: {exc.strerror})"
    try:
        reason = json.loads(text).get("reason")
    except (ValueError, AttributeError):
        reason = None
    return str(reason) if reason else f"a safe start is pending ({path})"


def clear_safe_start(state_dir: Path) -> None:
    """An operator resumed: the next start is a normal one."""
    (state_dir / SAFE_START_MARKER).unlink(missing_ok=True)
    fsync_dir(state_dir)
