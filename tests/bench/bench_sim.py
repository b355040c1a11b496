"""Benchmark of the simulated site: start-up (bind) time, RSS, and simulator CPU per request at 1,000 and 10,000
miners, against a baseline measured in the same run (a bare asyncio+uvloop server that answers every request with
a fixed reply: the floor any simulator pays for a TCP connection).

Requests are driven from a separate client process (raw sockets on uvloop, one connection per request as pyasic
does): LuxOS `summary+power+stats` multicommands, Whatsminer v3 `get.miner.status summary` frames, and stock
Antminer `summary` RPCs, spread over every miner.

    python -m tests.bench.bench_sim [--sizes 1000,10000] [--requests 30000] [--concurrency 200]

Targets (issue 2): 10,000 miners bound in < 10 s, RSS < 400 MB, < 0.3 ms simulator CPU per request.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import psutil

from hashflex.sim.testing import SimProcess

BASE_IP = "127.11.0.1"  # inside the sim helper's range (127.10–127.19)
MIX = "luxos:40,whatsminer:40,antminer:20"

BASELINE_SERVER = r"""
import asyncio, json, sys, uvloop
REPLY = json.dumps({"STATUS": [{"STATUS": "S", "Msg": "Summary"}], "SUMMARY": [{"GHS 5s": 1.0}], "id": 1}).encode()
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t
    def data_received(self, d):
        self.t.write(REPLY); self.t.close()
async def main():
    srv = await asyncio.get_running_loop().create_server(P, "127.11.255.1", 4028, reuse_address=True)
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""

CLIENT = r"""
import asyncio, json, sys, time, uvloop
targets = json.loads(sys.stdin.read())
n, conc = int(sys.argv[1]), int(sys.argv[2])
def v3(obj):
    b = json.dumps(obj).encode(); return len(b).to_bytes(4, "little") + b
REQ = {
    "luxos": (4028, json.dumps({"command": "summary+power+stats"}).encode(), False),
    "antminer": (4028, json.dumps({"command": "summary"}).encode(), False),
    "whatsminer": (4433, v3({"cmd": "get.miner.status", "param": "summary"}), True),
    "baseline": (4028, json.dumps({"command": "summary"}).encode(), False),
}
async def one(ip, fam):
    port, payload, framed = REQ[fam]
    r, w = await asyncio.open_connection(ip, port)
    w.write(payload)
    if framed:
        head = await r.readexactly(4); await r.readexactly(int.from_bytes(head, "little"))
    else:
        await r.read()
    w.close()
async def main():
    sem = asyncio.Semaphore(conc); errors = 0
    async def task(i):
        nonlocal errors
        ip, fam = targets[i % len(targets)]
        async with sem:
            try:
                await one(ip, fam)
            except OSError:
                errors += 1
    t0 = time.perf_counter()
    await asyncio.gather(*(task(i) for i in range(n)))
    print(json.dumps({"wall_s": time.perf_counter() - t0, "errors": errors}))
uvloop.run(main())
"""


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def drive(pid: int, targets: list[tuple[str, str]], requests: int, concurrency: int) -> dict[str, Any]:
    """Run the client process against `targets`; return the server's CPU per request."""
    before = cpu_s(pid)
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, str(requests), str(concurrency)],
        input=json.dumps(targets),
        capture_output=True,
        text=True,
        check=True,
    )
    after = cpu_s(pid)
    out = json.loads(proc.stdout)
    return {
        "cpu_ms_per_req": (after - before) * 1000 / requests,
        "wall_s": out["wall_s"],
        "errors": out["errors"],
        "req_per_s": requests / out["wall_s"],
    }


def baseline(requests: int, concurrency: int) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, "-c", BASELINE_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        res = drive(proc.pid, [("127.11.255.1", "baseline")], requests, concurrency)
        res["rss_mb"] = psutil.Process(proc.pid).memory_info().rss / 2**20
        return res
    finally:
        proc.terminate()
        proc.wait()


def run_size(n: int, requests: int, concurrency: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    with SimProcess(miners=n, mix=MIX, base_ip=BASE_IP, seed=7) as sim:
        ready_s = time.perf_counter() - t0
        bind_s = float(sim.summary.split(" listeners bound in ")[1].split(" s")[0]) if sim.summary else float("nan")
        rss_idle = psutil.Process(sim.pid).memory_info().rss / 2**20
        truth = sim.truth()
        targets = [(m["ip"], m["family"]) for m in truth["miners"]]
        load = drive(sim.pid, targets, requests, concurrency)
        t1 = time.perf_counter()
        sim.truth()
        truth_ms = (time.perf_counter() - t1) * 1000
        rss_after = psutil.Process(sim.pid).memory_info().rss / 2**20
    return {
        "miners": n,
        "ready_s": ready_s,
        "bind_s": bind_s,
        "rss_idle_mb": rss_idle,
        "rss_after_mb": rss_after,
        "truth_ms": truth_ms,
        **load,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--requests", type=int, default=30000)
    ap.add_argument("--concurrency", type=int, default=200)
    args = ap.parse_args()
    print(f"bench_sim: {os.cpu_count()} CPUs, {args.requests} requests per run, concurrency {args.concurrency}")
    base = baseline(args.requests, args.concurrency)
    rows = [run_size(int(n), args.requests, args.concurrency) for n in args.sizes.split(",")]
    head = f"{'run':<18}{'start s':>9}{'bind s':>8}{'RSS MB':>9}{'RSS load':>10}{'CPU ms/req':>12}{'req/s':>9}"
    head += f"{'errors':>8}{'truth ms':>10}"
    print(head)
    print("-" * len(head))
    print(
        f"{'baseline (1 srv)':<18}{'-':>9}{'-':>8}{base['rss_mb']:>9.1f}{'-':>10}{base['cpu_ms_per_req']:>12.3f}"
        f"{base['req_per_s']:>9.0f}{base['errors']:>8}{'-':>10}"
    )
    for r in rows:
        print(
            f"{'sim ' + str(r['miners']):<18}{r['ready_s']:>9.2f}{r['bind_s']:>8.2f}{r['rss_idle_mb']:>9.1f}"
            f"{r['rss_after_mb']:>10.1f}{r['cpu_ms_per_req']:>12.3f}{r['req_per_s']:>9.0f}{r['errors']:>8}"
            f"{r['truth_ms']:>10.0f}"
        )
    big = rows[-1]
    ok = big["bind_s"] < 10 and big["rss_after_mb"] < 400 and big["cpu_ms_per_req"] < 0.3
    verdict = "met" if ok else "MISSED"
    print(f"targets at {big['miners']} miners (bind < 10 s, RSS < 400 MB, CPU < 0.3 ms/req): {verdict}")


if __name__ == "__main__":
    main()
