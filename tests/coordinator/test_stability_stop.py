"""`hashflex coordinator run` stops within a bound whatever NATS and the brokers do (#15).

The stop cancels the service's loops, gives the lease up and closes the NATS connection. A loop cancelled once may
live on: on Python 3.11 `asyncio.wait_for` swallows a cancellation that lands as its inner call completes (the
lease loop renews through `wait_for` every fraction of a second), and a stop that awaited such a task once waited
for ever. Here: that race made to happen, in process; and a real process stopped with SIGTERM while its NATS server
is frozen (SIGSTOP: connections open, nothing answered) and its MQTT broker is down."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hashflex.contract.signing import generate_keypair
from hashflex.coordinator.runner import stop_tasks
from tests.broker import HOST, Mosquitto, free_port
from tests.nats_cluster import nats_server, read_log

pytestmark = pytest.mark.timeout(60)
HASHFLEX = str(Path(sys.executable).parent / "hashflex")
EXIT_WITHIN_S = 15.0  # the runner's own bounds: 5 s a task after its first cancel, 3 s the release, 3 s the close


async def test_a_loop_whose_cancel_wait_for_swallowed_is_stopped() -> None:
    """The 3.11 race, made to happen: the loop's `wait_for` inner call completes in the same turn as the cancel,
    so `wait_for` returns its result and the loop goes round again. Cancelled until done, it stops."""
    loop = asyncio.get_running_loop()
    inner: list[asyncio.Future[None]] = []
    rounds = 0

    async def renewing() -> None:  # the shape of the lease loop: a bounded request, a pause, for ever
        nonlocal rounds
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            inner.append(fut)
            await asyncio.wait_for(fut, 10.0)
            rounds += 1
            await asyncio.sleep(0.05)

    task = asyncio.create_task(renewing(), name="lease")
    await asyncio.sleep(0.01)
    inner[-1].set_result(None)  # the request answered …
    task.cancel()  # … and the stop's cancel, in the same turn
    await asyncio.sleep(0.01)
    swallowed = not task.done()
    if sys.version_info < (3, 12):
        assert swallowed, "the race did not happen: this test shows nothing"
        assert rounds == 1
    assert await stop_tasks([task], within_s=5.0) == []
    assert task.done()


def test_sigterm_while_nats_is_frozen_and_mqtt_is_down_exits_in_bounded_time(tmp_path: Path) -> None:
    private, public = generate_keypair()
    (tmp_path / "grid.pub").write_bytes(public)
    (tmp_path / "coordinator").write_bytes(private)
    # it leads only while it reaches the sites (Lease eligible): a real broker first, killed once it leads
    broker = Mosquitto(tmp_path / "mosquitto").start()
    nats_port, mqtt_port = free_port(), broker.plain_port
    nats = nats_server(tmp_path, nats_port)
    config = tmp_path / "program.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "program_id": "frozen",
                "signing_key": "coordinator",
                "grid_public_keys": ["grid.pub"],
                "fabric": {"brokers": [f"{HOST}:{mqtt_port}"], "nats_servers": [f"nats://{HOST}:{nats_port}"]},
                "sites": [{"id": "frozen-a", "cap_kw": 100}],
                "lease": {"ttl_s": 2, "replicas": 1},
                "state": {"replicas": 1},
                "step_s": 0.2,
                "settle_s": 0.2,
            }
        )
    )
    log = tmp_path / "coordinator.log"
    frozen = False
    try:
        with log.open("w") as sink:
            proc = subprocess.Popen(
                [HASHFLEX, "coordinator", "run", "--config", str(config), "--name", "t1"],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            try:
                deadline = time.monotonic() + 20
                while "lease_acquired" not in read_log(log):  # it leads: lease renewals and steps in flight
                    assert proc.poll() is None, read_log(log)
                    assert time.monotonic() < deadline, read_log(log)
                    time.sleep(0.1)
                time.sleep(0.5)
                broker.kill()  # the fabric is down ...
                nats.send_signal(signal.SIGSTOP)  # ... and NATS keeps its connections open and answers nothing
                frozen = True
                time.sleep(1.0)  # renewals, a step's store calls and the fabric's reconnects all waiting
                proc.send_signal(signal.SIGTERM)
                stopped_at = time.monotonic()
                try:
                    returncode = proc.wait(timeout=EXIT_WITHIN_S)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"still running {EXIT_WITHIN_S:g} s after SIGTERM:\n{read_log(log)[-3000:]}")
                took = time.monotonic() - stopped_at
            finally:
                proc.kill()
                proc.wait(timeout=10)
    finally:
        if frozen:
            nats.send_signal(signal.SIGCONT)
        nats.terminate()
        nats.wait(timeout=10)
        broker.kill()
    text = read_log(log)
    assert returncode == 0, text
    assert "coordinator stopped" in text, text
    print(f"exited {took:.2f} s after SIGTERM with NATS frozen and MQTT down")
