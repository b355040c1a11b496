"""One Modbus TCP connection for the site's Modbus devices (the site meter, facility drives and relays): connected
on demand, no background reconnects (the caller's poll or command decides when to try again), bounded in time."""

from __future__ import annotations

import asyncio

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException


class ModbusConnectError(Exception):
    """No connection: the reason, for the caller's own error (meter offline, facility device unreachable)."""


async def connect_tcp(
    old: AsyncModbusTcpClient | None, *, host: str, port: int, timeout_s: float, name: str
) -> AsyncModbusTcpClient:
    """`old` while it is still connected, else a new client connected within twice `timeout_s` (`old` closed)."""
    if old is not None and old.connected:
        return old
    if old is not None:
        old.close()
    client = AsyncModbusTcpClient(host, port=port, timeout=timeout_s, retries=0, reconnect_delay=0, name=name)
    try:
        ok = await asyncio.wait_for(client.connect(), timeout_s * 2)
    except (TimeoutError, OSError, ModbusException) as exc:
        ok, why = False, str(exc) or type(exc).__name__
    else:
        why = "connection refused or timed out"
    if not ok:
        client.close()
        raise ModbusConnectError(why)
    return client
