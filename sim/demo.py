"""`hashflex demo` (also `python -m hashflex.sim.demo`): a simulated site, the real agent driving it, and a short
scenario.

The demo stands where a grid operator and an observer would: it starts the simulated site (`python -m hashflex.sim`)
and the agent (`hashflex run`) as subprocesses, talks to the agent only through its control socket and `hashflex`
commands (grid commands signed with `hashflex sign`), and judges the result by the simulator's ground truth. It
never imports the agent. Site minutes pass in wall seconds (`--speed`): the simulator's physics and the agent's
clock run at the same pace.

The scenario, in site-local time (UTC+5, the site's evening):
  17:40  the grid operator sends a signed dispatch: hold the site at 40 % of its power until 17:50
  17:50  the dispatch ends: the agent wakes the site, no faster than its ramp limit
  18:00  the time-of-use window "evening-peak" from the site config holds the site at 65 % until 18:10
  18:10  the window ends: ramp back up
  18:16  the grid's frequency dips to 49.2 Hz for half a site minute: below 49.4 Hz the agent's frequency response
         sleeps a quarter of the miners at once (its pre-armed shed list), holds them while the frequency is low, and
         wakes them under the ramp limit once it has stayed above 49.8 Hz for a site minute

The site has a meter (the simulator's, on Modbus TCP): the agent controls at it (site.meter) and reads the grid
frequency from it.

It prints a live line per site minute (ground truth against cap and target, why the target is what it is, miners
by state) and the agent's own events, then writes to --out: site-power.png, audit-export.json (`hashflex audit
export`), timeline.csv (with frequency and metered power), frequency.csv (the meter read fast around the dip) and
summary.json, and verifies the audit chain (`hashflex audit verify`). Exit status: 0 when the site stayed under its
cap, the dip was shed and restored and the chain verifies, 1 when not, 2 when the demo could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ipaddress
import json
import math
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from rich.console import Console

from hashflex.contract.status import StatusDoc
from hashflex.sim.demo_notes import SleepOnlyBaseline, agent_notes
from hashflex.sim.demo_support import (
    DEMO_KEY,
    TRUTH_STATES,
    AgentLink,
    AgentRun,
    DemoError,
    DipView,
    Mark,
    MeterPoint,
    Ramp,
    Sample,
    SiteClock,
    Span,
    iso,
    local_today,
    make_sample,
    public_key_for,
    run_hashflex,
    sign,
    write_agent_config,
)
from hashflex.sim.testing import SimError, SimProcess

SITE_TIMEZONE = "Asia/Karachi"  # the site's zone (site.timezone): its windows are in this wall time
UTC_OFFSET_H = 5.0  # Asia/Karachi's offset (no daylight saving), for the demo's own clock and plot
SAMPLE_EVERY_S = 0.25  # wall seconds between looks at the site
FAMILY_NAMES = {"luxos": "LuxOS", "whatsminer": "Whatsminer", "antminer": "stock Antminer"}
SIGN_AHEAD_S = 3.0  # wall seconds before the dispatch is due that the grid side signs it
MARKER = ".hashflex-demo"  # in --out: the folder is the demo's own, so its state/ may be replaced


@dataclass(frozen=True, slots=True)
class Scenario:
    """When things happen, in site-local HH:MM (the window is written into the site config as such)."""

    miners: int
    speed: float
    launch: str  # the agent starts (the site is at full power)
    dispatch: str  # the grid operator's dispatch arrives ...
    dispatch_end: str  # ... and holds until here
    window_start: str  # the time-of-use window from the config
    window_end: str
    end: str
    dispatch_share: float = 0.40  # dispatch level, share of the site's full power
    window_share: float = 0.65  # window level, share of full power
    ramp_share_per_min: float = 0.30  # control.ramp_up_kw_per_min, share of full power
    dip: str = ""  # the grid frequency dips (site-local HH:MM) ...
    dip_hz: float = 49.2  # ... to this ...
    dip_s: float = 30.0  # ... for this many site seconds, then back to 50 Hz
    below_hz: float = 49.4  # frequency_response: the stage trips below this ...
    for_s: float = 0.2  # ... for this long (site s) ...
    shed_pct: float = 25.0  # ... and sheds this share of the miners' draw
    restore_above_hz: float = 49.8  # the event ends once above this ...
    restore_after_s: float = 60.0  # ... for this long (site s); then the site comes back under the ramp


FULL = Scenario(
    miners=300,
    speed=30,
    launch="17:36",
    dispatch="17:40",
    dispatch_end="17:50",
    window_start="18:00",
    window_end="18:10",
    dip="18:16",
    end="18:23",
)
SHORT = Scenario(
    miners=120,
    speed=50,
    launch="17:51",
    dispatch="17:55",
    dispatch_end="18:00",
    window_start="18:04",
    window_end="18:08",
    dip="18:13",
    end="18:20",
)
METER_PORT = 5020
METER_SIM = {"cooling_share": 0.03, "base_kw": 2.0, "update_ms": 20.0}  # measuring interval: 1 site s at 50x
TRACE_EVERY_S = 0.04  # wall seconds between fast looks at the meter around the dip (2 site s at 50x)
FREQUENCY_SHED_WITHIN_S = 15.0  # site s from the crossing to the stage's kW gone at the meter (a few sweeps)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hashflex demo",
        description=(
            "Run a simulated mining site and the hashflex agent on it through a short grid scenario (a dispatch, a "
            "time-of-use window, ramps back up); print what the agent does and why; write a plot of ground-truth site "
            "power against cap and target, and the audit export, to --out."
        ),
    )
    p.add_argument(
        "--miners",
        type=int,
        default=None,
        help=f"simulated miners (default {FULL.miners}; {SHORT.miners} with --short)",
    )
    p.add_argument("--mix", default="luxos:40,whatsminer:40,antminer:20", help="family weights, as `hashflex sim`")
    p.add_argument("--base-ip", default="127.1.0.1", help="first loopback address of the simulated miners")
    p.add_argument(
        "--meter",
        default=None,
        help=f"address:port of the simulated site meter (default: the base-ip's .250.250, port {METER_PORT})",
    )
    p.add_argument("--no-dip", action="store_true", help="leave out the grid frequency dip (and the site meter)")
    p.add_argument("--seed", type=int, default=7, help="simulator seed")
    p.add_argument(
        "--speed",
        type=float,
        default=None,
        help=f"site seconds per wall second (default {FULL.speed:g}; {SHORT.speed:g} with --short)",
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default ./demo-out)")
    p.add_argument("--short", action="store_true", help="a shorter scenario on a smaller site (about 40 s)")
    p.add_argument(
        "--grid-key",
        type=Path,
        default=DEMO_KEY,
        help="grid operator's private key (default: the demo key in configs/demo/keys; its .pub must sit next to it)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.02,
        help="share of the cap ground truth may exceed it by "
        "before the demo fails (PSU spread the agent cannot see; default 0.02)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scenario = SHORT if args.short else FULL
    scenario = replace(
        scenario,
        miners=args.miners or scenario.miners,
        speed=args.speed or scenario.speed,
        dip="" if args.no_dip else scenario.dip,
    )
    console = Console(highlight=False, soft_wrap=True)
    if scenario.miners < 10:
        console.print("[red]hashflex demo: --miners must be at least 10[/]")
        return 2
    if not 0.0 <= args.tolerance <= 0.2:
        console.print("[red]hashflex demo: --tolerance is a share of the cap between 0 and 0.2 (e.g. 0.02)[/]")
        return 2
    if not scenario.speed >= 2:
        console.print("[red]hashflex demo: --speed must be at least 2 (the scenario is written in site minutes)[/]")
        return 2
    try:
        return Demo(args, scenario, console).run()
    except DemoError as exc:
        console.print(f"[bold red]hashflex demo: {exc}[/]")
        return 2
    except KeyboardInterrupt:
        console.print("hashflex demo: interrupted")
        return 130


# ---------------------------------------------------------------------------------------------- recording
@dataclass
class Recorder:
    """Looks at the site every SAMPLE_EVERY_S on a thread: ground truth, and the agent's status at that moment."""

    sim: SimProcess
    link: AgentLink
    clock: SiteClock
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Recorder:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="demo-recorder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.link.close()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            with contextlib.suppress(Exception):  # one slow answer must not end the record
                self.sample()

    def sample(self) -> None:
        truth = self.sim.truth()
        status: StatusDoc | None = None
        with contextlib.suppress(OSError, ValueError, DemoError):
            status = cast(StatusDoc, self.link.ok("status"))  # the agent's answer to `status`
        self.samples.append(make_sample(self.clock.now(), truth, status))

    def latest(self) -> Sample:
        return self.samples[-1]


@dataclass
class MeterTrace:
    """Fast looks at the meter (GET /meter) from just before the dip until the end: the 0.25 s looks of the
    Recorder are 12 site seconds apart at 50x, too coarse to time a shed."""

    sim: SimProcess
    clock: SiteClock
    points: list[MeterPoint] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> MeterTrace:
        self._thread = threading.Thread(target=self._run, name="demo-meter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(TRACE_EVERY_S):
            with contextlib.suppress(Exception):  # one slow answer must not end the trace
                before = self.clock.now()
                m = self.sim.meter_truth()
                at = (before + self.clock.now()) / 2.0  # the answer's moment, within a site second at 50x
                self.points.append(
                    MeterPoint(at, float(m["hz"]), float(m["power_w"]) / 1000.0, float(m["it_w"]) / 1000.0)
                )


# ---------------------------------------------------------------------------------------------- the demo
class Demo:
    def __init__(self, args: argparse.Namespace, scenario: Scenario, console: Console) -> None:
        self.args = args
        self.sc = scenario
        self.console = console
        self.out: Path = args.out.resolve()
        self.key: Path = args.grid_key.resolve()
        self.marks: list[Mark] = []
        self.spans: list[Span] = []
        self.ramps: list[Ramp] = []
        self.seen_events: set[str] = set()
        self.dispatch_sent_at: float | None = None
        self.signing: Future[dict[str, Any]] | None = None
        self.started = time.monotonic()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="demo-grid")
        self.trace: MeterTrace | None = None
        self.dip_at: float | None = None  # when the grid event was sent (site clock)

    # ------------------------------------------------------------------------------------------ set-up
    def prepare_out(self) -> None:
        if not self.key.is_file():
            raise DemoError(f"no grid key at {self.key}: pass --grid-key FILE (make one with `hashflex keygen`)")
        self.pub = public_key_for(self.key)
        self.out.mkdir(parents=True, exist_ok=True)
        state = self.out / "state"
        if state.exists():
            if not (self.out / MARKER).exists():
                raise DemoError(f"{state} exists and was not made by the demo: pick another --out")
            shutil.rmtree(state)
        (self.out / MARKER).write_text("written by `hashflex demo`; its state/ is replaced on each run\n")

    def run(self) -> int:
        self.prepare_out()
        sc, console = self.sc, self.console
        console.print(
            f"[bold]hashflex demo[/]: {sc.miners} simulated miners ({self.args.mix}), {sc.speed:g}× speed "
            f"(a site minute takes {60 / sc.speed:.1f} s); output in {self.out}"
        )
        extra: list[str] = []
        if sc.dip:
            extra = [
                "--meter",
                meter_address(self.args.meter, self.args.base_ip),
                "--meter-config",
                json.dumps(METER_SIM),
            ]
        try:
            sim = SimProcess(
                sc.miners,
                mix=self.args.mix,
                base_ip=self.args.base_ip,
                seed=self.args.seed,
                speed=sc.speed,
                extra_args=extra,
            ).start(timeout=120)
        except SimError as exc:
            raise DemoError(
                f"the simulated site did not start ({exc}); another simulator may hold "
                f"{self.args.base_ip}: try --base-ip 127.2.0.1"
            ) from None
        with tempfile.TemporaryDirectory(prefix="hashflex-demo-") as runtime:  # a short path for the socket
            try:
                self.recorder = self.play(sim, Path(runtime) / "control.sock")
            finally:
                sim.stop()
        return self.finish()

    def plan_site(self, sim: SimProcess) -> None:
        truth = sim.truth()
        self.full_kw = float(truth["site"]["power_w"]) / 1000.0
        self.full_ths = float(truth["site"]["hashrate_ths"])
        self.baseline = SleepOnlyBaseline.from_truth(truth)  # the site at full power: each miner at stock
        families: dict[str, int] = {}
        for m in truth["miners"]:
            families[m["family"]] = families.get(m["family"], 0) + 1
        self.families = families
        # the licensed cap sits a little above what the site draws at stock settings: never crossed, even by ramps
        self.cap_kw = math.ceil(self.full_kw * 1.08 / 10.0) * 10.0
        self.dispatch_kw = round(self.full_kw * self.sc.dispatch_share, 1)
        self.window_kw = round(self.full_kw * self.sc.window_share, 1)
        self.ramp_kw_per_min = self.full_kw * self.sc.ramp_share_per_min
        now = time.time()
        names = (
            "launch",
            "dispatch",
            "dispatch_end",
            "window_start",
            "window_end",
            "end",
            *(("dip",) if self.sc.dip else ()),
        )
        at = {name: local_today(getattr(self.sc, name), UTC_OFFSET_H, now) for name in names}
        if at["window_end"] < at["window_start"] or at["end"] < at["launch"]:
            raise DemoError("the scenario must not cross midnight")
        if at["end"] > now:  # keep the site's evening in the past: every record then has a time that has been
            at = {name: ts - 86400.0 for name, ts in at.items()}
        self.at = at
        self.spans.append(
            Span(
                at["window_start"],
                at["window_end"],
                f"time-of-use window ≤ {self.window_kw:,.0f} kW",
                "schedule",
                self.window_kw,
            )
        )
        console = self.console
        console.print(
            f"site: {', '.join(f'{n} {FAMILY_NAMES.get(fam, fam)}' for fam, n in families.items())}; "
            f"{self.full_kw:,.1f} kW at stock settings; licensed cap {self.cap_kw:,.0f} kW"
        )
        if "meter" in truth:
            console.print(
                f"site meter on {truth['meter']['address']} (Modbus TCP): "
                f"{truth['meter']['power_w'] / 1000.0:,.1f} kW with cooling and base load, "
                f"{truth['meter']['hz']:.2f} Hz; the agent controls at the meter"
            )

    def play(self, sim: SimProcess, socket_path: Path) -> Recorder:
        self.plan_site(sim)
        sc, at = self.sc, self.at
        self.config = self.out / "site.yaml"
        window = {"name": "evening-peak", "start": sc.window_start, "end": sc.window_end, "target_kw": self.window_kw}
        meter = frequency = None
        if sc.dip:
            host, _, port = sim.meter.rpartition(":")
            beat = 0.5 * sc.speed  # site seconds in half a wall second, as the config's other timers
            meter = {
                "host": host,
                "port": int(port),
                "map": "sunspec",
                "poll_s": 0.05,
                "stale_after_s": 4 * beat,
                "frozen_after_s": 60 * beat,
                "non_miner_allowance_kw": round(0.08 * self.full_kw + 2.0, 1),
                "non_miner_window_s": 10 * beat,
                "cooling_pct": METER_SIM["cooling_share"] * 100.0,
            }
            frequency = {
                "stages": [{"below_hz": sc.below_hz, "for_s": sc.for_s, "shed": f"{sc.shed_pct:g}%"}],
                "restore_above_hz": sc.restore_above_hz,
                "restore_after_s": sc.restore_after_s,
                "poll_s": 0.05,
            }
        write_agent_config(
            self.config,
            ips=sim.ips,
            cap_kw=self.cap_kw,
            scale=sc.speed,
            ramp_kw_per_min=self.ramp_kw_per_min,
            window=window,
            grid_pub=self.pub,
            state_dir=self.out / "state",
            socket_path=socket_path,
            timezone=SITE_TIMEZONE,
            meter=meter,
            frequency=frequency,
        )
        self.clock = clock = SiteClock.reading(
            at["launch"], wall_at=time.time(), scale=sc.speed, utc_offset_h=UTC_OFFSET_H
        )
        agent = AgentRun(self.config, clock, socket_path, self.out / "agent.log")
        recorder: Recorder | None = None
        link = AgentLink(socket_path)
        try:
            agent.wait_ready(timeout=120)
            self.ready_at = clock.now()
            self.console.print(
                f"agent ready at {clock.hhmm(self.ready_at, True)} site time "
                f"({time.monotonic() - self.started:.1f} s into the demo)\n"
            )
            self.print_header()
            recorder = Recorder(sim, AgentLink(socket_path), clock).start()
            actions: list[tuple[float, Callable[[], None]]] = [
                (at["dispatch"] - SIGN_AHEAD_S * sc.speed, self.sign_dispatch),
                (at["dispatch"], lambda: self.send_dispatch(link)),
                (at["dispatch_end"], self.dispatch_ends),
                (at["window_start"], self.window_starts),
                (at["window_end"], self.window_ends),
            ]
            if sc.dip:
                actions += [(at["dip"] - 30.0, lambda: self.trace_meter(sim)), (at["dip"], lambda: self.dip(sim))]
                actions.sort(key=lambda a: a[0])
            next_line = math.floor(clock.now() / 60.0) * 60.0 + 60.0
            while clock.now() < at["end"]:
                if not agent.alive():
                    raise DemoError(f"the agent stopped during the demo; see {agent.log_path}:\n{agent.tail()}")
                while actions and clock.now() >= actions[0][0]:
                    actions.pop(0)[1]()
                self.print_events(link)
                latest = recorder.latest()
                if latest.site_ts >= next_line:  # one line per site minute, from a sample taken within it
                    self.print_line(latest)
                    next_line = math.floor(latest.site_ts / 60.0) * 60.0 + 60.0
                time.sleep(0.1)
            self.print_events(link)
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            link.close()
            if self.trace is not None:
                self.trace.stop()
            if recorder is not None:
                recorder.stop()
            code = agent.stop()
            if code not in (0, None):
                self.console.print(f"[yellow]the agent exited with {code}; see {agent.log_path}[/]")
        return recorder

    # ------------------------------------------------------------------------------------------ the scenario
    def say(self, when: float, text: str) -> None:
        self.console.print(f"[bold magenta]▶ {self.clock.hhmm(when)}  {text}[/]")

    def sign_dispatch(self) -> None:
        """Sign ahead of time: `hashflex sign` takes about a wall second, a site minute at high speed. The command
        is issued for the moment it will be sent (the agent refuses commands issued in its future), or now when
        the agent came up late."""
        at = self.at
        issued = max(at["dispatch"], self.clock.now())
        doc = {
            "id": "grid-demo-0001",
            "issued_at": iso(issued),
            "target_kw": self.dispatch_kw,
            "end": iso(at["dispatch_end"]),
        }
        self.signing = self.pool.submit(sign, self.key, doc)

    def send_dispatch(self, link: AgentLink) -> None:
        at, clock = self.at, self.clock
        self.say(
            at["dispatch"],
            f"grid operator: signed dispatch — hold the site at or under "
            f"{self.dispatch_kw:,.1f} kW until {clock.hhmm(at['dispatch_end'])} (sent over the agent's socket; "
            "MQTT on a real site)",
        )
        if self.signing is None:
            self.sign_dispatch()
        assert self.signing is not None
        signed = self.signing.result(timeout=60)
        sent = clock.now()
        reply = link.request("dispatch", signed)
        if reply.get("status") != "ok":
            error = reply.get("error") or {}
            raise DemoError(f"the agent refused the dispatch: {error.get('message')} [{error.get('code')}]")
        self.dispatch_sent_at = sent
        self.marks.append(Mark(sent, "grid dispatch sent"))
        self.spans.append(
            Span(sent, at["dispatch_end"], f"grid dispatch ≤ {self.dispatch_kw:,.0f} kW", "grid", self.dispatch_kw)
        )

    def dispatch_ends(self) -> None:
        self.say(
            self.at["dispatch_end"],
            f"the dispatch ends: the agent wakes the site, at most "
            f"{self.ramp_kw_per_min:,.0f} kW/min more (its ramp limit)",
        )
        self.marks.append(Mark(self.at["dispatch_end"], "dispatch ends: ramp up"))

    def window_starts(self) -> None:
        self.say(
            self.at["window_start"],
            f"time-of-use window 'evening-peak' from the site config: at or under "
            f"{self.window_kw:,.1f} kW until {self.clock.hhmm(self.at['window_end'])}",
        )
        self.marks.append(Mark(self.at["window_start"], "window begins"))

    def window_ends(self) -> None:
        self.say(self.at["window_end"], "the window ends: ramp back up")
        self.marks.append(Mark(self.at["window_end"], "window ends: ramp up"))

    def trace_meter(self, sim: SimProcess) -> None:
        self.trace = MeterTrace(sim, self.clock).start()

    def dip(self, sim: SimProcess) -> None:
        sc = self.sc
        self.say(
            self.at["dip"],
            f"the grid: frequency dips to {sc.dip_hz:g} Hz for {sc.dip_s:g} site s (the "
            f"agent sheds {sc.shed_pct:g} % below {sc.below_hz:g} Hz, restores after {sc.restore_after_s:g} s "
            f"above {sc.restore_above_hz:g} Hz)",
        )
        self.dip_at = self.clock.now()
        sim.grid_event({"event": "dip", "depth_hz": round(50.0 - sc.dip_hz, 3), "duration_s": sc.dip_s})
        self.marks.append(Mark(self.dip_at, f"frequency dip to {sc.dip_hz:g} Hz"))

    # ------------------------------------------------------------------------------------------ live output
    def print_header(self) -> None:
        self.console.print(
            f"[dim]one line per site minute: ground-truth power (bar: share of the "
            f"{self.cap_kw:,.0f} kW cap), the agent's target and why, miners by state (ground truth)[/]"
        )

    def print_line(self, s: Sample) -> None:
        share = s.truth_kw / self.cap_kw
        filled = min(20, round(share * 20))
        over_target = s.target_kw is not None and s.truth_kw > s.target_kw + self.args.tolerance * self.full_kw
        colour = "red" if share > 1 else "yellow" if over_target else "green"
        bar = f"[{colour}]{'█' * filled}[/][dim]{'·' * (20 - filled)}[/]"
        target = "—" if s.target_kw is None else f"{s.target_kw:,.0f} kW"
        why = explain(s.reason)
        if s.planning_kw is not None and s.target_kw is not None and s.planning_kw < s.target_kw - 0.5:
            why += f", ramping (≤ {s.planning_kw:,.0f} kW now)"
        st = s.states
        miners = f"{st['hashing']} full, {st['throttled']} throttled, {st['sleeping']} asleep, {st['waking']} waking"
        if st["offline"]:
            miners += f", {st['offline']} offline"
        self.console.print(
            f"{self.clock.hhmm(s.site_ts)}  {s.truth_kw:>8,.1f} kW {bar}  target {target:>9} [dim]({why})[/]  {miners}"
        )

    def print_events(self, link: AgentLink) -> None:
        try:
            events = link.ok("events", {"limit": 50}).get("events") or []
        except (OSError, ValueError, DemoError):
            return
        for e in events:
            key = json.dumps(e, sort_keys=True, default=str)
            if key in self.seen_events:
                continue
            self.seen_events.add(key)
            text = describe_event(e)
            if text:
                ts = _event_ts(e.get("ts"))
                when = self.clock.hhmm(ts, True) if ts is not None else "        "
                style = "red" if e.get("type") in ("rejected", "failed", "alarm") else "cyan"
                self.console.print(f"[{style}]  ↳ {when} agent: {text}[/]")

    # ------------------------------------------------------------------------------------------ the end
    def finish(self) -> int:
        console, at = self.console, self.at
        samples = [s for s in self.recorder.samples if s.site_ts >= self.ready_at]
        if not samples:
            raise DemoError("no samples of the site were recorded")
        console.print("\n[bold]after the run[/] (agent stopped):")
        export_path = self.out / "audit-export.json"
        span = ["--from", repr(at["launch"] - 3600.0), "--to", repr(at["end"] + 3600.0)]
        exported = run_hashflex(["audit", "export", "--config", str(self.config), *span, "--out", str(export_path)])
        export_doc: dict[str, Any] = {}
        if exported.returncode == 0 and export_path.is_file():
            export_doc = json.loads(export_path.read_text())
        else:
            console.print(f"[red]hashflex audit export failed: {exported.stderr.strip()}[/]")
        verified = run_hashflex(["audit", "verify", "--config", str(self.config), "--json"])
        try:
            chain = json.loads(verified.stdout)
        except ValueError:
            chain = {"status": "error", "reason": verified.stderr.strip() or "no output"}
        chain_ok = verified.returncode == 0 and chain.get("status") == "ok"
        export_ok = bool(export_doc) and bool((export_doc.get("chain") or {}).get("ok"))
        energy_done = run_hashflex(["energy", "--config", str(self.config), *span, "--json"])
        energy: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            energy = json.loads(energy_done.stdout).get("total") or {}

        result = self.judge(samples)
        result.update(
            chain={
                "ok": chain_ok,
                "records": chain.get("records"),
                "head_hash": chain.get("head_hash"),
                "reason": chain.get("reason"),
            },
            export={
                "path": str(export_path),
                "ok": export_ok,
                "records": len(export_doc.get("audit") or []),
                "dispatches": len(export_doc.get("dispatches") or []),
            },
            energy={"kwh": energy.get("kwh"), "not_drawn_kwh": energy.get("not_drawn_kwh")},
        )
        result["ok"] = bool(
            result["cap"]["ok"]
            and chain_ok
            and export_ok
            and (result["frequency"] is None or result["frequency"]["ok"])
        )
        self.write_timeline(samples)
        plot_path = self.out / "site-power.png"
        self.draw(plot_path, samples, result, export_doc.get("audit") or [])
        result["runtime_s"] = round(time.monotonic() - self.started, 1)
        result["files"] = {
            "plot": str(plot_path),
            "export": str(export_path),
            "timeline": str(self.out / "timeline.csv"),
            "config": str(self.config),
            "agent_log": str(self.out / "agent.log"),
            **({"frequency": str(self.out / "frequency.csv")} if self.sc.dip else {}),
        }
        (self.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
        self.report(result)
        return 0 if result["ok"] else 1

    def judge(self, samples: list[Sample]) -> dict[str, Any]:
        """The run by ground truth: the cap (pass/fail), and how each target was met (figures)."""
        at = self.at
        tol_kw = self.args.tolerance * self.full_kw
        out: dict[str, Any] = {
            "miners": self.sc.miners,
            "families": self.families,
            "speed": self.sc.speed,
            "samples": len(samples),
            "full_kw": round(self.full_kw, 1),
            "cap": cap_verdict(samples, self.cap_kw, self.args.tolerance),
        }
        sent = self.dispatch_sent_at
        out["dispatch"] = self.compliance(samples, self.dispatch_kw, sent or at["dispatch"], at["dispatch_end"])
        out["window"] = self.compliance(samples, self.window_kw, at["window_start"], at["window_end"])
        self.ramps = []
        for name, (ended, next_event) in (
            ("dispatch", (at["dispatch_end"], at["window_start"])),
            ("window", (at["window_end"], at["end"])),
        ):
            out[name]["ramp_back_min"] = self.back_up_after(samples, ended, next_event)
            ramp = self.ramp_after(samples, ended, next_event)
            if ramp is not None:
                self.ramps.append(ramp)
                coming_up = [s for s in samples if ramp.start <= s.site_ts < next_event]
                out[name]["ramp_limit_kept"] = all(s.truth_kw <= ramp.limit_kw(s.site_ts) + tol_kw for s in coming_up)
        out["frequency"] = None
        if self.sc.dip:
            sc = self.sc
            out["frequency"] = frequency_verdict(
                self.trace.points if self.trace else [],
                samples,
                dip_at=self.dip_at or at["dip"],
                below_hz=sc.below_hz,
                restore_above_hz=sc.restore_above_hz,
                shed_pct=sc.shed_pct,
                restore_after_s=sc.restore_after_s,
                within_s=FREQUENCY_SHED_WITHIN_S,
            )
        return out

    def ramp_after(self, samples: list[Sample], ended: float, until: float) -> Ramp | None:
        """The ramp-up limit from the first look after `ended` at which the agent's target had risen."""
        rose = next(
            (
                s
                for s in samples
                if ended <= s.site_ts < until and s.target_kw is not None and s.target_kw >= self.cap_kw - 0.5
            ),
            None,
        )
        if rose is None:
            return None
        return Ramp(rose.site_ts, rose.truth_kw, self.ramp_kw_per_min, self.cap_kw)

    def compliance(self, samples: list[Sample], level_kw: float, start: float, end: float) -> dict[str, Any]:
        tol_kw = self.args.tolerance * self.full_kw
        inside = [s for s in samples if start <= s.site_ts < end]
        met = next((s for s in inside if s.truth_kw <= level_kw + tol_kw), None)
        # held from the first sample at or under the level (the one that met it may be part-way down the ramp)
        settled = next((s for s in inside if s.truth_kw <= level_kw), met)
        held = [s for s in inside if settled is not None and s.site_ts >= settled.site_ts]
        worst = max((s.truth_kw - level_kw for s in held), default=None)
        # what the site kept while it held the level: hashrate against power, both as shares of full
        power_share = sum(s.truth_kw for s in held) / len(held) / self.full_kw if held else None
        hash_share = sum(s.hashrate_ths for s in held) / len(held) / self.full_ths if held and self.full_ths else None
        return {
            "level_kw": level_kw,
            "start": iso(start),
            "end": iso(end),
            "met": met is not None,
            "met_after_min": None if met is None else round((met.site_ts - start) / 60.0, 2),
            "worst_over_kw_after_met": None if worst is None else round(max(0.0, worst), 1),
            "power_share_held": None if power_share is None else round(power_share, 3),
            "hashrate_share_held": None if hash_share is None else round(hash_share, 3),
        }

    def back_up_after(self, samples: list[Sample], start: float, end: float) -> float | None:
        back = next((s for s in samples if start <= s.site_ts < end and s.truth_kw >= 0.95 * self.full_kw), None)
        return None if back is None else round((back.site_ts - start) / 60.0, 2)

    def write_timeline(self, samples: list[Sample]) -> None:
        with (self.out / "timeline.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                [
                    "site_time_utc",
                    "site_local",
                    "truth_kw",
                    "agent_kw",
                    "target_kw",
                    "ramp_level_kw",
                    "cap_kw",
                    "reason",
                    "hashrate_ths",
                    *TRUTH_STATES,
                    "sleep_only_ths",
                    "meter_kw",
                    "hz",
                    "frequency_event",
                ]
            )
            for s in samples:
                w.writerow(
                    [
                        iso(s.site_ts),
                        self.clock.hhmm(s.site_ts, True),
                        f"{s.truth_kw:.3f}",
                        _fmt(s.agent_kw),
                        _fmt(s.target_kw),
                        _fmt(s.planning_kw),
                        _fmt(s.cap_kw),
                        s.reason or "",
                        f"{s.hashrate_ths:.1f}",
                        *(s.states[k] for k in TRUTH_STATES),
                        f"{self.baseline.ths_at(s.truth_kw):.1f}",
                        _fmt(s.meter_kw),
                        "" if s.hz is None else f"{s.hz:.4f}",
                        int(s.frequency_event),
                    ]
                )
        if self.sc.dip:
            with (self.out / "frequency.csv").open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["site_time_utc", "site_local", "hz", "meter_kw", "miners_kw"])
                for p in self.trace.points if self.trace else []:
                    w.writerow(
                        [
                            iso(p.site_ts),
                            self.clock.hhmm(p.site_ts, True),
                            f"{p.hz:.4f}",
                            f"{p.power_kw:.3f}",
                            f"{p.it_kw:.3f}",
                        ]
                    )

    def draw(self, path: Path, samples: list[Sample], result: dict[str, Any], audit: list[dict[str, Any]]) -> None:
        from hashflex.sim.demo_plot import plot  # noqa: PLC0415  (matplotlib loads only when there is something to draw)

        fam = ", ".join(f"{n} {FAMILY_NAMES.get(f, f)}" for f, n in self.families.items())
        cap, d, w = result["cap"], result["dispatch"], result["window"]
        title = f"hashflex demo — {self.sc.miners} simulated miners ({fam}) driven by the agent"
        parts = [f"peak {cap['peak_share'] * 100:.0f} % of the cap" + ("" if cap["ok"] else " — CAP EXCEEDED")]
        if d["met"]:
            parts.append(f"dispatch met {d['met_after_min'] * 60:.0f} site s after it was sent")
        if w["met"]:
            parts.append(f"window met {w['met_after_min'] * 60:.0f} site s after it began")
        fr = result.get("frequency")
        if fr is not None:
            parts.append(
                f"dip: {fr['kw_shed']:,.0f} kW shed in {fr['shed_after_s']:.0f} site s"
                if fr["shed_after_s"] is not None
                else "FREQUENCY DIP NOT SHED"
            )
        parts.append("audit chain verified" if result["chain"]["ok"] else "AUDIT CHAIN FAILED")
        parts.append(f"{self.sc.speed:g}× speed")
        # what the agent did, from the audit export above (no extra questions to the agent: the run time stays)
        notes = agent_notes(audit, samples, cap_kw=self.cap_kw, tolerance_kw=self.args.tolerance * self.full_kw)
        dip = None
        if fr is not None and self.trace is not None and self.trace.points:
            dip = DipView(
                self.trace.points, below_hz=self.sc.below_hz, restore_above_hz=self.sc.restore_above_hz, verdict=fr
            )
        plot(
            path,
            samples,
            self.clock,
            cap_kw=self.cap_kw,
            spans=self.spans,
            marks=self.marks,
            ramps=self.ramps,
            title=title,
            subtitle=" · ".join(parts),
            notes=notes,
            baseline=self.baseline,
            dip=dip,
        )

    def report(self, r: dict[str, Any]) -> None:
        c = self.console
        cap = r["cap"]
        if cap["ok"]:
            c.print(
                f"[green]✔ cap never exceeded[/]: peak {cap['peak_kw']:,.1f} kW = "
                f"{cap['peak_share'] * 100:.0f} % of the {cap['cap_kw']:,.0f} kW cap "
                f"({r['samples']} ground-truth samples)"
            )
        else:
            c.print(
                f"[bold red]✘ the site exceeded its cap[/]: peak {cap['peak_kw']:,.1f} kW against "
                f"{cap['cap_kw']:,.0f} kW + {cap['tolerance_kw']:,.1f} kW tolerance in {cap['samples_over']} "
                "samples"
            )
        for name, label in (("dispatch", "grid dispatch"), ("window", "time-of-use window")):
            x = r[name]
            if x["met"]:
                c.print(
                    f"  {label} ≤ {x['level_kw']:,.1f} kW: met {x['met_after_min'] * 60:.0f} site s after it "
                    "began; "
                    f"worst afterwards {x['worst_over_kw_after_met']:,.1f} kW over; "
                    f"{x['hashrate_share_held'] * 100:.0f} % of the hashrate kept on "
                    f"{x['power_share_held'] * 100:.0f} % of the power"
                    + (
                        f"; back to 95 % of full power {x['ramp_back_min']:.1f} min after it ended"
                        if x["ramp_back_min"] is not None
                        else ""
                    )
                    + {
                        True: "; within the ramp-up limit",
                        False: "; [yellow]faster than the ramp-up limit[/]",
                        None: "",
                    }[x.get("ramp_limit_kept")]
                )
            else:
                c.print(f"  [yellow]{label} ≤ {x['level_kw']:,.1f} kW: not met within its window[/]")
        fr = r.get("frequency")
        if fr is not None:
            if fr["ok"]:
                c.print(
                    f"[green]✔ frequency dip[/] (lowest {fr['lowest_hz']:.2f} Hz): below {fr['below_hz']:g} Hz at "
                    f"{self.clock.hhmm(fr['crossed_ts'], True)}; {fr['kw_shed']:,.1f} kW shed at the meter "
                    f"(stage {fr['stage_kw']:,.1f} kW) {fr['shed_after_s']:.0f} site s after the crossing, held "
                    f"until the frequency had stayed above {fr['restore_above_hz']:g} Hz, back "
                    f"{fr['back_after_recovery_s']:.0f} site s after it recovered"
                )
                if fr["over_shed"]:
                    c.print(
                        f"  [yellow]while the event held the site went down by {fr['kw_down_max']:,.1f} kW in all "
                        "(the ordinary plan under the held level slept more than the stage)[/]"
                    )
            else:
                c.print(f"[bold red]✘ frequency dip[/]: {fr['reason']}")
        chain = r["chain"]
        if chain["ok"]:
            c.print(
                f"[green]✔ audit chain verified[/] (hashflex audit verify): {chain['records']} records, head "
                f"{str(chain['head_hash'])[:16]}…"
            )
        else:
            c.print(f"[bold red]✘ audit chain did not verify[/]: {chain['reason']}")
        ex = r["export"]
        mark = "[green]✔[/]" if ex["ok"] else "[bold red]✘[/]"
        c.print(
            f"{mark} audit export (hashflex audit export): {ex['records']} records, {ex['dispatches']} "
            f"dispatch(es) → {ex['path']}"
        )
        e = r["energy"]
        if e["kwh"] is not None:
            c.print(
                f"  energy on record (hashflex energy): {e['kwh']:,.1f} kWh drawn, "
                f"{e['not_drawn_kwh'] or 0:,.1f} kWh not drawn because of dispatch"
            )
        f = r["files"]
        c.print(
            f"wrote {f['plot']}, {f['export']}, {f['timeline']}, {self.out / 'summary.json'} in {r['runtime_s']:.0f} s"
        )


def meter_address(given: str | None, base_ip: str) -> str:
    """--meter, else the base address's .250.250 on port METER_PORT (clear of the miners below it)."""
    if given:
        return given
    a, b, _, _ = str(ipaddress.IPv4Address(base_ip)).split(".")
    return f"{a}.{b}.250.250:{METER_PORT}"


def frequency_verdict(
    points: list[MeterPoint],
    samples: list[Sample],
    *,
    dip_at: float,
    below_hz: float,
    restore_above_hz: float,
    shed_pct: float,
    restore_after_s: float,
    within_s: float,
) -> dict[str, Any]:
    """The dip by the meter's ground truth: when the frequency crossed the stage's threshold, whether the site's
    power fell by about the stage's kW (shed_pct of the miners' draw just before) within `within_s`, stayed down
    until the frequency had been back above `restore_above_hz` for most of `restore_after_s`, then came back."""
    out: dict[str, Any] = {
        "below_hz": below_hz,
        "restore_above_hz": restore_above_hz,
        "shed_pct": shed_pct,
        "dip_sent": iso(dip_at),
        "crossed_at": None,
        "crossed_ts": None,
        "lowest_hz": None,
        "before_kw": None,
        "stage_kw": None,
        "shed_reached_at": None,
        "shed_after_s": None,
        "kw_shed": None,
        "kw_down_max": None,
        "over_shed": None,
        "held": None,
        "recovered_at": None,
        "back_at": None,
        "back_after_recovery_s": None,
        "agent_event_samples": 0,
        "ok": False,
        "reason": None,
    }
    out["agent_event_samples"] = sum(1 for s in samples if s.frequency_event and s.site_ts >= dip_at)
    crossing = next((i for i, p in enumerate(points) if p.site_ts >= dip_at - 5.0 and p.hz < below_hz), None)
    if crossing is None or crossing == 0:
        out["reason"] = "the meter never read the frequency below the stage's threshold (or no look before it)"
        return out
    cross, before = points[crossing], points[max(0, crossing - 3) : crossing]
    before_kw = sum(p.power_kw for p in before) / len(before)
    stage_kw = shed_pct / 100.0 * sum(p.it_kw for p in before) / len(before)
    after = points[crossing:]
    recovered = next((p for p in after if p.hz >= restore_above_hz), None)
    low = [p for p in after if recovered is None or p.site_ts < recovered.site_ts]
    out.update(
        crossed_at=iso(cross.site_ts),
        crossed_ts=cross.site_ts,
        lowest_hz=round(min(p.hz for p in after), 3),
        before_kw=round(before_kw, 1),
        stage_kw=round(stage_kw, 1),
        recovered_at=None if recovered is None else iso(recovered.site_ts),
    )
    # "about the stage's kW": 80 % of it (the slept miners keep a standby draw; cooling lags the miners)
    reached = next((p for p in after if p.power_kw <= before_kw - 0.8 * stage_kw), None)
    if reached is None:
        out["reason"] = f"the site never fell by the stage's {stage_kw:,.1f} kW at the meter"
        return out
    # the stage's shed: the site's fall within `within_s` of the crossing; the deepest fall while the frequency was
    # low may be more (the ordinary plan under the held level can sleep more: see the report's kw_down_max)
    first = [p.power_kw for p in after if p.site_ts <= cross.site_ts + within_s]
    out.update(
        shed_reached_at=iso(reached.site_ts),
        shed_after_s=round(reached.site_ts - cross.site_ts, 1),
        kw_shed=round(before_kw - min(first), 1),
        kw_down_max=round(before_kw - min(p.power_kw for p in low), 1),
    )
    # more than half as much again as the stage: the agent shed more than the stage asked (a figure, not a failure:
    # the ordinary plan under the held level may cut further, e.g. on an inflated non-miner estimate; see the log)
    out["over_shed"] = out["kw_down_max"] > 1.5 * stage_kw
    if recovered is None:
        out["reason"] = "the frequency never came back above the restore threshold in the trace"
        return out
    hold_until = recovered.site_ts + 0.8 * restore_after_s
    hold = [p for p in points if reached.site_ts <= p.site_ts <= hold_until]
    out["held"] = all(p.power_kw <= before_kw - 0.5 * stage_kw for p in hold)
    back = next((p for p in points if p.site_ts > hold_until and p.power_kw >= before_kw - 0.2 * stage_kw), None)
    if back is not None:
        out.update(back_at=iso(back.site_ts), back_after_recovery_s=round(back.site_ts - recovered.site_ts, 1))
    checks = [
        (out["shed_after_s"] <= within_s, f"the shed took {out['shed_after_s']:.0f} site s (> {within_s:g})"),
        (bool(out["held"]), "the shed was not held until the frequency had stayed back up"),
        (back is not None, "the site did not come back after the event"),
    ]
    out["reason"] = next((why for good, why in checks if not good), None)
    out["ok"] = out["reason"] is None
    return out


def cap_verdict(samples: list[Sample], cap_kw: float, tolerance: float) -> dict[str, Any]:
    """Did ground truth stay under the cap? `tolerance` is a share of the cap (PSU spread the agent cannot see)."""
    tol_kw = tolerance * cap_kw
    peak = max(samples, key=lambda s: s.truth_kw)
    over = [s for s in samples if s.truth_kw > cap_kw + tol_kw]
    return {
        "cap_kw": cap_kw,
        "tolerance_kw": round(tol_kw, 1),
        "peak_kw": round(peak.truth_kw, 1),
        "peak_share": round(peak.truth_kw / cap_kw, 4),
        "samples_over": len(over),
        "ok": not over,
    }


def explain(reason: str | None) -> str:
    """The agent's target_reason in words."""
    if not reason:
        return "—"
    source, _, name = reason.partition(":")
    return {
        "cap": "site cap",
        "grid": f"grid dispatch {name}",
        "schedule": f"window {name}",
        "operator": f"operator override {name}",
        "failsafe": "FAIL-SAFE",
        "frequency": "under-frequency response",
    }.get(source, reason)


def describe_event(e: dict[str, Any]) -> str | None:
    """An agent event in a few words (None: not worth a line)."""
    kind, d = str(e.get("type")), e.get("data") or {}
    match kind:
        case "received":
            return None
        case "accepted":
            return f"accepted {d.get('verb')} {d.get('id')} ({d.get('channel')})"
        case "rejected":
            return f"REFUSED {d.get('verb')} {d.get('id')}: {d.get('message') or d.get('code')}"
        case "target_changed":
            return f"target → {_kw(d.get('kw'))} ({explain(d.get('reason'))})"
        case "commands_sent":
            return f"{d.get('commands')} miner commands sent for {d.get('id')}"
        case "target_reached":
            after = d.get("after_s")
            return f"{d.get('id')} met: site at {_kw(d.get('power_kw'))} ≤ {_kw(d.get('level_kw'))}" + (
                f", {after:.0f} site s after acceptance" if isinstance(after, int | float) else ""
            )
        case "expired" | "cancelled":
            return f"{d.get('id')} {kind}"
    fields = ", ".join(f"{k}={v}" for k, v in d.items() if v not in (None, "", [], {}))
    return f"{kind} {fields}".strip()


def _kw(value: Any) -> str:
    return f"{value:,.1f} kW" if isinstance(value, int | float) else "?"


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _event_ts(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


if __name__ == "__main__":
    sys.exit(main())
