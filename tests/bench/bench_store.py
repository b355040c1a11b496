"""Store speed: the writes the agent's single-writer loop makes, a 10k-miner energy minute, and the heavy reads.

Run: python -m tests.bench.bench_store [--miners 10000] [--days 1]
Each figure is printed next to a baseline measured in the same run on the same disk:
- durable writes vs a bare sqlite3 INSERT + COMMIT with synchronous=FULL (the floor: one fsync);
- the compact per-miner minute (one float32 row for the fleet) vs one row per miner via executemany.
"""

from __future__ import annotations

import argparse
import dataclasses
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hashflex.agent.core.energy import EnergyIntegrator, SiteSample
from hashflex.agent.core.model import Dispatch, Source
from hashflex.agent.io.store import Store, verify_database

T0 = 1_700_006_400


def per_call_ms(n: int, fn: Callable[[int], object]) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n * 1000


def bare_sqlite_ms(folder: Path, n: int) -> float:
    db = sqlite3.connect(folder / "bare.db", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, ts REAL, kind TEXT, data TEXT, prev TEXT, hash TEXT)")

    def write(i: int) -> None:
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "INSERT INTO t VALUES (?, ?, ?, ?, ?, ?)", (i + 1, T0 + i, "command", '{"id":"x"}', "0" * 64, "1" * 64)
        )
        db.execute("COMMIT")

    ms = per_call_ms(n, write)
    db.close()
    return ms


def rows_per_miner_ms(folder: Path, ips: list[str], minutes: int) -> tuple[float, int]:
    path = folder / "rows.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("CREATE TABLE m (minute_ts INTEGER, ip TEXT, kwh REAL, measured INTEGER, PRIMARY KEY (minute_ts, ip))")

    def write(i: int) -> None:
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT INTO m VALUES (?, ?, ?, ?)", [(T0 + 60 * i, ip, 0.05 + j * 1e-6, 1) for j, ip in enumerate(ips)]
        )
        db.execute("COMMIT")

    ms = per_call_ms(minutes, write)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return ms, path.stat().st_size // minutes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--miners", type=int, default=10_000)
    parser.add_argument("--days", type=float, default=1.0, help="per-miner minutes written for the read figures")
    parser.add_argument("--audit", type=int, default=2000, help="audit records appended")
    args = parser.parse_args()
    ips = [f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}" for i in range(args.miners)]

    with tempfile.TemporaryDirectory(prefix="hashflex-bench-", dir=Path.home()) as tmp:
        folder = Path(tmp)
        store = Store.open(folder / "hashflex.db")
        print(f"store bench: {args.miners} miners, SQLite {sqlite3.sqlite_version}, folder {folder}")

        base = bare_sqlite_ms(folder, args.audit)
        audit_ms = per_call_ms(
            args.audit, lambda i: store.append_audit("command", {"id": f"c{i}", "verb": "dispatch", "ok": True}, T0 + i)
        )
        print(f"  append_audit (FULL):           {audit_ms:7.3f} ms/call  ({1000 / audit_ms:8.0f}/s)")
        print(f"  baseline bare INSERT+COMMIT:    {base:7.3f} ms/call  (one fsync: the floor)")
        state_ms = per_call_ms(1000, lambda i: store.set_state("counters", {"ticks": i}, T0 + i))
        reply_ms = per_call_ms(1000, lambda i: store.put_reply(f"r{i}", "dispatch", {"id": f"r{i}", "ok": True}, T0))
        d = Dispatch("d1", Source.GRID, T0, T0, T0 + 3600, target_kw=500.0)
        disp_ms = per_call_ms(1000, lambda i: store.save_dispatch(d, "active", commands_sent_at=float(T0 + i)))
        upd_ms = per_call_ms(1000, lambda i: store.update_dispatch("d1", max_overshoot_kw=float(i)))

        def tx(i: int) -> None:
            with store.transaction():
                store.save_dispatch(d, "active", received_at=float(T0 + i))
                store.put_reply(f"t{i}", "dispatch", {"ok": True}, T0)
                store.append_audit("command", {"id": f"t{i}", "verdict": "accepted"}, T0 + i)

        tx_ms = per_call_ms(1000, tx)
        print(f"  set_state:                      {state_ms:7.3f} ms/call")
        print(f"  put_reply:                      {reply_ms:7.3f} ms/call")
        print(f"  save_dispatch / update_dispatch:{disp_ms:7.3f} / {upd_ms:.3f} ms/call")
        print(f"  dispatch+reply+audit in one tx: {tx_ms:7.3f} ms/call")

        # ---------------------------------------------------------------- energy: integrate and store a minute
        integ = EnergyIntegrator()
        watts = {ip: (3000.0 + (j % 100), j % 5 != 0) for j, ip in enumerate(ips)}
        site = SiteSample(T0, sum(w for w, ok in watts.values() if ok), sum(w for w, ok in watts.values() if not ok))
        integ.add(site, watts)
        start = time.perf_counter()
        closed = []
        for k in range(1, 13):
            closed += integ.add(SiteSample(T0 + 5 * k, site.measured_w, site.estimated_w), watts)
        integ_ms = (time.perf_counter() - start) / 12 * 1000
        (minute, per_miner) = closed[0]
        print(f"  EnergyIntegrator.add, {args.miners} miners: {integ_ms:7.2f} ms/sample (one per sweep)")

        minutes = max(1, int(args.days * 1440))
        rows_ms, rows_bytes = rows_per_miner_ms(folder, ips, min(minutes, 30))

        def write_minute(i: int) -> None:
            store.record_energy_minute(dataclasses.replace(minute, minute_ts=T0 + 60 * i), per_miner)

        size0 = (folder / "hashflex.db").stat().st_size
        minute_ms = per_call_ms(minutes, write_minute)
        store.close()  # checkpoint, so the file holds every page
        store = Store.open(folder / "hashflex.db")
        blob_bytes = ((folder / "hashflex.db").stat().st_size - size0) // minutes
        print(f"  record_energy_minute, {args.miners} miners: {minute_ms:7.2f} ms/minute, {blob_bytes:,} bytes/minute")
        print(f"  baseline one row per miner:     {rows_ms:7.2f} ms/minute, {rows_bytes:,} bytes/minute")

        # ---------------------------------------------------------------- heavy reads (run them in a thread)
        start = time.perf_counter()
        day = store.energy_per_miner(T0, T0 + 60 * minutes)
        read_s = time.perf_counter() - start
        assert len(day[T0]) == args.miners
        print(f"  energy_per_miner over {minutes} minutes: {read_s:6.2f} s")
        start = time.perf_counter()
        store.energy_rollup(T0, T0 + 60 * minutes)
        print(f"  energy_rollup (15 min) over {minutes} minutes: {(time.perf_counter() - start) * 1000:6.1f} ms")
        store.close()

        size_mb = (folder / "hashflex.db").stat().st_size / 1e6
        start = time.perf_counter()
        Store.open(folder / "hashflex.db").close()
        open_s = time.perf_counter() - start
        start = time.perf_counter()
        result = verify_database(folder / "hashflex.db", full_check=True)
        verify_s = time.perf_counter() - start
        assert result.ok, result.reason
        start = time.perf_counter()
        con = sqlite3.connect(folder / "hashflex.db")
        con.execute("PRAGMA quick_check").fetchall()
        con.close()
        qc_s = time.perf_counter() - start
        print(f"  Store.open of a {size_mb:.0f} MB file:  {open_s * 1000:7.1f} ms (quick_check skips per-miner energy)")
        print(f"  baseline full PRAGMA quick_check: {qc_s * 1000:7.1f} ms")
        print(f"  verify_audit ({result.records} records, full file check): {verify_s * 1000:7.1f} ms")
        print(f"  disk: {blob_bytes * 1440 / 1e6:.1f} MB/day of per-miner minutes at {args.miners} miners")


if __name__ == "__main__":
    main()
