"""The contract between the command transports (MQTT, the local control socket) and the runtime.

Transports are thin: they hand the raw verb and payload to one `CommandHandler` and send back the `Reply`
it returns. Parsing, signature checks, freshness, idempotency and applying the command all live behind it,
so MQTT and the CLI share one set of verbs and one validation. The requests and the `Reply` themselves are the wire
contract (`hashflex.contract`); this module holds the agent's side of it: the ports a transport hands over to.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol

from hashflex.contract.reply import Reply


class Channel(StrEnum):
    MQTT = "mqtt"  # remote: grid commands must be signed by a grid key, operator ones by an operator key
    LOCAL = "local"  # the Unix control socket: trusted by file permissions (owner and operator group)


class CommandHandler(Protocol):
    async def handle(self, verb: str, payload: bytes, channel: Channel, *, retained: bool = False) -> Reply:
        """Validate and apply one request. Never raises for bad input: bad input is an error Reply."""
        ...


class HeartbeatSink(Protocol):
    def heartbeat(self, payload: bytes) -> None:
        """A grid heartbeat arrived (the fail-safe's input), unchecked: the sink (agent.runtime.service) passes on
        only a signed, fresh one for this site, newer than the last. Non-blocking; never raises."""
        ...
