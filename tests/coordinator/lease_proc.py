"""One coordinator instance's lease alone in its own process, for the test that SIGKILLs a leader.

    python -m tests.coordinator.lease_proc BUCKET HOLDER URL [URL ...]

Runs a Lease with the tests' config and prints, after every round, `leader <valid_until>` (on the machine's
monotonic clock, the same in every process) or `follower`.
"""

from __future__ import annotations

import asyncio
import sys

import nats

from hashflex.coordinator.lease import Lease
from tests.coordinator.support import lease_config


async def main(bucket: str, holder: str, urls: list[str]) -> None:
    client = await nats.connect(servers=urls, dont_randomize=True, reconnect_time_wait=0.2, max_reconnect_attempts=-1)
    lease = Lease(client.jetstream(timeout=1.0), holder, lease_config(bucket))
    while True:
        leading = await lease.step()
        print(f"leader {lease.valid_until!r}" if leading else "follower", flush=True)
        await asyncio.sleep(lease.config.renew)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
