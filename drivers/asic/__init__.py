"""The miner driver on pyasic 0.79.0: the only package of hashflex that imports pyasic (in `vendor`, with the
patches of `drivers.pyasic_patches`).

pyasic knows how to talk to every firmware; this package fences off how it behaves at site scale (the tests in
tests/drivers/ show each point against the simulated site and misbehaving ports, through unmodified pyasic):

- `driver`: identification bounded and timed, once per miner; `attach` rebuilds pyasic's object with no I/O.
- `handle`: every call runs under `asyncio.timeout` (pyasic's RPC has no connect timeout and a 100 s read
  timeout). Control calls end as `Ok | Unsupported | Failed(reason, retryable)`: where pyasic answers True
  without looking, the reply is checked or the state read back; a stale cached session or salt is renewed once
  (pyasic never does).
- `collect`: reads send pyasic's own RPC/web commands and hand the replies to pyasic's own parsers, so an empty
  reply is `Unreachable` and a garbled one `ProtocolError` (pyasic turns a refused connection into a reading
  full of None).
- One profile module per firmware family (`luxos`, `whatsminer`, `antminer`, `braiins`; `profile.BaseProfile`
  for the rest), listed in `families.PROFILES`: each says what its firmware does differently, against the
  `profile.FirmwareProfile` Protocol. Adding a family is one module plus its entry there.
- `vendor`: pyasic configures the root logger when imported; the root logger is put back as it was found.
"""

from hashflex.drivers.asic.collect import infer_mining
from hashflex.drivers.asic.driver import CLASSES, PyasicDriver, build_miner, family_of, telemetry_options
from hashflex.drivers.asic.handle import SLOW_FIELDS_EVERY, PyasicHandle, round_to_capability
from hashflex.drivers.asic.vendor import PYASIC_VERSION

__all__ = [
    "CLASSES",
    "PYASIC_VERSION",
    "SLOW_FIELDS_EVERY",
    "PyasicDriver",
    "PyasicHandle",
    "build_miner",
    "family_of",
    "infer_mining",
    "round_to_capability",
    "telemetry_options",
]
