"""Issue 11: the cap promise in the closed loop, judged by the simulator's ground truth (findings 1, 2 and 7).

Each test runs the real agent (`hashflex run`) against the simulated site over real TCP, on a scaled clock (the
simulator's `--speed K`, the agent's `--time-scale K`), with the fault that broke the promise:
- finding 1: miners refusing connections while the agent starts are held at a worst case, named in an alarm,
  counted in `status`, retried in the background, and the site stays under its cap when they come back;
- finding 2: miners behind a PDU that draw 30 % above their limit (and report it): the PDU is brought back under
  its circuit cap, and the worst case the agent reports is never below what it measures;
- finding 7: an agent starting on a site at twice its cap cuts to the cap, not to nothing.

Loopback range of this file: 127.120.0.0 - 127.123.255.255 (one /16 per test).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hashflex.sim.testing import SimProcess
from tests.agent_harness import AgentProcess, write_agent_config

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

SCALE = 10.0  # site seconds per wall second
SAMPLE_EVERY_S = 0.25
# Ground truth may sit this share of full power above a cap once the agent has acted: every simulated unit draws
# its setting x (1 ± 2 %) and a sleeping one 18-26 W where 20 W is counted (see test_scenarios.TOLERANCE_SHARE).
TOLERANCE_SHARE = 0.02


@dataclass
class Recorder:
    """GET /truth every SAMPLE_EVERY_S on a thread: (monotonic time, truth) pairs every assertion reads."""

    sim: SimProcess
    samples: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Recorder:
        self.samples.append((time.monotonic(), self.sim.truth()))
        self._thread = threading.Thread(target=self._run, name="truth", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            with contextlib.suppress(Exception):
                self.samples.append((time.monotonic(), self.sim.truth()))

    def since(self, start: float) -> list[tuple[float, dict[str, Any]]]:
        return [(t, doc) for t, doc in list(self.samples) if t >= start]


def kw_of(truth: dict[str, Any], ips: set[str] | None = None) -> float:
    return sum(float(m["power_w"]) for m in truth["miners"] if ips is None or m["ip"] in ips) / 1000.0


def worst(samples: list[tuple[float, dict[str, Any]]], ips: set[str] | None = None) -> float:
    assert samples, "no ground-truth samples"
    return max(kw_of(doc, ips) for _, doc in samples)


def wait(agent: AgentProcess, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    return agent.wait_for(predicate, timeout, interval=0.2, what=what)


def full_kw(sim: SimProcess) -> float:
    truth = sim.truth()
    assert all(m["state"] == "hashing" for m in truth["miners"]), "the site must start fully up"
    return kw_of(truth)


# ================================================================================ finding 1: silent at start
SILENT_MINERS = 12
SILENT_HELD_W = 4000.0  # miners.unknown_w: what each unidentified address counts at
# identification is retried 10, 20, 40, 60, 60 … site seconds apart: at x10 within 6 wall s, plus a sweep and a
# tick to put the miner under control; x2 for a loaded machine
IDENTIFIED_WITHIN_S = 20.0


def test_miners_silent_at_start_are_held_at_worst_case_then_identified_and_the_cap_holds(tmp_path: Path) -> None:
    k = SCALE
    with SimProcess(
        miners=SILENT_MINERS, mix="luxos:40,whatsminer:40,antminer:20", base_ip="127.120.0.1", seed=111, speed=k
    ) as sim:
        full = full_kw(sim)
        cap = round(0.8 * full, 1)
        tol = TOLERANCE_SHARE * full
        silent = [sim.ips[i] for i in (1, 4, 7, 10)]  # across the families; still hashing, refusing connections
        sim.set_faults({"mode": "refuse", "ips": silent})
        files = write_agent_config(
            tmp_path, sim.ips, cap_kw=cap, time_scale=k, overrides={"miners": {"unknown_w": SILENT_HELD_W}}
        )
        with AgentProcess.start(files, time_scale=k, ready_timeout=120) as agent, Recorder(sim) as rec:
            status = agent.status()
            # counted, not forgotten: 12 miners, 4 of them not identified (and so unreachable), an alarm names them
            assert status["miners"]["total"] == SILENT_MINERS, status["miners"]
            assert status["miners"]["unidentified"] == len(silent), status["miners"]
            assert status["miners"]["unreachable"] >= len(silent), status["miners"]
            alarm = next((a for a in status["alarms"] if a["key"] == "unidentified"), None)
            assert alarm is not None, status["alarms"]
            assert all(ip in alarm["message"] for ip in silent), alarm
            rows = {r["ip"]: r for r in agent.ok("miners", {"state": "unreachable"})["miners"]}
            assert set(silent) <= set(rows), rows.keys()
            # the plan holds room for them: the worst case counts each at unknown_w
            assert status["power_kw_worst_case"] <= cap + 1e-3, status
            wait(
                agent,
                lambda: (s := agent.status())["plan"] and s["power_kw_worst_case"] >= 4 * SILENT_HELD_W / 1000,
                10,
                "a plan that counts the silent addresses",
            )
            # the agent has cut what it sees to leave them room (their 4 x ~3.3 kW are still drawn meanwhile)
            time.sleep(3.0)
            # … then they answer again, still at full power
            back_at = time.monotonic()
            sim.set_faults({"mode": "clear"})
            wait(
                agent,
                lambda: agent.status()["miners"]["unidentified"] == 0,
                IDENTIFIED_WITHIN_S,
                "the silent miners identified in the background",
            )
            wait(
                agent,
                lambda: (
                    (s := agent.status())["miners"]["unreachable"] == 0
                    and "unidentified" not in {a["key"] for a in s["alarms"]}
                ),
                10,
                "all 12 reachable, the alarm cleared",
            )
            time.sleep(3.0)
            over = worst(rec.since(back_at))
            assert over <= cap + tol, f"site {over:.1f} kW > cap {cap:.1f} kW (+{tol:.1f}) once they came back"
            assert agent.status()["miners"]["total"] == SILENT_MINERS
            print(f"finding 1: worst {over:.1f} kW against a {cap:.1f} kW cap after the silent miners came back")


# ================================================================================ finding 2: drift behind a PDU
DRIFT_MINERS = 12
DRIFT_PCT = 30
# the drift shows in one sweep; the plan counts it at once; re-commands (2 x confirm_after_s = 12 site s) and the
# ignoring verdict follow; in wall seconds at x10, with margin for a loaded machine
DRIFT_SETTLE_S = 8.0
DRIFT_HOLD_S = 6.0


def test_miners_drifting_above_their_limit_behind_a_pdu_are_brought_under_its_cap(tmp_path: Path) -> None:
    k = SCALE
    with SimProcess(miners=DRIFT_MINERS, mix="whatsminer:50,luxos:50", base_ip="127.121.0.1", seed=121, speed=k) as sim:
        full = full_kw(sim)
        truth = sim.truth()
        pdu = {m["ip"] for m in truth["miners"] if m["family"] == "whatsminer"}
        assert len(pdu) == 6
        pdu_full = kw_of(truth, pdu)
        pdu_cap = round(0.8 * pdu_full, 1)
        tol = TOLERANCE_SHARE * pdu_full
        circuits = [{"id": "pdu1", "cap_kw": pdu_cap, "miners": sorted(pdu)}]
        files = write_agent_config(
            tmp_path, sim.ips, cap_kw=round(full * 1.1, 1), time_scale=k, overrides={"site": {"circuits": circuits}}
        )
        with AgentProcess.start(files, time_scale=k, ready_timeout=120) as agent, Recorder(sim) as rec:
            wait(agent, lambda: kw_of(sim.truth(), pdu) <= pdu_cap + tol, 15, "the PDU under its cap")
            time.sleep(2.0)
            drift_at = time.monotonic()
            sim.set_faults({"mode": "drift", "pct": DRIFT_PCT, "ips": sorted(pdu)})
            time.sleep(DRIFT_SETTLE_S)
            held_from = time.monotonic()
            time.sleep(DRIFT_HOLD_S)
            samples = rec.since(held_from)
            over = worst(samples, pdu)
            print(
                f"finding 2: PDU worst {over:.2f} kW against its {pdu_cap:.2f} kW cap (drift {DRIFT_PCT} %), "
                f"peak {worst(rec.since(drift_at), pdu):.2f} kW right after the drift began"
            )
            assert over <= pdu_cap + tol, f"PDU {over:.2f} kW > its cap {pdu_cap:.2f} kW (+{tol:.2f})"
            # the miners really drift: they draw 30 % above the limits the agent holds them to
            rows = {r["ip"]: r for r in agent.ok("miners", {})["miners"]}
            drifting = [
                r
                for ip, r in rows.items()
                if ip in pdu
                and r["state"] in ("hashing", "throttled")
                and r["limit_w"]
                and r["power_w"]
                and r["power_w"] > 1.2 * r["limit_w"]
            ]
            assert drifting, [(r["ip"], r["state"], r["limit_w"], r["power_w"]) for r in rows.values()]
            # … and what the agent reports as its worst case is never below what it measures
            for _ in range(10):
                s = agent.status()
                assert s["power_kw_worst_case"] + 1e-3 >= s["power_kw_measured"], s
                assert s["power_kw_worst_case"] + 1e-3 >= s["power_kw"], s
                time.sleep(0.2)


# ================================================================================ finding 7: start far above cap
START_MINERS = 20
START_SHARE = 0.5  # the cap is half of what the site draws when the agent starts
START_WAKE_S = 60.0  # simulator: a woken unit reaches full power in 60 site s (6 wall s at x10)
# the cut: one fan-out, a sweep, the 4-5 site s ramp; x3
START_MEET_WITHIN_S = 8.0
# back near the cap: min_off (5 site s), a wake-up (60 site s) and a few ticks, in wall s at x10, with margin
START_SERVICE_WITHIN_S = 15.0
# the plan's worst case sits at 99 % of the cap by then; ground truth at ~88 %: miners draw under the limits and
# presets they are counted at (stock Antminers report no watts and count at nominal). Before the fix: ~0 %.
START_SERVICE_SHARE = 0.8


def test_agent_starting_on_a_site_at_twice_its_cap_cuts_to_the_cap_not_to_nothing(tmp_path: Path) -> None:
    k = SCALE
    with SimProcess(
        miners=START_MINERS,
        mix="luxos:40,whatsminer:40,antminer:20",
        base_ip="127.122.0.1",
        seed=122,
        speed=k,
        extra_args=["--wake-s", str(START_WAKE_S)],
    ) as sim:
        full = full_kw(sim)
        cap = round(START_SHARE * full, 1)
        tol = TOLERANCE_SHARE * full
        files = write_agent_config(tmp_path, sim.ips, cap_kw=cap, time_scale=k)
        with Recorder(sim) as rec:
            started = time.monotonic()
            with AgentProcess.start(files, time_scale=k, ready_timeout=120) as agent:
                levels: list[float] = []
                deadline = started + START_SERVICE_WITHIN_S + 20
                met_at = None
                while time.monotonic() < deadline:
                    s = agent.status()
                    if s["planning_level_kw"] is not None:
                        levels.append(float(s["planning_level_kw"]))
                    if met_at is None and kw_of(sim.truth()) <= cap + tol:
                        met_at = time.monotonic()
                    if met_at is not None and time.monotonic() > met_at + START_SERVICE_WITHIN_S:
                        break
                    time.sleep(0.2)
                assert met_at is not None, "the site never came under its cap"
                assert met_at - started <= START_MEET_WITHIN_S + 60, met_at - started  # (+ agent start-up)
                # the level planned never dropped to nothing: the excess at start is what the first plan cuts
                assert min(levels) >= 0.9 * cap, f"planning level fell to {min(levels):.1f} kW (cap {cap:.1f} kW)"
                after = rec.since(met_at)
                most_asleep = max(sum(1 for m in doc["miners"] if m["state"] == "sleeping") for _, doc in after)
                assert most_asleep <= 0.75 * START_MINERS, f"{most_asleep} of {START_MINERS} miners asleep"
                assert worst(after) <= cap + tol
                end = rec.since(met_at + START_SERVICE_WITHIN_S - 3)
                low = min(kw_of(doc) for _, doc in end)
                print(
                    f"finding 7: cap {cap:.1f} kW met {met_at - started:.1f} s after start; lowest planning level "
                    f"{min(levels):.1f} kW; at most {most_asleep} asleep; {low:.1f} kW at the end"
                )
                assert low >= START_SERVICE_SHARE * cap, f"site at {low:.1f} kW, under 80 % of its {cap:.1f} kW cap"
