"""Crash safety of the store itself: a writer killed with SIGKILL at random moments (mid-transaction, mid-checkpoint,
mid-creation) leaves a database that opens clean, holds every transaction it acknowledged, holds no half of any
transaction, and whose audit chain verifies."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hashflex.agent.io.store import Store, verify_database

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000


class Writer:
    def __init__(self, db: Path, miners: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.store_writer_proc", str(db), str(miners)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def acked(self) -> int:
        """The last n the writer printed (its transaction had returned), or -1."""
        numbers = [int(x) for x in self.lines if x.isdigit()]
        return numbers[-1] if numbers else -1

    def wait_for(self, predicate_n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.acked() < predicate_n:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"writer exited {self.proc.returncode}: {err}")
            if time.monotonic() > deadline:
                raise AssertionError(f"writer reached only {self.acked()}")
            time.sleep(0.002)

    def kill(self) -> int:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        return self.acked()


def check_consistent(db: Path, acked: int, miners: int) -> int:
    """Open as the agent would and check every invariant of the writer's transactions; returns the stored n."""
    with Store.open(db) as store:  # raises StoreCorrupt on damage
        n = int(store.get_state("n", 0))
        assert n >= acked, f"acknowledged transaction {acked} lost (store holds {n})"
        assert n <= acked + 1, f"store holds {n}, beyond the one transaction in flight after {acked}"
        # all or nothing: every part of transaction n is there, nothing of n + 1
        assert store.audit_head()[0] == n
        assert (store.get_reply(f"cmd-{n}") is not None) == (n > 0)
        assert store.get_reply(f"cmd-{n + 1}") is None
        assert len(store.energy_minutes(0, 10**12)) == n // 5
        if n:
            last = store.get_dispatch(f"d{n % 7}")
            assert last is not None
            assert last.dispatch.target_kw == float(n)
        result = store.verify_audit()
        assert result.ok, result.reason
        assert result.records == n
        if n >= 5:
            per_miner = store.energy_per_miner(0, 10**12)[0]
            assert len(per_miner) == miners
            assert all(t.minutes == n // 5 for t in per_miner.values())
    return n


def test_sigkill_while_writing_never_loses_or_tears_a_transaction(tmp_path: Path) -> None:
    db = tmp_path / "state" / "hashflex.db"
    rng = random.Random(1234)
    stored = 0
    for _ in range(8):
        writer = Writer(db, miners=2000)
        writer.wait_for(stored + 1)  # it opened, and commits
        time.sleep(rng.uniform(0.0, 0.4))
        acked = writer.kill()
        # `hashflex audit verify` reads the crashed file as left (WAL not yet recovered by a writer)
        crashed = verify_database(db)
        assert crashed.ok, crashed.reason
        assert crashed.records >= acked
        stored = check_consistent(db, acked, 2000)
    assert stored > 20  # the kills landed at many different points of a long run
    assert verify_database(db).ok


@pytest.mark.parametrize("delay_s", [0.0, 0.05, 0.15, 0.3])
def test_sigkill_around_creation_leaves_no_file_mistaken_for_a_fresh_one(tmp_path: Path, delay_s: float) -> None:
    db = tmp_path / "state" / "hashflex.db"
    writer = Writer(db, miners=10)
    time.sleep(delay_s)
    acked = writer.kill()
    if db.exists():
        check_consistent(db, acked, 10)
    else:
        assert acked == -1
    # whatever was left, the next start works and carries on
    writer = Writer(db, miners=10)
    writer.wait_for(max(acked, 0) + 3)
    check_consistent(db, writer.kill(), 10)
