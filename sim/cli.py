"""`python -m hashflex.sim` / `hashflex sim`: run a simulated mining site until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any

import structlog
import uvloop

from hashflex.sim.facility import FacilityLoads
from hashflex.sim.facility import parse as parse_facility
from hashflex.sim.faults import FaultSpecError
from hashflex.sim.meter import MeterParams, SiteMeter, parse_address
from hashflex.sim.physics import PhysicsParams
from hashflex.sim.site import Site, TruthEndpoint
from hashflex.sim.transport import HttpProtocol


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hashflex sim",
        description=(
            "Run a simulated mining site: N miners on loopback addresses, speaking LuxOS, Whatsminer and stock "
            "Antminer protocols well enough for unmodified pyasic; ground truth and fault controls on "
            "http://127.0.0.1:<truth-port>/truth and /faults."
        ),
    )
    p.add_argument("--miners", type=int, default=100, help="number of miners (default 100)")
    p.add_argument(
        "--mix",
        default="luxos:40,whatsminer:40,antminer:20",
        help="family weights, e.g. luxos:40,whatsminer:40,antminer:20",
    )
    p.add_argument("--base-ip", default="127.1.0.1", help="first loopback address (127.x.y.z)")
    p.add_argument("--seed", type=int, default=7, help="seed for models, unit spread and fault selection")
    p.add_argument("--speed", type=float, default=1.0, help="sim seconds per wall second (default 1)")
    p.add_argument("--truth-port", type=int, default=8099, help="truth/fault HTTP port on 127.0.0.1 (0 = any free)")
    p.add_argument("--faults", default=None, help="fault spec JSON (or @file) applied at start")
    p.add_argument("--ready-file", default=None, help="write {truth_url, ips, pid} here once every listener is up")
    p.add_argument("--wake-s", type=float, default=180.0, help="sim seconds from wake to full power (default 180)")
    p.add_argument("--reboot-s", type=float, default=90.0, help="sim seconds a rebooting miner is offline")
    p.add_argument("--log-level", default="warning", help="sim log level (default warning)")
    p.add_argument(
        "--meter",
        default=None,
        metavar="HOST[:PORT]",
        help="serve a site meter over Modbus TCP there (loopback; port default 5020, 502 needs root)",
    )
    p.add_argument(
        "--meter-config",
        default=None,
        metavar="JSON",
        help="meter parameters as JSON (or @file), see sim/meter.py MeterParams",
    )
    p.add_argument(
        "--facility",
        default=None,
        metavar="JSON",
        help="facility loads (cooling drives, relays on Modbus TCP) as a JSON list (or @file), see "
        "sim/facility.py; needs --meter",
    )
    return p


def raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY or hard >= wanted else hard
    with contextlib.suppress(ValueError, OSError):
        # root may raise the hard limit too
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
        return wanted
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return int(target)
    return soft


def load_faults(arg: str | None) -> Any:
    if not arg:
        return None
    text = Path(arg[1:]).read_text() if arg.startswith("@") else arg
    return json.loads(text)


def write_ready_file(path: str, doc: dict[str, Any]) -> None:
    """Atomically: a reader polling for the file never sees half of it."""
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


async def run(args: argparse.Namespace) -> int:
    site = Site(
        miners=args.miners,
        mix=args.mix,
        base_ip=args.base_ip,
        seed=args.seed,
        speed=args.speed,
        params=PhysicsParams(wake_s=args.wake_s, reboot_s=args.reboot_s),
    )
    listeners = sum(len(d.ports) for d in site.devices)
    raise_nofile(listeners + 20_000)
    initial = site.parse_faults(load_faults(args.faults)) if args.faults else []
    loop = asyncio.get_running_loop()
    truth_server = await loop.create_server(
        lambda: HttpProtocol(TruthEndpoint(site), args.truth_port, max_request=8 * 1024 * 1024),
        host="127.0.0.1",
        port=args.truth_port,
        reuse_address=True,
    )
    port = truth_server.sockets[0].getsockname()[1]
    bind_s = await site.start()
    if args.facility and not args.meter:
        raise ValueError("--facility needs --meter: the meter measures the facility loads")
    facility = None
    if args.facility:
        facility = FacilityLoads(site, parse_facility(load_faults(args.facility), set(site.by_ip)))
        await facility.start()
    if args.meter:
        meter = SiteMeter(
            site, MeterParams.from_json(load_faults(args.meter_config)), *parse_address(args.meter), facility=facility
        )
        await meter.start()
        site.meter = meter
    if initial:
        await site.apply_faults(initial)
    truth_url = f"http://127.0.0.1:{port}"
    nominal_mw = sum(d.spec.nominal_w for d in site.devices) / 1e6
    per_family = ", ".join(f"{fam} {n}" for fam, n in site.counts.items() if n)
    first, last = (site.devices[0].ip, site.devices[-1].ip) if site.devices else ("-", "-")
    print(
        f"hashflex sim: {len(site.devices)} miners ({per_family}), {nominal_mw:.3f} MW nominal, "
        f"{first}–{last}, {listeners} listeners bound in {bind_s:.2f} s, speed {args.speed:g}x, seed {args.seed}, "
        f"truth {truth_url}/truth",
        flush=True,
    )
    if site.meter is not None:
        m = site.meter
        print(
            f"hashflex sim: site meter on modbus tcp {m.host}:{m.port} unit {m.params.unit} (SunSpec 203/213 at "
            f"40000, SDM630, EM24, Janitza maps), {m.model.rated_w / 1e3:.1f} kW rated",
            flush=True,
        )
    if args.ready_file:
        write_ready_file(
            args.ready_file,
            {
                "truth_url": truth_url,
                "ips": [d.ip for d in site.devices],
                "pid": os.getpid(),
                "bind_s": bind_s,
                "meter": None if site.meter is None else f"{site.meter.host}:{site.meter.port}",
                "facility": [f"{ld.host}:{ld.port}" for ld in facility.loads] if facility is not None else [],
            },
        )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    truth_server.close()
    if site.meter is not None:
        await site.meter.close()
    if facility is not None:
        await facility.close()
    await site.close()
    with contextlib.suppress(OSError):  # stdout may be gone (a closed pipe) by now
        print("hashflex sim: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.miners < 1:
        print("hashflex sim: --miners must be >= 1", file=sys.stderr)
        return 2
    if args.speed <= 0 or args.wake_s <= 0 or args.reboot_s <= 0:
        print("hashflex sim: --speed, --wake-s and --reboot-s must be > 0", file=sys.stderr)
        return 2
    level = getattr(logging, str(args.log_level).upper(), logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))
    try:
        return int(uvloop.run(run(args)))
    except (ValueError, FaultSpecError, OSError) as exc:
        print(f"hashflex sim: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
