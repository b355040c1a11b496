"""Benchmark: the control loop end to end, the agent against a bare pyasic loop of the same calls.

    python -m tests.bench.bench_control                         # 1,000 and 10,000 miners
    python -m tests.bench.bench_control --miners 1000 --concurrency 200

For each site size the simulator runs in its own process (`python -m hashflex.sim`, real time, woken units at full power
in --wake-s seconds) and the agent in its own (`hashflex run`, driven through its control socket, exactly as in
the scenario tests). Ground truth comes from the simulator (GET /truth, sampled on a thread); the agent's figures
come from its own records: the dispatch's received_at, the `actions` log line of each command batch (when the
batch was fully answered, its wall duration, outcomes per op) and the `tick` log lines (plan_ms), the status doc
(plan.expected_ths against plan.baseline_ths, which is `plan_sleep_only` on the same inputs).

Phases, one after the other on the same site:
1. **curtail**: a grid dispatch to 0 kW: every miner is told to sleep (the fast, sleep-only plan). Time from the
   dispatch to all sleeps acknowledged, and until ground truth is at the standby floor (every unit asleep).
2. **restore**: the dispatch is cancelled; the site wakes (not timed; it has to be back up for phase 3).
3. **re-plan**: a dispatch to 60 % of full power: sleep-only first, then the hashrate-optimal plan with power
   limits. Time until ground truth is at or under the target, until the last batch of the re-plan (power limits
   applied) is acknowledged; planning time per tick; hashrate kept against the sleep-only baseline.
Then the agent is stopped and the **bare loop** runs in a fresh process (uvloop and the same pyasic patches as the
agent, miner objects built from the agent's stored identities, a semaphore of the same concurrency): every miner
`set_power_limit(w)` for every miner and limit the agent ended phase 3 with, then `stop_mining()` for every miner
(and for stock Antminers the work-mode read-back the driver does, since pyasic answers True without looking).
The sleeps run twice: on the agent's simulator (LuxOS sessions and Whatsminer salts already set up by the agent)
and on a fresh simulator (none yet, as the agent found its site in phase 1); the ratio compares like with like.

Targets at 10,000 miners (issue 4): curtailment acknowledged by all miners <= 3 s, a full re-plan with power
limits applied <= 10 s, planning <= 100 ms, the agent's fan-out within 1.2x of the bare loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from hashflex.agent.core.model import SleepAction

BASE_IP = "127.37.0.1"  # this helper's loopback range: 127.30.0.0-127.39.255.255
MIX = "luxos:40,whatsminer:40,antminer:20"
STANDBY_MAX_W = 26.0  # the simulator's largest standby draw (S21); "asleep" = every unit at or under it
REPLAN_SHARE = 0.6


def ts_of(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# ---------------------------------------------------------------------------------------------- recording
@dataclass
class Sample:
    at: float  # time.time()
    kw: float
    ths: float
    states: dict[str, int]
    sleeping_at_standby: int


@dataclass
class Recorder:
    """Ground truth and the agent's RSS, sampled on a thread."""

    sim: Any
    every_s: float
    samples: list[Sample] = field(default_factory=list)
    rss_peak_mib: float = 0.0
    agent_pid: int | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Recorder:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.sample()
            except Exception as exc:  # a slow answer must not end the record
                print(f"  (truth sample failed: {exc})", file=sys.stderr)
            self._stop.wait(max(0.0, self.every_s - (time.monotonic() - started)))

    def sample(self) -> Sample:
        at = time.time()
        truth = self.sim.truth()
        states: dict[str, int] = {}
        standby = 0
        for m in truth["miners"]:
            states[m["state"]] = states.get(m["state"], 0) + 1
            if m["state"] == "sleeping" and m["power_w"] <= STANDBY_MAX_W:
                standby += 1
        s = Sample(at, truth["site"]["power_w"] / 1000, truth["site"]["hashrate_ths"], states, standby)
        self.samples.append(s)
        if self.agent_pid is not None:
            try:
                rss = psutil.Process(self.agent_pid).memory_info().rss / 2**20
                self.rss_peak_mib = max(self.rss_peak_mib, rss)
            except psutil.Error:
                pass
        return s

    def first(self, since: float, predicate: Callable[[Sample], bool]) -> Sample | None:
        return next((s for s in list(self.samples) if s.at >= since and predicate(s)), None)

    def wait(self, since: float, predicate: Callable[[Sample], bool], timeout: float, what: str) -> Sample:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.first(since, predicate)
            if found is not None:
                return found
            time.sleep(0.1)
        last = self.samples[-1] if self.samples else None
        raise TimeoutError(f"{what}: not within {timeout:g} s (last sample {last})")


class CpuMeter:
    """CPU seconds of one process (user + system) between marks."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)

    def now(self) -> float:
        t = self.proc.cpu_times()
        return float(t.user + t.system)


# ---------------------------------------------------------------------------------------------- bare loop
def _usage() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def _bare(op: str, jobs: list[dict[str, Any]], concurrency: int, timeout_s: float) -> dict[str, Any]:
    """The pyasic calls the agent makes for `op`, on miner objects built from stored identities, and nothing else."""
    from hashflex.drivers.asic import build_miner  # applies the same pyasic patches the agent runs with

    miners = [(job, build_miner(job["driver_class"], job["ip"])) for job in jobs]
    slots = asyncio.Semaphore(concurrency)

    async def one(job: dict[str, Any], miner: Any) -> bool:
        async with slots:
            try:
                async with asyncio.timeout(timeout_s):
                    if op == "sleep":
                        ok = await miner.stop_mining()
                        if job["family"] == "antminer":  # the driver reads the work mode back
                            ok = str((await miner.web.get_miner_conf()).get("bitmain-work-mode")) == "1"
                    elif op == "wake":
                        ok = await miner.resume_mining()
                        if job["family"] == "antminer":
                            ok = str((await miner.web.get_miner_conf()).get("bitmain-work-mode")) == "0"
                    else:
                        ok = await miner.set_power_limit(int(job["watts"]))
                return bool(ok)
            except Exception:
                return False

    cpu0, t0 = _usage(), time.perf_counter()
    results = await asyncio.gather(*(one(job, m) for job, m in miners))
    wall, cpu = time.perf_counter() - t0, _usage() - cpu0
    return {"op": op, "calls": len(jobs), "ok": sum(results), "wall_s": wall, "cpu_s": cpu}


def _child(args: argparse.Namespace) -> None:
    import uvloop

    jobs = json.loads(Path(args.jobs).read_text())
    print(json.dumps(uvloop.run(_bare(args.child, jobs, args.concurrency, args.timeout))))


def run_bare(op: str, jobs: list[dict[str, Any]], concurrency: int, folder: Path) -> dict[str, Any]:
    path = folder / f"jobs-{op}.json"
    path.write_text(json.dumps(jobs))
    cmd = [
        sys.executable,
        "-m",
        "tests.bench.bench_control",
        "--child",
        op,
        "--jobs",
        str(path),
        "--concurrency",
        str(concurrency),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"bare loop {op} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def bare_sleep_all(
    sim: Any, jobs: list[dict[str, Any]], concurrency: int, folder: Path, every_s: float
) -> dict[str, Any]:
    """The bare loop's sleeps for every miner, and the time until ground truth has every unit asleep."""
    rec = Recorder(sim, every_s=every_s).start()
    try:
        mark = time.time()
        result = run_bare("sleep", jobs, concurrency, folder)
        asleep_at = rec.wait(mark, lambda s: s.sleeping_at_standby == len(jobs), 300, "bare loop: every unit asleep")
        result["truth_s"] = asleep_at.at - mark
    finally:
        rec.stop()
    return result


# ---------------------------------------------------------------------------------------------- planners
def stock_views(identities: list[Any]) -> list[Any]:
    """Every miner hashing at its stock setting, never limited, free to sleep: a fresh site."""
    from hashflex.agent.core.model import MinerState, MinerView

    return [
        MinerView(
            id=i.ip,
            family=i.family,
            capability=i.capability,
            nominal_w=i.nominal_w,
            nominal_ths=i.nominal_ths,
            state=MinerState.HASHING,
            power_w=i.nominal_w,
            commanded_w=None,
            last_transition=-1e9,
        )
        for i in identities
    ]


def plan_both(views: list[Any], target_kw: float, cap_kw: float) -> tuple[Any, Any, float, float]:
    """plan_sleep_only and plan on the same inputs (the agent's headroom), with their planning times."""
    from hashflex.agent.core.circuits import CircuitTree
    from hashflex.agent.core.planning import PlannerRules, plan, plan_sleep_only

    rules = PlannerRules(min_on_s=0, min_off_s=0, headroom_pct=1.0)
    tree = CircuitTree(cap_kw, [])
    t0 = time.perf_counter()
    base = plan_sleep_only(target_kw, views, tree, rules, 0.0, wake_budget=len(views))
    t1 = time.perf_counter()
    best = plan(target_kw, views, tree, rules, 0.0, wake_budget=len(views))
    t2 = time.perf_counter()
    return base, best, (t1 - t0) * 1000, (t2 - t1) * 1000


# ---------------------------------------------------------------------------------------------- the agent
def actions_since(agent: Any, since: float) -> list[dict[str, Any]]:
    return [a for a in agent.log_events("actions") if ts_of(a["timestamp"]) >= since]


def ticks_between(agent: Any, start: float, end: float) -> list[dict[str, Any]]:
    return [t for t in agent.log_events("tick") if start <= ts_of(t["timestamp"]) <= end]


def dispatch_doc(agent: Any, dispatch_id: str) -> dict[str, Any]:
    for d in agent.ok("dispatches", {"all": True})["dispatches"]:
        if d["id"] == dispatch_id:
            return dict(d)
    raise KeyError(dispatch_id)


def wait_settled(agent: Any, since: float, timeout: float, settle_s: float) -> list[dict[str, Any]]:
    """The command batches after `since`, once none has gone out for `settle_s` and nothing is in flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batches = actions_since(agent, since)
        status = agent.status()
        last = max((ts_of(b["timestamp"]) for b in batches), default=since)
        if batches and status["in_flight"] == 0 and time.time() - last >= settle_s:
            return batches
        time.sleep(0.5)
    raise TimeoutError("the agent kept sending commands")


def ops_total(batches: list[dict[str, Any]], op: str, outcome: str | None = None) -> int:
    total = 0
    for b in batches:
        for got, n in b["by_op"].get(op, {}).items():
            if outcome is None or got == outcome:
                total += n
    return total


def bench_size(n: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from hashflex.agent.io.store import Store
    from hashflex.sim.testing import SimProcess
    from tests.agent_harness import AgentProcess, write_agent_config

    out: dict[str, Any] = {"miners": n}
    # sweep period and tick as configs/demo/site-10k.yaml has them at 10,000 miners (a sweep takes seconds there)
    interval = max(2.0, n / 1000)
    tick = max(1.0, n / 2000)
    # a plan is settled when no batch has gone out for two sweeps (each round of the re-plan follows a sweep)
    settle = 2 * interval + tick + 2.0
    print(f"\n== {n} miners: starting the simulator", flush=True)
    with SimProcess(miners=n, mix=args.mix, base_ip=BASE_IP, seed=7, extra_args=["--wake-s", str(args.wake_s)]) as sim:
        truth = sim.truth()
        full_kw = truth["site"]["power_w"] / 1000
        full_ths = truth["site"]["hashrate_ths"]
        out["full_kw"], out["full_ths"] = full_kw, full_ths
        t0 = time.perf_counter()
        sim.truth()
        out["truth_ms"] = (time.perf_counter() - t0) * 1000
        files = write_agent_config(
            folder / f"agent-{n}",
            sim.ips,
            cap_kw=round(full_kw * 1.1, 1),
            site_id=f"bench-{n}",
            overrides={
                "polling": {
                    "interval_s": interval,
                    "concurrency": args.concurrency,
                    "read_timeout_s": 4.0,
                    "command_timeout_s": 10.0,
                    "stale_after_s": max(30.0, 4 * interval),
                    "identify_concurrency": 128,
                    "identify_timeout_s": 30.0,
                },
                # no min on/off times and no wake stagger: the phases follow each other without waiting
                "control": {
                    "tick_s": tick,
                    "min_on_s": 0,
                    "min_off_s": 0,
                    "confirm_after_s": 30.0,
                    "wake": {"max_per_interval": n, "interval_s": 1.0},
                },
            },
        )
        print(f"   simulator up ({full_kw:.0f} kW, {full_ths:.0f} TH/s); starting the agent", flush=True)
        t0 = time.perf_counter()
        agent = AgentProcess.start(files, ready_timeout=600)
        out["agent_start_s"] = time.perf_counter() - t0
        rec = Recorder(sim, every_s=max(0.25, out["truth_ms"] / 1000 * 10))
        rec.agent_pid = agent.proc.pid
        rec.start()
        cpu = CpuMeter(agent.proc.pid)
        try:
            status = agent.status()
            assert status["miners"]["unreachable"] == 0, status["miners"]
            # steady state: sweeps and ticks only
            c0, w0 = cpu.now(), time.time()
            time.sleep(max(10.0, 2 * interval))
            out["idle_cpu_pct"] = 100 * (cpu.now() - c0) / (time.time() - w0)

            # ------------------------------------------------------------------ 1. curtail to 0 kW
            print("   phase 1: curtail everything", flush=True)
            c0 = cpu.now()
            reply = agent.request("dispatch", agent.signed({"id": "bench-curtail", "target_kw": 0}))
            assert reply.is_ok, reply
            received = ts_of(reply.data["dispatch"]["received_at"])
            asleep = rec.wait(received, lambda s: s.sleeping_at_standby == n, 300, "every unit asleep")
            batches = wait_settled(agent, received, 300, settle)
            fast = batches[0]
            out["curtail"] = {
                "sleeps": ops_total(batches, "sleep"),
                "sleeps_ok": ops_total(batches, "sleep", "ok"),
                "ack_s": ts_of(fast["timestamp"]) - received,
                "batch_s": fast["dur_ms"] / 1000,
                "truth_s": asleep.at - received,
                "cpu_s": cpu.now() - c0,
                "batches": len(batches),
                "wall_s": time.time() - received,
            }
            d = dispatch_doc(agent, "bench-curtail")
            out["curtail"]["commands_sent_s"] = ts_of(d["commands_sent_at"]) - received

            # ------------------------------------------------------------------ 2. restore
            print("   phase 2: restore", flush=True)
            reply = agent.request("cancel", agent.signed({"id": "bench-curtail-x", "dispatch_id": "bench-curtail"}))
            assert reply.is_ok, reply
            back_from = time.time()
            rec.wait(
                back_from, lambda s: s.states.get("hashing", 0) == n and s.kw >= 0.97 * full_kw, 600, "the site back up"
            )
            wait_settled(agent, back_from, 300, settle)

            # ------------------------------------------------------------------ 3. re-plan to 60 %
            print("   phase 3: re-plan to 60 %", flush=True)
            target = round(full_kw * REPLAN_SHARE, 1)
            c0 = cpu.now()
            reply = agent.request("dispatch", agent.signed({"id": "bench-60", "target_kw": target}))
            assert reply.is_ok, reply
            received = ts_of(reply.data["dispatch"]["received_at"])
            met = rec.wait(received, lambda s: s.kw <= target, 300, f"<= {target} kW")
            batches = wait_settled(agent, received, 600, settle)
            last = max(batches, key=lambda b: ts_of(b["timestamp"]))
            first_limits = next((b for b in batches if "set_power" in b["by_op"]), None)
            status = agent.status()
            ticks = ticks_between(agent, received, time.time())
            plan_ms = [float(t["plan_ms"]) for t in ticks]
            opt_ms = [float(t["plan_ms"]) for t in ticks if t["method"] == "optimal"]
            time.sleep(2 * args.wake_s)  # woken units reach full power; then read the hashrate the plan keeps
            end_truth = rec.sample()
            out["replan"] = {
                "target_kw": target,
                "truth_s": met.at - received,
                "fast_ack_s": ts_of(batches[0]["timestamp"]) - received,
                "applied_s": ts_of(last["timestamp"]) - received,
                "batches": len(batches),
                "first_limits_s": None if first_limits is None else ts_of(first_limits["timestamp"]) - received,
                "first_limits": 0 if first_limits is None else ops_total([first_limits], "set_power"),
                "by_op": {op: ops_total(batches, op) for op in ("sleep", "wake", "set_power")},
                "failed": sum(b["failed_total"] for b in batches),
                "batch_s": [round(b["dur_ms"] / 1000, 2) for b in batches],
                "set_power_batch_s": sum(b["dur_ms"] / 1000 for b in batches if "set_power" in b["by_op"]),
                "plan_ms_median": statistics.median(plan_ms),
                "plan_ms_max": max(plan_ms),
                "optimal_plan_ms_max": max(opt_ms) if opt_ms else None,
                "tick_ms_max": max(float(t["dur_ms"]) for t in ticks),
                "cpu_s": cpu.now() - c0,
                "expected_ths": status["plan"]["expected_ths"],
                "baseline_ths": status["plan"]["baseline_ths"],
                "method": status["plan"]["method"],
                "truth_kw": end_truth.kw,
                "truth_ths": end_truth.ths,
                "truth_max_kw_after_met": max(s.kw for s in rec.samples if s.at >= met.at),
            }
            out["rss_peak_mib"] = rec.rss_peak_mib
        finally:
            rec.stop()
            agent.stop(timeout=120)

        # ---------------------------------------------------------------------- bare loop
        store = Store.open(files.state_dir / "hashflex.db")
        identities = {i.ip: i for i in store.load_identities()}
        store.close()
        limits = {
            m["ip"]: m["power_limit_w"]
            for m in sim.truth()["miners"]
            if m["state"] == "hashing"
            and m["power_limit_w"]
            and m["family"] != "antminer"
            and m["power_limit_w"] < m["nominal_w"] - 1
        }
        jobs = [{"ip": ip, "driver_class": i.driver_class, "family": str(i.family)} for ip, i in identities.items()]
        print("   bare loop: the agent's limits again, then sleep everything", flush=True)
        limit_jobs = [{**j, "watts": limits[j["ip"]]} for j in jobs if j["ip"] in limits]
        # ground truth is sampled as during the agent's run, so both share the machine with the same load
        every_s = max(0.25, out["truth_ms"] / 1000 * 10)
        bare_limit = run_bare("limit", limit_jobs, args.concurrency, folder)
        bare_sleep = bare_sleep_all(sim, jobs, args.concurrency, folder, every_s)
    # The agent's phase 1 was the first privileged command its simulator ever saw: every LuxOS miner needed a
    # logon, every Whatsminer its salt. The sleeps above found sessions the agent left behind. Like for like, the
    # same sleeps on a fresh simulator, where no client has logged on yet.
    print("   bare loop: sleep everything on a fresh site (no sessions yet, as the agent found it)", flush=True)
    with SimProcess(miners=n, mix=args.mix, base_ip=BASE_IP, seed=7, extra_args=["--wake-s", str(args.wake_s)]) as sim:
        bare_cold = bare_sleep_all(sim, jobs, args.concurrency, folder, every_s)
    out["bare"] = {"sleep": bare_cold, "sleep_warm": bare_sleep, "limit": bare_limit}

    # -------------------------------------------------------------------------- the sleep-only baseline
    # The same target on a fresh site at stock settings, planned by plan_sleep_only and carried out by the bare
    # loop: the ground-truth hashrate the agent's plan is compared with (and both planners' own estimates).
    print("   baseline: plan_sleep_only on a fresh site, applied by the bare loop", flush=True)
    views = stock_views(list(identities.values()))
    base_plan, opt_plan, base_plan_ms, opt_plan_ms = plan_both(views, out["replan"]["target_kw"], out["full_kw"] * 1.1)
    out["model"] = {
        "baseline_ths": base_plan.expected_ths,
        "optimal_ths": opt_plan.expected_ths,
        "baseline_ms": base_plan_ms,
        "optimal_ms": opt_plan_ms,
    }
    to_sleep = {ip for ip, a in base_plan.actions.items() if isinstance(a, SleepAction)}
    with SimProcess(miners=n, mix=args.mix, base_ip=BASE_IP, seed=7, extra_args=["--wake-s", str(args.wake_s)]) as sim:
        run_bare("sleep", [j for j in jobs if j["ip"] in to_sleep], args.concurrency, folder)
        time.sleep(8.0)  # the simulator's 4 s power-down ramp, and a margin
        truth = sim.truth()
        out["baseline_truth"] = {
            "kw": truth["site"]["power_w"] / 1000,
            "ths": truth["site"]["hashrate_ths"],
            "asleep": len(to_sleep),
        }
    return out


# ---------------------------------------------------------------------------------------------- report
def report(results: list[dict[str, Any]], concurrency: int) -> None:
    def col(fmt: Callable[[dict[str, Any]], str]) -> str:
        return "".join(f" {fmt(r):>14} |" for r in results)

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b > 0 else "-"

    rows: list[tuple[str, Callable[[dict[str, Any]], str], str]] = [
        (
            "curtail to 0 kW: sleeps sent / acknowledged",
            lambda r: f"{r['curtail']['sleeps']} / {r['curtail']['sleeps_ok']}",
            "",
        ),
        ("curtail: new target -> all acknowledged, s", lambda r: f"{r['curtail']['ack_s']:.2f}", "<= 3 s"),
        ("curtail: agent's batch (actuator), s", lambda r: f"{r['curtail']['batch_s']:.2f}", ""),
        ("curtail: bare loop, same calls, fresh site, s", lambda r: f"{r['bare']['sleep']['wall_s']:.2f}", ""),
        ("curtail: bare loop, sessions already open, s", lambda r: f"{r['bare']['sleep_warm']['wall_s']:.2f}", ""),
        (
            "curtail: agent (target -> acked) / bare loop",
            lambda r: ratio(r["curtail"]["ack_s"], r["bare"]["sleep"]["wall_s"]),
            "<= 1.2x",
        ),
        ("curtail: new target -> truth at standby floor, s", lambda r: f"{r['curtail']['truth_s']:.2f}", ""),
        ("re-plan to 60 %: new target -> truth <= target, s", lambda r: f"{r['replan']['truth_s']:.2f}", ""),
        (
            "re-plan: -> first power limits acknowledged, s (n)",
            lambda r: f"{r['replan']['first_limits_s']:.2f} ({r['replan']['first_limits']})",
            "<= 10 s",
        ),
        ("re-plan: -> last command acknowledged, s", lambda r: f"{r['replan']['applied_s']:.2f}", ""),
        (
            "re-plan: commands sleep / wake / limit",
            lambda r: " / ".join(str(r["replan"]["by_op"][k]) for k in ("sleep", "wake", "set_power")),
            "",
        ),
        ("re-plan: agent's limit batches, s", lambda r: f"{r['replan']['set_power_batch_s']:.2f}", ""),
        (
            "re-plan: bare loop, the final limits, s (n)",
            lambda r: f"{r['bare']['limit']['wall_s']:.2f} ({r['bare']['limit']['calls']})",
            "",
        ),
        (
            "planning per tick (agent log), median / max ms",
            lambda r: f"{r['replan']['plan_ms_median']:.0f} / {r['replan']['plan_ms_max']:.0f}",
            "<= 100 ms",
        ),
        (
            "plan() / plan_sleep_only() on a fresh site, ms",
            lambda r: f"{r['model']['optimal_ms']:.0f} / {r['model']['baseline_ms']:.0f}",
            "",
        ),
        (
            "hashrate at 60 %, planned: plan vs sleep-only",
            lambda r: f"{100 * r['model']['optimal_ths'] / r['model']['baseline_ths'] - 100:+.1f} %",
            "",
        ),
        (
            "hashrate at 60 %, truth: agent vs sleep-only",
            lambda r: f"{100 * r['replan']['truth_ths'] / r['baseline_truth']['ths'] - 100:+.1f} %",
            "",
        ),
        (
            "truth kW: agent / sleep-only (target)",
            lambda r: (
                f"{r['replan']['truth_kw']:.0f} / {r['baseline_truth']['kw']:.0f} ({r['replan']['target_kw']:.0f})"
            ),
            "",
        ),
        ("agent CPU, steady sweeps, % of a core", lambda r: f"{r['idle_cpu_pct']:.0f}", ""),
        (
            "agent CPU, curtail / re-plan phases, s",
            lambda r: f"{r['curtail']['cpu_s']:.1f} / {r['replan']['cpu_s']:.1f}",
            "",
        ),
        ("agent peak RSS, MiB", lambda r: f"{r['rss_peak_mib']:.0f}", ""),
        ("agent start-up incl. discovery, s", lambda r: f"{r['agent_start_s']:.1f}", ""),
    ]
    print(f"\nconcurrency {concurrency} (agent and bare loop); 2-core machine shared by simulator, agent and bench")
    header = "| figure | " + " | ".join(f"{r['miners']:,} miners" for r in results) + " | target (10,000) |"
    print(header)
    print("|---|" + "---:|" * len(results) + "---|")
    for label, fmt, target in rows:
        try:
            cells = " | ".join(fmt(r) for r in results)
        except (KeyError, TypeError, ZeroDivisionError):
            cells = " | ".join("-" for _ in results)
        print(f"| {label} | {cells} | {target} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--miners", default="1000,10000", help="comma-separated site sizes")
    parser.add_argument("--mix", default=MIX)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--wake-s", type=float, default=10.0, help="simulator: seconds from wake to full power")
    parser.add_argument("--json", help="also write the raw figures here")
    parser.add_argument("--keep", help="keep the agents' folders (config, state, log) here")
    parser.add_argument("--child", choices=["sleep", "wake", "limit"], help=argparse.SUPPRESS)
    parser.add_argument("--jobs", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    sizes = [int(x) for x in args.miners.split(",") if x.strip()]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-control-") as d:
        folder = Path(args.keep) if args.keep else Path(d)
        for n in sizes:
            results.append(bench_size(n, args, folder))
            print(json.dumps(results[-1], default=str), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    report(results, args.concurrency)


if __name__ == "__main__":
    main()
