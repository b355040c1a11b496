"""Benchmark: identification and telemetry sweeps of a simulated site, agent against a bare pyasic loop.

    python -m tests.bench.bench_telemetry                      # 1,000 and 10,000 miners, default mix
    python -m tests.bench.bench_telemetry --miners 1000 --mix luxos:100

For each site size, the simulator runs as its own process; then, one after the other, each in its own
process so CPU time and peak RSS are its own:

- **baseline**: pyasic as installed (its patches reverted, the default asyncio loop), the bare loop a user
  would write: `pyasic.get_miner(ip)` for every address, then `miner.get_data(include=[...])` for every
  miner, at the same concurrency as the agent (a semaphore; pyasic's own helpers bound nothing) and with the
  same data items the agent reads per family.
- **agent**: `Fleet.discover` then `Fleet.sweep` through `PyasicDriver` (get_commands patch, the lean read
  path through pyasic's RPC/web classes and parsers, uvloop).

Figures per variant: identification wall time and client CPU per miner, one sweep's wall time and CPU per
miner (first and steady state), peak RSS. Targets at 10,000 miners: sweep <= 8 s wall and <= 0.8 ms agent
CPU per miner, identification <= 35 s, RSS <= 300 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BASE_IP = "127.24.0.1"  # inside this suite's loopback range (127.20.0.0-127.29.255.255)
SWEEPS = 3


# ---------------------------------------------------------------------------------------------- children
def _usage() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024  # CPU s, peak RSS MiB


async def _agent(ips: list[str], concurrency: int, identify_concurrency: int) -> dict[str, Any]:
    from hashflex.agent.runtime.fleet import Fleet
    from hashflex.drivers.asic import PyasicDriver
    from hashflex.drivers.base import DriverSettings

    driver = PyasicDriver(DriverSettings(identify_concurrency=identify_concurrency))
    fleet = Fleet(driver, concurrency=concurrency, identify_concurrency=identify_concurrency, read_timeout_s=10)
    out: dict[str, Any] = {}
    cpu0, _ = _usage()
    t0 = time.perf_counter()
    found = await fleet.discover(ips)
    out["identify_s"], out["identify_cpu_s"] = time.perf_counter() - t0, _usage()[0] - cpu0
    out["found"] = len(found)
    t0 = time.perf_counter()
    restarted = Fleet(driver, concurrency=concurrency)
    restarted.attach_all(found)  # the restart path: no I/O
    out["attach_s"] = time.perf_counter() - t0
    out["sweeps"] = []
    for _ in range(SWEEPS):
        cpu0, _ = _usage()
        t0 = time.perf_counter()
        snap = await fleet.sweep()
        out["sweeps"].append(
            {
                "wall_s": time.perf_counter() - t0,
                "cpu_s": _usage()[0] - cpu0,
                "unreachable": snap.unreachable,
                "power_kw": round(snap.power_w / 1000, 1),
            }
        )
    out["rss_mib"] = _usage()[1]
    return out


async def _baseline(ips: list[str], concurrency: int, identify_concurrency: int) -> dict[str, Any]:
    import pyasic

    from hashflex.drivers import pyasic_patches
    from hashflex.drivers.asic import family_of, telemetry_options

    pyasic_patches.revert()  # pyasic exactly as installed
    out: dict[str, Any] = {}
    slots = asyncio.Semaphore(identify_concurrency)

    async def identify(ip: str) -> Any:
        async with slots:
            return await pyasic.get_miner(ip)

    cpu0, _ = _usage()
    t0 = time.perf_counter()
    miners = [m for m in await asyncio.gather(*(identify(ip) for ip in ips)) if m is not None]
    out["identify_s"], out["identify_cpu_s"] = time.perf_counter() - t0, _usage()[0] - cpu0
    out["found"] = len(miners)
    read_slots = asyncio.Semaphore(concurrency)

    async def read(miner: Any) -> Any:
        async with read_slots:
            return await miner.get_data(include=list(telemetry_options(family_of(type(miner)))))

    out["sweeps"] = []
    for _ in range(SWEEPS):
        cpu0, _ = _usage()
        t0 = time.perf_counter()
        data = await asyncio.gather(*(read(m) for m in miners), return_exceptions=True)
        power = sum((d.wattage or 0) for d in data if not isinstance(d, BaseException))
        out["sweeps"].append(
            {
                "wall_s": time.perf_counter() - t0,
                "cpu_s": _usage()[0] - cpu0,
                "unreachable": sum(1 for d in data if isinstance(d, BaseException)),
                "power_kw": round(power / 1000, 1),
            }
        )
    out["rss_mib"] = _usage()[1]
    return out


def _child(args: argparse.Namespace) -> None:
    logging.getLogger().setLevel(logging.ERROR)
    from hashflex.agent.config import LoggingConfig
    from hashflex.agent.logging import configure_logging

    configure_logging(LoggingConfig(level="warning"), stream=sys.stderr)
    ips = Path(args.ips).read_text().split()
    if args.child == "agent":
        import uvloop

        result = uvloop.run(_agent(ips, args.concurrency, args.identify_concurrency))
    else:
        result = asyncio.run(_baseline(ips, args.concurrency, args.identify_concurrency))
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------- parent
def _run_child(variant: str, ips_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "tests.bench.bench_telemetry",
        "--child",
        variant,
        "--ips",
        str(ips_file),
        "--concurrency",
        str(args.concurrency),
        "--identify-concurrency",
        str(args.identify_concurrency),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _report(n: int, args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    print(f"\n== {n} miners, mix {args.mix}, concurrency {args.concurrency} (identify {args.identify_concurrency})")
    print(f"{'':26}" + "".join(f"{v:>16}" for v in results))
    rows: list[tuple[str, Any]] = [
        ("found", lambda r: f"{r['found']}"),
        ("identify wall s", lambda r: f"{r['identify_s']:.1f}"),
        ("identify CPU ms/miner", lambda r: f"{1000 * r['identify_cpu_s'] / n:.2f}"),
        ("sweep #1 wall s", lambda r: f"{r['sweeps'][0]['wall_s']:.2f}"),
        ("sweep #1 CPU ms/miner", lambda r: f"{1000 * r['sweeps'][0]['cpu_s'] / n:.3f}"),
        ("sweep steady wall s", lambda r: f"{min(s['wall_s'] for s in r['sweeps'][1:]):.2f}"),
        ("sweep steady CPU ms/miner", lambda r: f"{1000 * min(s['cpu_s'] for s in r['sweeps'][1:]) / n:.3f}"),
        ("sweep unreachable", lambda r: f"{r['sweeps'][-1]['unreachable']}"),
        ("site power kW (last)", lambda r: f"{r['sweeps'][-1]['power_kw']}"),
        ("peak RSS MiB", lambda r: f"{r['rss_mib']:.0f}"),
    ]
    for label, fmt in rows:
        print(f"{label:26}" + "".join(f"{fmt(r):>16}" for r in results.values()))
    if "agent" in results and "attach_s" in results["agent"]:
        print(f"{'restart attach_all s':26}{'':>16}{results['agent']['attach_s']:>16.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--miners", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--mix", default="luxos:40,whatsminer:40,antminer:20")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--identify-concurrency", type=int, default=128)
    parser.add_argument("--variants", nargs="+", default=["baseline", "agent"])
    parser.add_argument("--child", choices=["agent", "baseline"])
    parser.add_argument("--ips")
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    from hashflex.sim.testing import SimProcess

    for n in args.miners:
        with SimProcess(miners=n, mix=args.mix, base_ip=BASE_IP, seed=7) as site, tempfile.TemporaryDirectory() as d:
            ips_file = Path(d) / "ips.txt"
            ips_file.write_text("\n".join(site.ips))
            results = {v: _run_child(v, ips_file, args) for v in args.variants}
            truth_kw = site.truth()["site"]["power_w"] / 1000
        _report(n, args, results)
        print(f"{'simulator truth kW':26}{truth_kw:>16.1f}")


if __name__ == "__main__":
    main()
