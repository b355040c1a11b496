"""Chaos: the state directory full, locked by another process, or read-only — while the agent runs and when it
starts — on the whole agent with the simulated site. Needs root (it mounts a small tmpfs as the state directory).

Each cycle (the faults in turn):
1. the grid's dispatch A holds the site at a level (acknowledged, met: ground truth);
2. at-start faults: the agent is killed (SIGKILL) first;
3. the fault: the tmpfs filled to its last byte / a second process holding SQLite's exclusive lock / the tmpfs
   remounted read-only (at start only: a file system with a file open for writing cannot be remounted read-only);
4. at-start faults: the agent is started on it;
5. for 5 s: a second dispatch B is sent, the agent is pinged (how long it answers), its alarms read;
6. the fault ends (the ballast deleted, the lock released, rw again); the agent is started if it is not running;
7. recovery (within 15 s): B is retried until it has a final reply, a fresh dispatch C must be accepted, the
   store alarm clears; an agent that does not recover is restarted (noted) so the next cycles test their own fault.

Counted: the site above A's level at any time from A met (the draw and the settings within it) to the cycle's end
(violation), no new alarm during the fault (violation), the agent not answering for 5 s (violation), the database
moved aside (violation), the agent exiting without being killed (crash); at the end, after a restart, every dispatch
ever answered `ok` known and accepted exactly once in the audit chain (lost / doubled), and `hashflex audit verify`
passing.

    sudo python -m tests.bench.chaos_disk --cycles 100 [--seed 3] [--json-out rows.jsonl]

Loopback range: 127.182.0.0/16 (full runs), 127.187.0.0/16 (the short test).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hashflex.agent.io.control_socket import AgentUnavailable
from hashflex.contract.reply import Reply
from hashflex.sim.testing import SimProcess
from tests.agent_harness import AgentConfigFiles, AgentProcess, write_agent_config
from tests.bench.chaos_common import (
    TOLERANCE_SHARE,
    WAKE_S,
    Row,
    TruthRecorder,
    above,
    accepted_counts,
    audit_verify,
    db_bytes,
    dispatch_body,
    emit,
    full_power_kw,
    known_dispatches,
    settled_db_bytes,
    signed,
)
from tests.fsfaults import fill, locked, tmpfs


@dataclass(frozen=True)
class Fault:
    name: str
    at_start: bool


FAULTS = (
    Fault("full during run", False),
    Fault("full at start", True),
    Fault("locked during run", False),
    Fault("locked at start", True),
    Fault("read-only at start", True),
)
FAULT_S = 5.0
RECOVER_S = 15.0  # after the fault ends, the agent has this long to take commands again and clear its alarm


class Applied:
    """One fault in force on the state directory until `clear()`."""

    def __init__(self, fault: Fault, mount: Path, db: Path) -> None:
        self.fault = fault
        self.mount = mount
        self._undo: Callable[[], None]
        if fault.name.startswith("full"):
            ballast = fill(mount)
            self._undo = ballast.unlink
        elif fault.name.startswith("locked"):
            # at start nobody has the file open: no reader either; while the agent runs (WAL) only the write lock
            # can be taken from outside, between two of the agent's own transactions (hence the retries)
            stack = contextlib.ExitStack()
            for attempt in range(20):
                try:
                    stack.enter_context(locked(db, "exclusive" if fault.at_start else "write"))
                    break
                except AssertionError:
                    if attempt == 19:
                        raise
                    time.sleep(0.1)
            self._undo = stack.close
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
            self._undo = lambda: subprocess.run(
                ["mount", "-o", "remount,rw", str(mount)], check=True, capture_output=True
            )

    def clear(self) -> None:
        self._undo()


def _send(agent: AgentProcess | None, verb: str, doc: dict[str, Any], timeout: float = 10) -> Reply | None:
    if agent is None or agent.proc.poll() is not None:
        return None
    try:
        return agent.request(verb, doc, timeout=timeout)
    except AgentUnavailable:
        return None


def _alarm_keys(agent: AgentProcess) -> set[str]:
    try:
        return {a["key"] for a in agent.request("status", {}, timeout=5).data.get("alarms", [])}
    except AgentUnavailable:
        return set()


def _settled(truth: TruthRecorder, limit_kw: float, for_s: float = 1.0) -> bool:
    """The site at or under `limit_kw` for the last `for_s`, and so are the settings of every miner running or
    waking (at its limit, or nominal): A is met and nothing commanded before A (a wake) is still on its way up."""
    now = time.monotonic()
    recent = truth.since(now - for_s)
    return len(recent) >= 3 and all(s.power_kw <= limit_kw and s.running_kw <= limit_kw for s in recent)


def _new_alarms(agent: AgentProcess, before: set[str]) -> set[str]:
    """Alarms raised since `before`, leaving out the planner's own (a level it cannot meet yet) and a safe start."""
    return {k for k in _alarm_keys(agent) - before if k != "safe_start" and not k.startswith("cannot_meet")}


def run(
    cycles: int, *, seed: int = 3, base_ip: str = "127.182.0.1", miners: int = 8, workdir: Path | None = None
) -> Row:
    row = Row("disk full/locked/ro")
    rng = random.Random(seed)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="chaos-disk-")) if workdir is None else workdir
    with (
        SimProcess(miners=miners, base_ip=base_ip, seed=seed, extra_args=["--wake-s", WAKE_S]) as sim,
        tmpfs(tmp / "state-fs", "24m") as mount,
    ):
        full = full_power_kw(sim)
        cap = round(full * 0.8, 1)
        tol = full * TOLERANCE_SHARE
        files: AgentConfigFiles = write_agent_config(tmp / "agent", sim.ips, cap_kw=cap)
        state_dir = mount / "state"
        files.doc["state_dir"] = str(state_dir)
        # the harness puts the state dir next to the config: point it at the tmpfs
        files.path.write_text(yaml.safe_dump(files.doc, sort_keys=False))
        files = AgentConfigFiles(files.path, state_dir, files.socket, files.grid_key, files.doc)
        db = state_dir / "hashflex.db"
        acked: list[str] = []
        agent: AgentProcess | None = None
        fault_names: dict[str, int] = {}
        worst_ping = 0.0
        with TruthRecorder(sim) as truth:
            try:
                agent = AgentProcess.start(files)
                agent.wait_for(lambda: agent.status()["tick"]["n"] > 3, 60, what="a few ticks")
                bytes0 = settled_db_bytes(state_dir)
                for cycle in range(cycles):
                    fault = FAULTS[cycle % len(FAULTS)]
                    fault_names[fault.name] = fault_names.get(fault.name, 0) + 1
                    tag = f"cycle {cycle} ({fault.name})"
                    if agent is None or agent.proc.poll() is not None:
                        agent = AgentProcess.start(files)
                    level = round(rng.uniform(0.4, 0.6) * full, 1)
                    ids = {k: f"{k}{cycle}" for k in "ABC"}
                    reply_a = agent.request(
                        "dispatch",
                        signed(agent, "dispatch", dispatch_body(agent, ids["A"], target_kw=level, lasts_s=None)),
                    )
                    if not reply_a.is_ok:
                        row.violations += 1
                        row.note(f"{tag}: A refused before the fault: {reply_a.error_code} {reply_a.error_message}")
                        row.cycles = cycle + 1
                        continue
                    acked.append(ids["A"])
                    row.sent += 3  # A, B and C
                    try:
                        agent.wait_for(lambda lv=level: _settled(truth, lv + tol), 40, what="A met")
                    except TimeoutError:
                        row.note(f"{tag}: A ({level} kW) not met within 40 s")
                    t_met = time.monotonic()
                    if fault.at_start:
                        agent.kill()
                    alarms_before = set() if fault.at_start else _alarm_keys(agent)
                    applied = Applied(fault, mount, db)
                    started_under_fault: list[AgentProcess | BaseException] = []
                    ready_at: list[float] = []
                    t_fault = time.monotonic()
                    try:
                        if fault.at_start:

                            def starting(
                                box: list[AgentProcess | BaseException] = started_under_fault,
                                ready: list[float] = ready_at,
                            ) -> None:
                                try:
                                    box.append(AgentProcess.start(files, ready_timeout=FAULT_S + 25))
                                    ready.append(time.monotonic())
                                except BaseException as exc:
                                    box.append(exc)

                            starter = threading.Thread(target=starting, daemon=True)
                            starter.start()
                            starter.join(FAULT_S)
                        b_doc = signed(
                            agent,
                            "dispatch",
                            dispatch_body(agent, ids["B"], target_kw=level - 0.1 * full, lasts_s=None),
                        )
                        live = (
                            agent
                            if not fault.at_start
                            else (
                                started_under_fault[0]
                                if started_under_fault and isinstance(started_under_fault[0], AgentProcess)
                                else None
                            )
                        )
                        reply_b = _send(live, "dispatch", b_doc)
                        if reply_b is not None and reply_b.is_ok:
                            acked.append(ids["B"])
                        alarms = set()
                        deadline = time.monotonic() + FAULT_S
                        while time.monotonic() < deadline and live is not None:
                            t0 = time.monotonic()
                            try:
                                live.request("ping", {}, timeout=FAULT_S)
                                worst_ping = max(worst_ping, time.monotonic() - t0)
                            except AgentUnavailable:
                                if live.proc.poll() is None:
                                    row.violations += 1
                                    row.note(f"{tag}: the agent did not answer a ping for {FAULT_S:g} s")
                                break
                            alarms |= _alarm_keys(live) - alarms_before
                            time.sleep(0.3)
                        if live is None:
                            row.note(f"{tag}: the agent was not up under the fault")
                        elif not alarms:
                            row.violations += 1
                            row.note(
                                f"{tag}: no new alarm while the fault lasted (B: "
                                f"{None if reply_b is None else reply_b.error_code or 'ok'})"
                            )
                        else:
                            row.note(
                                f"{tag}: alarms {sorted(alarms)}; B "
                                f"{'no reply' if reply_b is None else reply_b.error_code or 'ok'}"
                            )
                        moved = [p.name for p in state_dir.glob("*corrupt*")]
                        if moved:
                            row.violations += 1
                            row.note(f"{tag}: the database was moved aside: {moved}")
                    finally:
                        applied.clear()
                        t_clear = time.monotonic()
                    if fault.at_start:
                        starter.join(40)
                        got = started_under_fault[0] if started_under_fault else None
                        agent = got if isinstance(got, AgentProcess) else None
                        if ready_at and ready_at[0] > t_clear:
                            row.note(
                                f"{tag}: the agent answered only {ready_at[0] - t_clear:.1f} s after the fault "
                                f"ended ({t_clear - t_fault:.1f} s of fault)"
                            )
                        if agent is None:
                            row.crashes += 1
                            row.note(f"{tag}: the agent did not ride out the fault at start: {str(got)[-300:]}")
                    if agent is not None and agent.proc.poll() is not None:
                        row.crashes += 1
                        row.note(f"{tag}: the agent exited with {agent.proc.returncode}: {agent.tail(5)}")
                        agent = None
                    if agent is None:
                        try:
                            agent = AgentProcess.start(files)
                        except (RuntimeError, TimeoutError) as exc:
                            row.crashes += 1
                            row.note(f"{tag}: no start after the fault ended: {str(exc)[-400:]}")
                            agent = None
                            continue
                    if reply_b is not None and not reply_b.is_ok:
                        # refused because it could not be stored: it must not be in force either (nothing applied
                        # that was not committed)
                        with contextlib.suppress(AgentUnavailable, AssertionError):
                            if ids["B"] in known_dispatches(agent):
                                row.violations += 1
                                row.note(f"{tag}: B was refused ({reply_b.error_code}) but the agent has it")
                    # ------------------------------------------------------------------ recovery
                    deadline = time.monotonic() + RECOVER_S
                    final_b: Reply | None = None
                    while time.monotonic() < deadline:
                        final_b = _send(agent, "dispatch", b_doc)
                        if final_b is not None and final_b.error_code not in ("unavailable", "internal"):
                            break
                        time.sleep(0.5)
                    if final_b is None or not final_b.is_ok:
                        row.violations += 1
                        row.note(
                            f"{tag}: B not accepted after the fault ended: "
                            f"{None if final_b is None else (final_b.error_code, final_b.error_message)}"
                        )
                    elif ids["B"] not in acked:
                        acked.append(ids["B"])
                    if (
                        reply_b is not None
                        and final_b is not None
                        and reply_b.is_ok
                        and reply_b.to_dict() != final_b.to_dict()
                    ):
                        row.doubled += 1
                        row.note(f"{tag}: B answered differently on a retry")
                    reply_c = _send(
                        agent,
                        "dispatch",
                        signed(agent, "dispatch", dispatch_body(agent, ids["C"], target_kw=level, lasts_s=None)),
                    )
                    stuck = reply_c is None or not reply_c.is_ok
                    if reply_c is not None and reply_c.is_ok:
                        acked.append(ids["C"])
                    else:
                        row.violations += 1
                        row.note(
                            f"{tag}: fresh dispatch C refused after recovery: "
                            f"{None if reply_c is None else reply_c.error_code}"
                        )
                    with contextlib.suppress(TimeoutError, RuntimeError):
                        agent.wait_for(
                            lambda a=agent, b=alarms_before: not _new_alarms(a, b),
                            1.0 if stuck else RECOVER_S,
                            what="alarms cleared",
                        )
                    left = _new_alarms(agent, alarms_before)
                    if left:
                        row.note(f"{tag}: alarms still raised after recovery: {sorted(left)}")
                    status = agent.status()
                    open_ids = {d["id"] for d in status["dispatches"]}
                    if ids["A"] not in open_ids:
                        row.lost += 1
                        row.note(f"{tag}: dispatch A is no longer open after the fault: {sorted(open_ids)}")
                    if "safe-start" in open_ids:
                        row.note(f"{tag}: safe start held after the fault; resumed by the operator")
                        agent.request("resume", {})
                    over = above(truth.since(t_met), level, tol)
                    if over:
                        row.violations += 1
                        row.note(
                            f"{tag}: site above A's level {level} kW in {len(over)} samples "
                            f"(max {max(s.power_kw for s in over):.2f} kW, from {over[0].at - t_met:.1f} s to "
                            f"{over[-1].at - t_met:.1f} s after A was met; the fault ended at "
                            f"{t_clear - t_met:.1f} s)"
                        )
                    for k in "ABC":
                        _send(agent, "cancel", signed(agent, "cancel", {"id": f"x{ids[k]}", "dispatch_id": ids[k]}))
                    if stuck:  # it did not recover by itself: restart it, so the next cycles test their own fault
                        row.note(f"{tag}: the agent did not recover; restarted (SIGKILL) to go on")
                        agent.kill()
                        agent = AgentProcess.start(files)
                    row.cycles = cycle + 1
                # ------------------------------------------------------------------------ the verdict
                if agent is not None:
                    agent.stop()
                agent = AgentProcess.start(files)
                known = known_dispatches(agent)
                accepted = accepted_counts(state_dir, "dispatch")
                row.acked = len(set(acked))
                for did in sorted(set(acked)):
                    if accepted[did] == 1 and did in known:
                        row.applied_once += 1
                    elif accepted[did] > 1:
                        row.doubled += 1
                        row.note(f"{did}: accepted {accepted[did]} times")
                    else:
                        row.lost += 1
                        row.note(f"{did}: acknowledged but lost (chain {accepted[did]}, known {did in known})")
                agent.stop()
                ok, said = audit_verify(files)
                if not ok:
                    row.violations += 1
                    row.note(f"final audit verify failed: {said}")
                row.disk_growth = f"{(db_bytes(state_dir) - bytes0) / 1e6:.2f} MB"
                row.note(
                    f"slowest ping under a fault {worst_ping * 1000:.0f} ms; faults: "
                    + ", ".join(f"{k} {n}" for k, n in fault_names.items())
                )
            finally:
                if agent is not None:
                    agent.kill()
    if workdir is None:
        shutil.rmtree(tmp, ignore_errors=True)
    row.wall_s = time.monotonic() - started
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    emit(run(args.cycles, seed=args.seed), args.json_out)


if __name__ == "__main__":
    main()
