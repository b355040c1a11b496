"""Nominal figures per miner model: pure data, keyed by pyasic's model names (`str(miner.raw_model)`).

`nominal_w` and `nominal_ths` are the maker's stock figures (full power, stock firmware settings); they
fill `Identity.nominal_*` and are what the fleet assumes an unknown or unreachable miner draws.
`min_limit_w` is the lowest power limit firmware with a continuous limit accepts (Whatsminer, Braiins);
where no figure is listed the driver uses `DEFAULT_MIN_LIMIT_SHARE` of nominal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Continuous power limits below about half of nominal are refused or make the hash boards unstable on
# every firmware we know of; this is the floor the driver offers when a model has no figure of its own.
DEFAULT_MIN_LIMIT_SHARE = 0.5
# A miner of unknown model is assumed to draw this much (a typical air-cooled SHA-256 unit): never zero.
UNKNOWN_MODEL_W = 3500.0
# What a sleeping miner still draws (control board, fans at idle); used when the miner does not say.
STANDBY_W = 20.0


@dataclass(frozen=True, slots=True)
class ModelSpec:
    nominal_w: float
    nominal_ths: float
    min_limit_w: float | None = None


CATALOGUE: dict[str, ModelSpec] = {
    # Bitmain Antminer (stock, LuxOS and Braiins run on the same hardware; pyasic names the hardware)
    "S9": ModelSpec(1323, 13.5),
    "S17": ModelSpec(2385, 53),
    "S17 Pro": ModelSpec(2094, 53),
    "S19": ModelSpec(3250, 95),
    "S19 Pro": ModelSpec(3250, 110),
    "S19j": ModelSpec(3100, 90),
    "S19j Pro": ModelSpec(3068, 104),
    "S19j Pro+": ModelSpec(3355, 122),
    "S19k Pro": ModelSpec(2760, 120),
    "S19 XP": ModelSpec(3010, 141),
    "S19 XP Hyd": ModelSpec(5346, 255),
    "T19": ModelSpec(3150, 84),
    "S21": ModelSpec(3500, 200),
    "S21 Pro": ModelSpec(3510, 234),
    "S21 XP": ModelSpec(3645, 270),
    "S21+": ModelSpec(3564, 216),
    "T21": ModelSpec(3610, 190),
    # MicroBT Whatsminer (pyasic appends the board revision, e.g. "M60S VK10"; lookup strips it)
    "M30S": ModelSpec(3344, 88, 1700),
    "M30S+": ModelSpec(3400, 100, 1700),
    "M30S++": ModelSpec(3472, 112, 1800),
    "M50": ModelSpec(3306, 114, 1650),
    "M50S": ModelSpec(3276, 126, 1700),
    "M50S+": ModelSpec(3306, 138, 1650),
    "M53S": ModelSpec(6554, 260, 3300),
    "M56S": ModelSpec(5550, 212, 2800),
    "M60": ModelSpec(3422, 172, 1700),
    "M60S": ModelSpec(3441, 186, 1800),
    "M60S+": ModelSpec(3450, 200, 1700),
    "M63S": ModelSpec(7215, 390, 3600),
    "M66S": ModelSpec(5513, 298, 2750),
}

_REVISION = re.compile(r"\s+V[A-Z]*\d+$", re.IGNORECASE)
_FOLDED = {name.casefold(): spec for name, spec in CATALOGUE.items()}


def lookup(model: str | None) -> ModelSpec | None:
    """The spec for a pyasic model name, ignoring case and a Whatsminer board revision suffix."""
    if not model:
        return None
    spec = CATALOGUE.get(model)
    if spec is not None:
        return spec
    return _FOLDED.get(model.casefold()) or _FOLDED.get(_REVISION.sub("", model).casefold())
