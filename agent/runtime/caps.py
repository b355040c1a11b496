"""The site's caps: the licensed cap (config) and the run-time caps by source, a grid `cap` (signed, MQTT) and an
operator `cap` (local socket); None = not set. Separate inputs, the lowest binds. Persisted together under
CAPS_STATE_KEY, so a restart keeps them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hashflex.agent.core.arbitration import effective_cap_kw
from hashflex.agent.runtime.ports import ControlStore

CAPS_STATE_KEY = "caps"  # {"grid_kw": float | None, "operator_kw": float | None}


@dataclass(slots=True)
class Caps:
    licensed_kw: float
    grid_kw: float | None = None
    operator_kw: float | None = None

    def effective_kw(self) -> float:
        return effective_cap_kw(self.licensed_kw, self.grid_kw, self.operator_kw)

    @property
    def runtime_kw(self) -> float | None:
        """The lower of the run-time caps (grid, operator), or None when neither is set."""
        caps = [c for c in (self.grid_kw, self.operator_kw) if c is not None]
        return min(caps) if caps else None

    def save(self, store: ControlStore) -> None:
        store.set_state(CAPS_STATE_KEY, {"grid_kw": self.grid_kw, "operator_kw": self.operator_kw})

    def load(self, store: ControlStore) -> None:
        caps = store.get_state(CAPS_STATE_KEY, None)
        if isinstance(caps, dict):
            self.grid_kw, self.operator_kw = _kw(caps.get("grid_kw")), _kw(caps.get("operator_kw"))
        else:
            # state written before caps were kept by source: one cap of unknown source. Taken as the grid's, the
            # safe reading (a local `cap` cannot lift it without --lift-grid-cap)
            self.grid_kw, self.operator_kw = _kw(store.get_state("runtime_cap_kw", None)), None


def _kw(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None
