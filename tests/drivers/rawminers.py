"""Misbehaving "miners" on real TCP, for the faults the simulator need not model: a port that accepts and
never answers (pyasic would wait 100 s), one that answers garbage, one that closes without a word.

Addresses come from this suite's loopback range (127.20.0.0-127.29.255.255): 127.20.250.x.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from hashflex.drivers.base import Family, Identity, OnOff, Presets

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

BLACKHOLE_IP = "127.20.250.1"
GARBAGE_IP = "127.20.250.2"
SILENT_CLOSE_IP = "127.20.250.3"
NOTHING_IP = "127.20.250.4"  # nothing listens here: connection refused


@dataclass
class RawMiners:
    connections: dict[str, int] = field(default_factory=dict)


async def _blackhole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await reader.read(4096)
        await asyncio.sleep(3600)  # accept, read the command, never answer


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await reader.read(4096)
        writer.write(b"\x00\xff<html>not a miner API</html>\xfe")
        await writer.drain()
    writer.close()


async def _silent_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


@contextlib.asynccontextmanager
async def raw_miners() -> AsyncIterator[RawMiners]:
    state = RawMiners()
    servers = []

    def counting(ip: str, handler: Handler) -> Handler:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections[ip] = state.connections.get(ip, 0) + 1
            await handler(reader, writer)

        return run

    for ip, handler in ((BLACKHOLE_IP, _blackhole), (GARBAGE_IP, _garbage), (SILENT_CLOSE_IP, _silent_close)):
        for port in (4028, 4433):
            servers.append(await asyncio.start_server(counting(ip, handler), ip, port))
    try:
        yield state
    finally:
        for s in servers:
            s.close()
        for s in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 1)


def luxos_identity(ip: str) -> Identity:
    """What identification would have cached for a LuxOS S19 Pro at `ip`."""
    return Identity(
        ip=ip,
        family=Family.LUXOS,
        make="AntMiner",
        model="S19 Pro",
        firmware="2024.8.1",
        driver_class="LUXMinerS19Pro",
        capability=Presets((1800, 2600, 3250)),
        nominal_w=3250.0,
        nominal_ths=110.0,
    )


def antminer_identity(ip: str) -> Identity:
    return Identity(
        ip=ip,
        family=Family.ANTMINER,
        make="AntMiner",
        model="S19 Pro",
        firmware="stock",
        driver_class="BMMinerS19Pro",
        capability=OnOff(),
        nominal_w=3250.0,
        nominal_ths=110.0,
        reports_power=False,
    )


V3_ONLY_IP = "127.20.250.10"  # a Whatsminer v3 reachable on 4433 only (its 4028 closed or broken)

LEGACY_ERROR = b'{"STATUS":"E","When":0,"Code":14,"Msg":"invalid cmd","Description":""}'


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(Exception):
        writer.close()


@contextlib.asynccontextmanager
async def whatsminer_v3_only(target_ip: str, *, legacy: str) -> AsyncIterator[str]:
    """V3_ONLY_IP relays port 4433 to the simulated Whatsminer at `target_ip` (its real v3 API), while its
    port 4028 is closed (`legacy="closed"`) or answers every command with an error (`legacy="errors"`)."""

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(target_ip, 4433)
        await asyncio.gather(_relay(reader, up_writer), _relay(up_reader, writer))

    async def broken_legacy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read(4096)
            writer.write(LEGACY_ERROR)
            await writer.drain()
        writer.close()

    servers = [await asyncio.start_server(forward, V3_ONLY_IP, 4433)]
    if legacy == "errors":
        servers.append(await asyncio.start_server(broken_legacy, V3_ONLY_IP, 4028))
    try:
        yield V3_ONLY_IP
    finally:
        for s in servers:
            s.close()
