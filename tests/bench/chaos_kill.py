"""Chaos: the agent killed with SIGKILL over and over — at the test-only crash points inside its store writes
(agent/runtime/crashpoints.py) and from outside at random moments — with commands on the wire, and restarted on the
same state directory each time.

Each cycle: start the agent (armed with a crash point, or not), send a dispatch and a cancel (and reads) over the
control socket from a sender thread, the agent dies (at the point, or by our SIGKILL after a random delay), it is
restarted, every request that got no reply is sent again (byte for byte, as a grid retries), and:

- a retry of a request that was answered gets the first reply (else: doubled);
- every dispatch answered `ok` is known to the agent and accepted exactly once in the audit chain (else lost/doubled);
- from the kill on the site never draws above its cap, and while the cycle's dispatch binds no miner is woken
  beyond its level and the draw never rises back above the level once there (ground truth, sampled every 0.1 s);
- `hashflex audit verify` passes (every 10 cycles and at the end).

    python -m tests.bench.chaos_kill --cycles 100 [--seed 2] [--json-out rows.jsonl]

Loopback range: 127.181.0.0/16 (full runs), 127.186.0.0/16 (the short test).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from hashflex.agent.io.control_socket import AgentUnavailable
from hashflex.agent.runtime.crashpoints import ENV as CRASH_ENV
from hashflex.agent.runtime.crashpoints import POINTS
from hashflex.contract.reply import Reply
from hashflex.sim.testing import SimProcess
from tests.agent_harness import AgentConfigFiles, AgentProcess, write_agent_config
from tests.bench.chaos_common import (
    TOLERANCE_SHARE,
    WAKE_S,
    Row,
    Sample,
    TruthRecorder,
    above,
    accepted_counts,
    audit_verify,
    db_bytes,
    dispatch_body,
    emit,
    full_power_kw,
    is_final,
    known_dispatches,
    settled_db_bytes,
    signed,
)

K = 4.0  # the agent's clock runs 4x the wall; every restart shares one timeline


def held_down(samples: list[Sample], level_kw: float, tol_kw: float, grace_s: float = 1.0) -> str | None:
    """While a dispatch binds after a restart: the site's draw never rises back above the level once it is there,
    and the restarted agent wakes no miner while the miners running or waking (counted at their limit, or nominal)
    are beyond the level. None when it held, else what went wrong.

    Wakes in the first `grace_s` are not the restarted agent's: commands the killed agent had on the wire still land
    (they are counted in the notes, see `early_wakes`)."""
    if not samples:
        return None
    reached: Sample | None = None
    t0 = samples[0].at
    for prev, s in itertools.pairwise(samples):
        woke = [
            i for i, (a, b) in enumerate(zip(prev.states, s.states, strict=False)) if a == "sleeping" and b == "waking"
        ]
        if woke and s.at - t0 > grace_s and s.running_kw > level_kw + tol_kw:
            return (
                f"miner(s) {woke} woken {s.at - t0:.1f} s after the restart with {s.running_kw:.2f} kW running or "
                f"waking while the dispatch allows {level_kw} kW (before: {prev.describe()}; after: "
                f"{s.describe()})"
            )
        if s.power_kw <= level_kw + tol_kw:
            reached = reached or s
        elif reached:
            return (
                f"the site rose to {s.power_kw:.2f} kW (running {s.running_kw:.2f}, {s.waking} waking) "
                f"{s.at - t0:.1f} s after the restart, after meeting the dispatch at {level_kw} kW "
                f"(+{tol_kw:.2f}) {reached.at - t0:.1f} s after it"
            )
    return None


def early_wakes(samples: list[Sample], grace_s: float = 1.0) -> int:
    """Miners seen going from sleeping to waking in the first `grace_s` after a restart."""
    if not samples:
        return 0
    t0 = samples[0].at
    return sum(
        1
        for prev, s in itertools.pairwise(samples)
        if s.at - t0 <= grace_s
        for a, b in zip(prev.states, s.states, strict=False)
        if a == "sleeping" and b == "waking"
    )


class Wire:
    """Requests sent over the control socket, with the first reply of each (None: the agent died first)."""

    def __init__(self) -> None:
        self.docs: dict[str, tuple[str, dict[str, Any]]] = {}  # id -> (verb, document)
        self.first: dict[str, Reply] = {}
        self.lock = threading.Lock()

    def send(self, agent: AgentProcess, verb: str, doc: dict[str, Any]) -> Reply | None:
        with self.lock:
            self.docs.setdefault(doc["id"], (verb, doc))
        try:
            reply = agent.request(verb, doc, timeout=10)
        except AgentUnavailable:
            return None
        with self.lock:
            if is_final(reply.to_dict()):  # a transient error is no answer: the retry after the restart decides
                self.first.setdefault(doc["id"], reply)
        return reply


def start(files: AgentConfigFiles, origin: float, crash_at: str | None = None) -> AgentProcess:
    env = {CRASH_ENV: crash_at} if crash_at else {}
    return AgentProcess.start(files, time_scale=K, time_origin=origin, env=env, ready_timeout=60)


def run(
    cycles: int,
    *,
    seed: int = 2,
    base_ip: str = "127.181.0.1",
    miners: int = 8,
    workdir: Path | None = None,
    verify_every: int = 10,
) -> Row:
    row = Row("agent kill -9")
    rng = random.Random(seed)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="chaos-kill-")) if workdir is None else workdir
    points = list(POINTS)
    with SimProcess(miners=miners, base_ip=base_ip, seed=seed, extra_args=["--wake-s", WAKE_S]) as sim:
        full = full_power_kw(sim)
        cap = round(full * 0.8, 1)
        tol = full * TOLERANCE_SHARE
        # CHAOS_DEBUG=1: the controller logs at debug (what each plan was made from), kept with the evidence
        debug = {"logging": {"levels": {"controller": "debug"}}} if os.environ.get("CHAOS_DEBUG") else None
        files = write_agent_config(tmp / "agent", sim.ips, cap_kw=cap, time_scale=K, overrides=debug)
        origin = time.time()
        wire = Wire()
        dispatch_ids: list[str] = []
        agent: AgentProcess | None = None
        kinds: dict[str, int] = {}
        fired = binds_checked = inherited = 0
        with TruthRecorder(sim) as truth:
            try:
                agent = start(files, origin)
                # the site starts at full power, above its cap: the cycles begin once the agent holds it there and
                # has carried its plan out (a kill before that would count the first start's descent as a violation)
                agent.wait_for(
                    lambda: (
                        agent.status()["tick"]["n"] > 3
                        and agent.status().get("settled_since") is not None
                        and truth.latest().power_kw <= cap + tol
                    ),
                    60,
                    what="the site settled under its cap",
                )
                agent.stop()
                bytes0 = settled_db_bytes(files.state_dir)
                for cycle in range(cycles):
                    external = cycle % 2 == 1
                    point = None if external else points[(cycle // 2) % len(points)]
                    # the 2nd arrival: only from cycle 2 on is there a second command (a cancel) in one agent's life
                    crash_at = None if point is None else f"{point}:{rng.choice((1, 1, 2) if cycle >= 2 else (1,))}"
                    kinds[crash_at or "random"] = kinds.get(crash_at or "random", 0) + 1
                    did = f"k{cycle}"
                    lasts = rng.uniform(10, 16) if point == "closing" else rng.uniform(14, 24)
                    level = round(rng.uniform(0.3, 0.6) * full, 1)
                    died_at_start = False
                    try:
                        agent = start(files, origin, crash_at)
                    except (RuntimeError, TimeoutError) as exc:
                        if point is None or f"SIGKILL at {point}" not in str(exc):
                            row.crashes += 1
                            row.note(f"cycle {cycle}: the agent did not start ({crash_at}): {str(exc)[-300:]}")
                            continue
                        died_at_start = True  # the point came in its start-up (its first tick): a kill all the same
                        fired += 1
                    end_wall = time.monotonic()
                    t_down = time.monotonic()
                    killed_log = agent.log_path
                    if not died_at_start:
                        body = dispatch_body(agent, did, target_kw=level, lasts_s=lasts)
                        doc = signed(agent, "dispatch", body)
                        end_wall = time.monotonic() + lasts / K
                        dispatch_ids.append(did)
                        a = agent

                        def traffic(a: AgentProcess = a, doc: dict[str, Any] = doc, cycle: int = cycle) -> None:
                            wire.send(a, "dispatch", doc)
                            if cycle >= 2:
                                old = f"k{cycle - 2}"
                                wire.send(a, "cancel", signed(a, "cancel", {"id": f"c{cycle}", "dispatch_id": old}))
                            for _ in range(20):  # reads on the wire when the kill comes
                                try:
                                    a.request("status", {}, timeout=5)
                                except AgentUnavailable:
                                    return
                                time.sleep(0.05)

                        sender = threading.Thread(target=traffic, daemon=True)
                        sender.start()
                        if external:
                            time.sleep(rng.uniform(0.0, 2.0))
                            os.kill(agent.proc.pid, signal.SIGKILL)
                        try:
                            agent.proc.wait(lasts / K + 15)
                            log_text = agent.log_path.read_text(errors="replace")
                            fired += point is not None and f"SIGKILL at {point}" in log_text
                        except subprocess.TimeoutExpired:
                            row.note(f"cycle {cycle}: {crash_at} not reached; killed from outside")
                            agent.kill()
                        sender.join(15)
                        t_down = time.monotonic()
                        if agent.proc.returncode != -signal.SIGKILL:
                            row.crashes += 1
                            row.note(f"cycle {cycle}: exit {agent.proc.returncode}, not our SIGKILL: {agent.tail(6)}")
                    try:
                        agent = start(files, origin)
                    except (RuntimeError, TimeoutError) as exc:
                        row.crashes += 1
                        row.note(f"cycle {cycle}: no restart after the kill: {str(exc)[-400:]}")
                        continue
                    t_up = time.monotonic()
                    # the grid retries whatever got no reply; an answered one must get the same reply again
                    for rid, (verb, rdoc) in list(wire.docs.items()):
                        again = wire.send(agent, verb, rdoc) if rid not in wire.first else agent.request(verb, rdoc)
                        first = wire.first.get(rid)
                        if again is None:
                            row.crashes += 1
                            row.note(f"cycle {cycle}: no reply to {verb} {rid} after the restart")
                        elif first is not None and is_final(again.to_dict()) and again.to_dict() != first.to_dict():
                            row.doubled += 1
                            row.note(
                                f"cycle {cycle}: {verb} {rid} answered differently on a retry: "
                                f"{first.status}/{first.error_code} then {again.status}/{again.error_code}"
                            )
                    first = wire.first.get(did)
                    if first is not None and first.is_ok and time.monotonic() < end_wall - 0.5:
                        time.sleep(max(0.0, end_wall - 0.5 - time.monotonic()))
                        window = truth.since(t_up, end_wall - 0.5)
                        problem = held_down(window, level, tol)
                        binds_checked += 1
                        inherited += early_wakes(window)
                        if problem:
                            row.violations += 1
                            kept = keep_evidence(cycle, killed_log, agent.log_path)
                            row.note(f"cycle {cycle} ({crash_at or 'random'}): {problem} (logs: {kept})")
                    time.sleep(0.3)
                    over = above(truth.since(t_down), cap, tol)
                    if over:
                        row.violations += 1
                        worst = max(over, key=lambda s: s.power_kw)
                        row.note(
                            f"cycle {cycle} ({crash_at or 'random'}): site above its cap {cap} kW (+{tol:.2f}) "
                            f"in {len(over)} samples from {over[0].at - t_down:.1f} s to "
                            f"{over[-1].at - t_down:.1f} s after the kill (restarted at {t_up - t_down:.1f} s); "
                            f"max {worst.power_kw:.2f} kW, running {worst.running_kw:.2f} kW, "
                            f"{worst.waking} waking"
                        )
                    row.cycles = cycle + 1
                    if verify_every and (cycle + 1) % verify_every == 0:
                        ok, said = audit_verify(files)
                        if not ok:
                            row.violations += 1
                            row.note(f"cycle {cycle}: audit verify failed: {said}")
                    agent.stop()
                # ------------------------------------------------------------------------ the verdict
                agent = start(files, origin)
                known = known_dispatches(agent)
                accepted = accepted_counts(files.state_dir, "dispatch")
                cancelled = accepted_counts(files.state_dir, "cancel")
                row.sent = len(dispatch_ids)
                for did in dispatch_ids:
                    reply = wire.first.get(did)
                    if reply is None:
                        row.lost += 1
                        row.note(f"{did}: never answered")
                        continue
                    if accepted[did] > 1:
                        row.doubled += 1
                        row.note(f"{did}: accepted {accepted[did]} times")
                    if not reply.is_ok:
                        if accepted[did]:
                            row.doubled += 1
                            row.note(f"{did}: refused ({reply.error_code}) yet in the chain as accepted")
                        else:
                            row.note(f"{did}: refused {reply.error_code}: {reply.error_message}")
                        continue
                    row.acked += 1
                    if accepted[did] == 1 and did in known:
                        row.applied_once += 1
                    elif accepted[did] == 0 or did not in known:
                        row.lost += 1
                        row.note(f"{did}: acknowledged but lost (chain {accepted[did]}, known {did in known})")
                row.doubled += sum(1 for n in cancelled.values() if n > 1)
                agent.stop()
                ok, said = audit_verify(files)
                if not ok:
                    row.violations += 1
                    row.note(f"final audit verify failed: {said}")
                row.disk_growth = f"{(db_bytes(files.state_dir) - bytes0) / 1e6:.2f} MB"
                row.note(
                    "kills by kind: "
                    + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
                    + f"; {fired} died at their crash point; {binds_checked} dispatches checked held down "
                    f"after the restart; {inherited} wakes landed in the first second after a restart "
                    "(sent before the kill); "
                    f"{len(truth.samples)} truth samples"
                )
            finally:
                if agent is not None:
                    agent.kill()
                if workdir is None:
                    shutil.rmtree(tmp, ignore_errors=True)
    row.wall_s = time.monotonic() - started
    return row


def keep_evidence(cycle: int, *logs: Path) -> Path:
    """The killed and the restarted agent's logs of a cycle that broke a rule, kept past the run's temp folder."""
    folder = Path(tempfile.gettempdir()) / "chaos-kill-evidence" / f"{int(time.time())}-cycle{cycle}"
    folder.mkdir(parents=True, exist_ok=True)
    for n, log in enumerate(logs):
        with contextlib.suppress(OSError):
            shutil.copy(log, folder / f"{n}-{log.name}")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--workdir", type=Path, help="keep the agent's config, state and logs (one per start) here")
    args = ap.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    emit(run(args.cycles, seed=args.seed, workdir=args.workdir), args.json_out)


if __name__ == "__main__":
    main()
