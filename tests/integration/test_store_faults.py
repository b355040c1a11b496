"""The real agent on a simulated site while its state store fails: a full disk (a small tmpfs the test mounts and
fills), a write lock held by another process, a second agent on the same state directory (issue 12, findings 1, 2
and 4).

What must hold: the agent keeps controlling from memory (the site stays under its limit, the process does not
exit), raises the `store_unavailable` alarm, answers a command it cannot store with `store_unavailable` and applies
nothing of it, loses no acknowledged dispatch, and recovers by itself when the store is usable again; at start a
store that cannot be used now is waited for, never moved aside; a second agent exits without touching the store.

Root only (mount). Loopback range of this file: 127.58.0.0/16.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hashflex.agent.io.control_socket import AgentUnavailable, request_sync
from hashflex.agent.io.store import Store, StoreUnavailable
from hashflex.sim.testing import SimProcess
from tests.agent_harness import ROOT, AgentConfigFiles, AgentProcess, iso, write_agent_config
from tests.fsfaults import fill, locked, tmpfs

pytestmark = pytest.mark.timeout(300)

MINERS = 8
K = 4.0
TOL_SHARE = 0.03


@dataclass
class Site:
    sim: SimProcess
    full_kw: float
    samples: list[tuple[float, float]]  # (monotonic, site kW), every 50 ms for the whole module

    @property
    def cap_kw(self) -> float:
        return round(self.full_kw * 0.8, 1)

    @property
    def tol_kw(self) -> float:
        return self.full_kw * TOL_SHARE

    def power_kw(self) -> float:
        start = time.monotonic()
        while not self.samples or self.samples[-1][0] < start:
            time.sleep(0.02)
        return self.samples[-1][1]

    def max_since(self, t0: float) -> float:
        return max(kw for at, kw in list(self.samples) if at >= t0)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with SimProcess(
        miners=MINERS, mix="luxos:50,whatsminer:50", base_ip="127.58.1.1", seed=58, extra_args=["--wake-s", "3"]
    ) as sim:
        full = sum(float(m["nominal_w"]) for m in sim.truth()["miners"]) / 1000
        samples: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.monotonic(), sim.truth()["site"]["power_w"] / 1000))
                stop.wait(0.05)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield Site(sim, full, samples)
        finally:
            stop.set()
            thread.join(5)


def config(site: Site, folder: Path) -> AgentConfigFiles:
    return write_agent_config(folder, site.sim.ips, cap_kw=site.cap_kw, time_scale=K)


def dispatch(agent: AgentProcess, did: str, level_kw: float, lasts_s: float = 3600.0) -> dict[str, Any]:
    now = agent.now()
    return agent.signed({"id": did, "target_kw": level_kw, "start": iso(now), "end": iso(now + lasts_s)})


def alarms(agent: AgentProcess) -> list[str]:
    return [a["key"] for a in agent.status()["alarms"]]


def find(agent: AgentProcess, did: str) -> dict[str, Any] | None:
    return next((d for d in agent.ok("dispatches", {"all": True})["dispatches"] if d["id"] == did), None)


def verify(files: AgentConfigFiles) -> dict[str, Any]:
    import json

    done = subprocess.run(
        [sys.executable, "-m", "hashflex", "audit", "verify", "--config", str(files.path), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def records(files: AgentConfigFiles, kind: str) -> list[dict[str, Any]]:
    with Store.open(files.state_dir / "hashflex.db", create=False) as store:
        return [r.data for r in store.audit_records() if r.kind == kind]


def test_a_full_disk_during_a_dispatch_keeps_control_alarms_and_loses_nothing_acknowledged(
    site: Site, tmp_path: Path
) -> None:
    files = config(site, tmp_path)
    l1 = round(site.full_kw * 0.5, 1)
    l2 = round(site.full_kw * 0.3, 1)
    with tmpfs(files.state_dir, "16m") as state:
        origin = time.time()
        with AgentProcess.start(files, time_scale=K, time_origin=origin) as agent:
            d1 = dispatch(agent, "grid-1", l1)
            first = agent.request("dispatch", d1)
            assert first.is_ok, first
            agent.wait_for(lambda: site.power_kw() <= l1 + site.tol_kw, 40, what="site at the first dispatch")

            ballast = fill(state)
            t_full = time.monotonic()
            # (SQLite may still commit a little into WAL space it already has, until that is used up)
            agent.wait_for(lambda: "store_unavailable" in alarms(agent), 30, what="the store_unavailable alarm")
            d2 = dispatch(agent, "grid-2", l2)
            refused = agent.request("dispatch", d2)
            assert not refused.is_ok, "ok was sent for a dispatch that could not be stored"
            assert refused.error_code == "store_unavailable", refused
            assert find(agent, "grid-2") is None, "a dispatch whose commit failed was applied"
            time.sleep(6.0)  # ~24 site seconds of ticks, actions, energy minutes on a full disk
            assert agent.proc.poll() is None, f"the agent exited on a full disk:\n{agent.tail()}"
            status = agent.status()
            assert status["target_kw"] == pytest.approx(l1), status["target_kw"]
            assert site.max_since(t_full) <= l1 + site.tol_kw
            assert agent.request("cap", {"cap_kw": site.cap_kw - 1}).error_code == "store_unavailable"
            assert agent.status()["cap_kw"] == site.cap_kw

            worst = site.max_since(t_full)
            ballast.unlink()  # space is back: queued writes go out, the alarm clears, commands are stored again
            t_freed = time.monotonic()
            agent.wait_for(lambda: "store_unavailable" not in alarms(agent), 30, what="the alarm cleared")
            print(
                f"\ndisk full {t_freed - t_full:.1f} s: site max {worst:.2f} kW under dispatch {l1} kW "
                f"(+{site.tol_kw:.2f} tolerance); alarm cleared {time.monotonic() - t_freed:.1f} s after space "
                "returned"
            )
            again = agent.request("dispatch", d2)
            assert again.is_ok, again
            agent.wait_for(lambda: site.power_kw() <= l2 + site.tol_kw, 40, what="site at the second dispatch")
            assert site.max_since(t_full) <= l1 + site.tol_kw
        assert not [p for p in state.iterdir() if "corrupt" in p.name]
        with AgentProcess.start(files, time_scale=K, time_origin=origin) as agent:
            assert (find(agent, "grid-1") or {}).get("status") == "active"
            assert (find(agent, "grid-2") or {}).get("status") == "active"
            assert agent.request("dispatch", d1).to_dict() == first.to_dict(), "the stored reply was forgotten"
            assert "safe_start" not in alarms(agent)
        applied = [r["id"] for r in records(files, "command") if r["verb"] == "dispatch" and r["status"] == "ok"]
        assert sorted(applied) == ["grid-1", "grid-2"]
        assert any(r.get("key") == "store_unavailable" for r in records(files, "alarm"))
        verdict = verify(files)
        assert verdict["status"] == "ok", verdict


@pytest.mark.parametrize("fault", ["locked", "full", "read-only"])
def test_a_store_that_cannot_be_used_at_start_is_waited_for_never_moved(site: Site, tmp_path: Path, fault: str) -> None:
    files = config(site, tmp_path)
    with tmpfs(files.state_dir, "16m") as state:
        origin = time.time()
        with AgentProcess.start(files, time_scale=K, time_origin=origin) as agent:
            agent.ok("cap", {"cap_kw": site.cap_kw - 2})  # state worth keeping
        db = state / "hashflex.db"
        started: list[AgentProcess] = []
        errors: list[BaseException] = []

        def start() -> None:
            try:
                started.append(AgentProcess.start(files, time_scale=K, time_origin=origin, ready_timeout=120))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=start)
        if fault == "locked":
            with locked(db, "exclusive"):
                thread.start()
                time.sleep(14.0)  # longer than any busy timeout: the lock outlasts the agent's patience
                assert not errors, errors[0]
                assert not started, "the agent started on a store another process holds"
        elif fault == "full":
            ballast = fill(state)
            thread.start()
            time.sleep(8.0)
            assert not errors, errors[0]
            assert not started, "the agent started on a full disk"
            ballast.unlink()
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
            thread.start()
            time.sleep(8.0)
            assert not errors, errors[0]
            assert not started, "the agent started on a read-only file system"
            subprocess.run(["mount", "-o", "remount,rw", str(state)], check=True)
        thread.join(150)
        assert not errors, errors[0]
        assert started
        with started[0] as agent:
            assert not [p for p in state.iterdir() if "corrupt" in p.name], "a healthy store was moved aside"
            status = agent.status()
            assert status["cap_kw"] == site.cap_kw - 2, "state from the store was lost"
            assert "safe_start" not in alarms(agent)
            assert any("state store cannot be used now" in e.get("message", "") for e in agent.log_events("alarm"))
        assert verify(files)["status"] == "ok"


def test_a_second_agent_on_the_same_state_directory_exits_and_leaves_the_first_alone(
    site: Site, tmp_path: Path
) -> None:
    files = config(site, tmp_path)
    origin = time.time()
    with AgentProcess.start(files, time_scale=K, time_origin=origin) as agent:
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "hashflex",
                "run",
                "--config",
                str(files.path),
                "--time-scale",
                str(K),
                "--time-origin",
                repr(origin),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode != 0
        assert "another hashflex agent" in second.stdout + second.stderr
        for n in range(3):  # the first agent's audit appends still work
            assert agent.request("cap", {"cap_kw": site.cap_kw - n - 1}).is_ok
        assert agent.proc.poll() is None
    assert len(records(files, "agent_start")) == 1
    assert verify(files)["status"] == "ok"


def test_a_write_lock_held_by_another_process_never_stalls_the_loop(site: Site, tmp_path: Path) -> None:
    files = config(site, tmp_path)
    level = round(site.full_kw * 0.4, 1)
    origin = time.time()
    with AgentProcess.start(files, time_scale=K, time_origin=origin) as agent:
        doc = dispatch(agent, "grid-locked", level)
        with locked(files.state_dir / "hashflex.db"):
            started = time.monotonic()
            refused = agent.request("dispatch", doc)
            took = time.monotonic() - started
            assert refused.error_code == "store_unavailable", refused
            assert took < 3.0, f"the command waited {took:.1f} s for the lock (the loop was blocked that long)"
            assert find(agent, "grid-locked") is None
            agent.wait_for(lambda: "store_unavailable" in alarms(agent), 20, what="the store_unavailable alarm")
            slowest = 0.0
            for _ in range(10):  # the loop keeps answering while the lock is held
                started = time.monotonic()
                agent.status()
                slowest = max(slowest, time.monotonic() - started)
                time.sleep(0.3)
            assert slowest < 3.0
            print(
                f"\nwrite lock held elsewhere: command refused in {took * 1000:.0f} ms, slowest status "
                f"{slowest * 1000:.0f} ms"
            )
        agent.wait_for(lambda: "store_unavailable" not in alarms(agent), 30, what="the alarm cleared")
        assert agent.request("dispatch", doc).is_ok
        agent.wait_for(lambda: site.power_kw() <= level + site.tol_kw, 40, what="site at the dispatch")
    assert verify(files)["status"] == "ok"


def test_a_safe_start_holds_across_restarts_until_an_operator_resumes(site: Site, tmp_path: Path) -> None:
    files = config(site, tmp_path)
    origin = time.time()
    db = files.state_dir / "hashflex.db"
    with AgentProcess.start(files, time_scale=K, time_origin=origin):
        pass
    with db.open("r+b") as f:
        f.write(b"\0" * 100)  # real damage: moved aside, safe start
    with AgentProcess.start(files, time_scale=K, time_origin=origin) as agent:
        assert "safe_start" in alarms(agent)
    for leftover in files.state_dir.glob("hashflex.db*"):
        leftover.unlink()  # the new database is lost as well (or an old backup without the safe start is put back)
    with AgentProcess.start(files, time_scale=K, time_origin=origin) as agent:
        assert "safe_start" in alarms(agent), "the pending safe start was forgotten with the database"
        assert "safe-start" in agent.ok("resume", {})["cancelled"]
    with AgentProcess.start(files, time_scale=K, time_origin=origin) as agent:
        assert "safe_start" not in alarms(agent)


def _crash_with_open_wal(db: Path) -> None:
    """A process that writes and dies without closing (as a killed agent does): the -wal and -shm files stay, and
    with them SQLite can open the database on a read-only file system, read-only."""
    code = (
        "import os, sys; from hashflex.agent.io.store import Store; "
        "s = Store.open(sys.argv[1]); s.set_state('probe', 1); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code, str(db)], cwd=ROOT, check=True, timeout=60)
    assert Path(f"{db}-wal").exists()
    assert Path(f"{db}-shm").exists()


def test_a_store_opened_on_a_read_only_file_system_takes_writes_once_it_is_writable_again(tmp_path: Path) -> None:
    """Chaos finding 0: opened read-only (the file system was read-only at start), the store's connection never
    became writable: every write failed with SQLITE_READONLY after the remount read-write, for good."""
    with tmpfs(tmp_path / "state", "8m") as state:
        db = state / "hashflex.db"
        _crash_with_open_wal(db)
        subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
        try:
            store = Store.open(db)  # readable: the agent can start and control from what it holds
            assert store.get_state("probe") == 1
            with pytest.raises(StoreUnavailable, match="readonly"):
                store.set_state("probe", 2)
            with pytest.raises(StoreUnavailable):  # still read-only: a retry fails the same way
                store.append_audit("alarm", {"key": "x"}, 1.0)
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(state)], check=True)
        try:
            store.set_state("probe", 3)  # the retry after the remount
            store.append_audit("alarm", {"key": "y"}, 2.0)
            assert store.get_state("probe") == 3
        finally:
            store.close()
        with Store.open(db) as again:
            assert again.get_state("probe") == 3
            assert [r.data["key"] for r in again.audit_records()] == ["y"]
            assert again.verify_audit().ok


def test_an_agent_waiting_for_a_locked_store_at_start_says_so_on_its_control_socket(site: Site, tmp_path: Path) -> None:
    """Chaos finding 2: while another process held the database's exclusive lock at start, `hashflex run` did not
    answer on its control socket at all (an operator saw a dead socket, not why). It now answers every request
    with `unavailable` and the reason until the store opens, then serves as usual."""
    files = config(site, tmp_path)
    origin = time.time()
    with AgentProcess.start(files, time_scale=K, time_origin=origin):
        pass  # a store with something in it
    started: list[AgentProcess] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            started.append(AgentProcess.start(files, time_scale=K, time_origin=origin, ready_timeout=120))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=start)
    replies = []
    with locked(files.state_dir / "hashflex.db", "exclusive"):
        thread.start()
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and not replies:
            time.sleep(0.5)
            if files.socket.exists():
                with contextlib.suppress(AgentUnavailable):
                    replies.append(request_sync(files.socket, "status", {}, timeout=5.0))
        assert not started, "the agent started on a store another process holds"
        assert replies, "the agent waiting for the state store does not answer on its control socket"
        reply = replies[0]
        assert reply.error_code == "unavailable", reply
        assert "waiting for the state store" in (reply.error_message or ""), reply
        assert "lock" in (reply.error_message or ""), reply  # the reason SQLite gave (database is locked)
        assert not request_sync(files.socket, "ping", {}, timeout=5.0).is_ok  # not ready: nothing is controlled
    thread.join(150)
    assert not errors, errors[0]
    assert started
    with started[0] as agent:
        assert agent.status()["cap_kw"] == site.cap_kw
