"""A writer for the crash tests: commits in a loop and prints each number once its transaction has returned.

Run as `python -m tests.integration.store_writer_proc DB MINERS`. Each iteration n writes, in one transaction,
the state counter n, one audit record, a dispatch update and a reply; every 5th also a site energy minute with
MINERS per-miner figures. The parent kills it with SIGKILL at a random moment and checks what survived.
"""

from __future__ import annotations

import sys

from hashflex.agent.core.energy import EnergyMinute, MinerMinute
from hashflex.agent.core.model import Dispatch, Source
from hashflex.agent.io.store import Store

T0 = 1_700_000_000


def main() -> None:
    db, miners = sys.argv[1], int(sys.argv[2])
    ips = [f"127.6.{i // 250}.{i % 250 + 1}" for i in range(miners)]
    store = Store.open(db)
    n = int(store.get_state("n", 0))
    print(f"open {n}", flush=True)
    while True:
        n += 1
        with store.transaction():
            store.set_state("n", n, float(n))
            store.append_audit("actions", {"n": n, "sent": 3, "failed": 0, "pad": "z" * 500}, T0 + n)
            d = Dispatch(f"d{n % 7}", Source.GRID, T0, T0, T0 + 10**6, target_kw=float(n))
            store.save_dispatch(d, "active", received_at=float(n), commands_sent_at=float(n))
            store.put_reply(f"cmd-{n}", "dispatch", {"id": f"cmd-{n}", "status": "ok"}, float(n))
            if n % 5 == 0:
                minute = EnergyMinute((T0 // 60 + n) * 60, 1.0, 1.0, 0.0, 60.0, 0.0, 0.0, 0.0, 60.0, 12)
                store.record_energy_minute(minute, {ip: MinerMinute(0.05, True) for ip in ips})
        print(n, flush=True)


if __name__ == "__main__":
    main()
