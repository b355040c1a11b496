"""Facility loads over Modbus TCP: a fan or pump drive's speed reference, or a relay (pymodbus async client).

    device = FacilityDevice(FacilityDeviceConfig(kind="drive", host="10.0.0.60", setpoint_register=1, full_scale=10000,
                                                 speed_register=3, power_register=5))
    await device.set_pct(60.0)        # writes the reference (drive) or the coil (relay: on above 0)
    await device.read()               # FacilityReading(pct, speed_pct, watts): what the device says
    device.close()

One connection, kept open and opened again on the next call after a failure (the caller retries: it knows when).
Every failure (connection refused, timeout, an exception reply, a short reply) is a FacilityDeviceError with the
reason; pymodbus's own error lines are kept out of the log (the runtime logs each failure once).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from hashflex.drivers.modbus_tcp import ModbusConnectError, connect_tcp

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


class FacilityDeviceError(Exception):
    """The device could not be set or read; the message says why."""


class FacilityDeviceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: Literal["drive", "relay"]
    host: str = Field(min_length=1)
    port: int = Field(502, ge=1, le=65535)
    unit: int = Field(1, ge=0, le=255)
    setpoint_register: int = Field(ge=0, le=65535, description="drive: speed reference holding register; relay: coil")
    full_scale: int = Field(10000, ge=1, le=65535, description="drive: the reference's value at 100 %")
    speed_register: int | None = Field(None, ge=0, le=65535, description="drive: input register, actual speed")
    power_register: int | None = Field(None, ge=0, le=65534, description="input registers, uint32 W, high first")
    timeout_s: float = Field(1.0, gt=0, le=30.0)


@dataclass(frozen=True, slots=True)
class FacilityReading:
    pct: float  # the setpoint the device holds (reference or coil)
    speed_pct: float | None  # the actual speed where the drive reports it (relay: 100 on, 0 off)
    watts: float | None  # the load's power where the device reports it


class FacilityDevice:
    def __init__(self, cfg: FacilityDeviceConfig) -> None:
        self.cfg = cfg
        self.name = f"{cfg.host}:{cfg.port}/{cfg.unit}"
        self._client: AsyncModbusTcpClient | None = None
        self._lock = asyncio.Lock()  # one request at a time on the one connection

    async def _connected(self) -> AsyncModbusTcpClient:
        old, self._client = self._client, None
        try:
            self._client = await connect_tcp(
                old, host=self.cfg.host, port=self.cfg.port, timeout_s=self.cfg.timeout_s, name=f"facility {self.name}"
            )
        except ModbusConnectError as exc:
            raise FacilityDeviceError(f"cannot connect to {self.name}: {exc}") from None
        return self._client

    async def _call(self, what: str, request: Awaitable[Any]) -> Any:
        try:
            reply = await asyncio.wait_for(request, self.cfg.timeout_s * 2)
        except (TimeoutError, OSError, ModbusException) as exc:
            self.close()
            raise FacilityDeviceError(f"{self.name} {what}: {str(exc) or type(exc).__name__}") from None
        if reply.isError():
            code = getattr(reply, "exception_code", "?")
            raise FacilityDeviceError(f"{self.name} {what}: exception reply {code}")
        return reply

    async def set_pct(self, pct: float) -> None:
        """Drive: the speed reference (0..100 % of full_scale); relay: the coil, on for any pct above 0."""
        pct = max(0.0, min(100.0, pct))
        async with self._lock:
            client = await self._connected()
            unit = self.cfg.unit
            if self.cfg.kind == "relay":
                on = pct > 0
                await self._call(
                    f"coil {self.cfg.setpoint_register} := {on}",
                    client.write_coil(self.cfg.setpoint_register, on, device_id=unit),
                )
            else:
                value = round(pct / 100.0 * self.cfg.full_scale)
                await self._call(
                    f"register {self.cfg.setpoint_register} := {value}",
                    client.write_register(self.cfg.setpoint_register, value, device_id=unit),
                )

    async def read(self) -> FacilityReading:
        async with self._lock:
            client = await self._connected()
            cfg, unit = self.cfg, self.cfg.unit
            if cfg.kind == "relay":
                rr = await self._call(
                    f"coil {cfg.setpoint_register}", client.read_coils(cfg.setpoint_register, count=1, device_id=unit)
                )
                bits = list(rr.bits)
                if not bits:
                    raise FacilityDeviceError(f"{self.name} coil {cfg.setpoint_register}: empty reply")
                pct = 100.0 if bits[0] else 0.0
                speed: float | None = pct
            else:
                pct = self._scaled(await self._registers(client, "holding", cfg.setpoint_register, 1))
                speed = None
                if cfg.speed_register is not None:
                    speed = self._scaled(await self._registers(client, "input", cfg.speed_register, 1))
            watts = None
            if cfg.power_register is not None:
                hi, lo = await self._registers(client, "input", cfg.power_register, 2)
                watts = float((hi << 16) | lo)
            return FacilityReading(pct=pct, speed_pct=speed, watts=watts)

    async def _registers(self, client: AsyncModbusTcpClient, kind: str, address: int, count: int) -> list[int]:
        read = client.read_input_registers if kind == "input" else client.read_holding_registers
        rr = await self._call(f"{kind} {address}+{count}", read(address, count=count, device_id=self.cfg.unit))
        regs = list(rr.registers)
        if len(regs) != count:
            raise FacilityDeviceError(f"{self.name} {kind} {address}+{count}: {len(regs)} registers back")
        return regs

    def _scaled(self, regs: list[int]) -> float:
        return min(100.0, regs[0] * 100.0 / self.cfg.full_scale)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
