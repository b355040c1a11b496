"""A site's MQTT link alone in its own process, for tests that must kill it (last will).

    python -m tests.integration.mqtt_agent_proc CONFIG.yaml

Prints one line per link state change ("state connected") and answers ping with the local test handler.
"""

from __future__ import annotations

import asyncio
import sys

from hashflex.agent.config import load_config
from hashflex.agent.io.mqtt import MqttLink
from tests.mqtt_support import RecordingHandler, RecordingHeartbeat


async def main(path: str) -> None:
    cfg = load_config(path)
    link = MqttLink(cfg, RecordingHandler(), RecordingHeartbeat(), lambda: {"site_id": cfg.site.id, "pid": "child"})
    task = asyncio.create_task(link.run())
    last = None
    while not task.done():
        if link.state is not last:
            last = link.state
            print(f"state {last.value}", flush=True)
        await asyncio.sleep(0.01)
    task.result()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
