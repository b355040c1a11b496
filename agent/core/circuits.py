"""The electrical tree: site → transformer → container → PDU. Every node has a cap; loads add up to the root.

Built from plain values (the runtime maps `site.circuits` from the config). Modelled on evcc's circuit.go: the
worst-case load of every node must stay at or under its cap, and a check guards only increases — a reduction
always goes through (`delta = max(0, new - old)`), so shedding load can never be refused by a full circuit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ROOT = "site"  # the root node's id; reserved, no circuit may use it


@dataclass(frozen=True, slots=True)
class Circuit:
    id: str
    parent: str | None  # None hangs the circuit directly under the site
    cap_kw: float


class CircuitTree:
    """An immutable tree of caps. Node 0 is the site; `path(circuit)` runs from a circuit up to the site."""

    __slots__ = ("_caps", "_depth", "_ids", "_index", "_paths")

    def __init__(self, site_cap_kw: float, circuits: Iterable[Circuit] = ()) -> None:
        items = list(circuits)
        if site_cap_kw < 0:
            raise ValueError(f"site cap must not be negative, got {site_cap_kw}")
        by_id: dict[str, Circuit] = {}
        for c in items:
            if c.id == ROOT:
                raise ValueError(f"circuit id {ROOT!r} is reserved for the site itself")
            if c.id in by_id:
                raise ValueError(f"circuit id {c.id!r} is repeated")
            if c.cap_kw < 0:
                raise ValueError(f"circuit {c.id!r} has a negative cap {c.cap_kw}")
            by_id[c.id] = c
        for c in items:
            if c.parent is not None and c.parent not in by_id:
                raise ValueError(f"circuit {c.id!r} names parent {c.parent!r}, which is not defined")
        self._ids: list[str] = [ROOT]
        self._caps: list[float] = [site_cap_kw]
        self._index: dict[str, int] = {ROOT: 0}
        self._depth: list[int] = [0]
        paths: dict[str, tuple[int, ...]] = {}

        def resolve(cid: str, seen: tuple[str, ...]) -> tuple[int, ...]:
            if cid in paths:
                return paths[cid]
            if cid in seen:
                raise ValueError(f"circuit {cid!r} is part of a parent cycle")
            c = by_id[cid]
            parent_path = (0,) if c.parent is None else resolve(c.parent, (*seen, cid))
            idx = len(self._ids)
            self._ids.append(cid)
            self._caps.append(c.cap_kw)
            self._index[cid] = idx
            self._depth.append(len(parent_path))
            paths[cid] = (idx, *parent_path)
            return paths[cid]

        for c in items:
            resolve(c.id, ())
        paths[ROOT] = (0,)
        self._paths = paths

    # ------------------------------------------------------------------------------------------------ lookups
    @property
    def ids(self) -> tuple[str, ...]:
        """Node ids; index 0 is the site. Parents come before their children."""
        return tuple(self._ids)

    def cap_kw(self, node: str) -> float:
        return self._caps[self._index[node]]

    def caps_kw(self) -> list[float]:
        return list(self._caps)

    def knows(self, circuit: str | None) -> bool:
        return circuit is None or circuit in self._paths

    def path(self, circuit: str | None) -> tuple[int, ...]:
        """Node indices from `circuit` up to and including the site. None (or the site) is the site alone."""
        if circuit is None:
            return (0,)
        return self._paths[circuit]

    def depth(self, index: int) -> int:
        return self._depth[index]

    def subtree_contains(self, ancestor: int, circuit: str | None) -> bool:
        return ancestor in self.path(circuit)

    def with_site_cap(self, site_cap_kw: float) -> CircuitTree:
        """The same tree with another site cap (the effective target becomes the root's cap when planning)."""
        clone = object.__new__(CircuitTree)
        clone._ids, clone._index, clone._depth, clone._paths = self._ids, self._index, self._depth, self._paths
        clone._caps = [site_cap_kw, *self._caps[1:]]
        return clone

    # ------------------------------------------------------------------------------------------------ loads
    def loads_kw(self, contributions: Iterable[tuple[str | None, float]]) -> dict[str, float]:
        """Load of every node (its whole subtree) from (circuit, kW) pairs."""
        totals = [0.0] * len(self._ids)
        for circuit, kw in contributions:
            for i in self.path(circuit):
                totals[i] += kw
        return dict(zip(self._ids, totals, strict=True))

    def overloads(self, loads: Mapping[str, float], tolerance_kw: float = 1e-9) -> list[tuple[str, float, float]]:
        """(node, load, cap) for every node whose load exceeds its cap."""
        return [
            (node, loads.get(node, 0.0), cap)
            for node, cap in zip(self._ids, self._caps, strict=True)
            if loads.get(node, 0.0) > cap + tolerance_kw
        ]

    def check_change(self, loads: Mapping[str, float], circuit: str | None, old_kw: float, new_kw: float) -> str | None:
        """May a load on `circuit` move from old_kw to new_kw? None = yes; else the first node that would overflow.

        Only the increase is checked (evcc validatePower): a reduction always passes, even on an overloaded node.
        """
        delta = max(0.0, new_kw - old_kw)
        if delta == 0.0:
            return None
        for i in self.path(circuit):
            node = self._ids[i]
            if loads.get(node, 0.0) + delta > self._caps[i] + 1e-9:
                return node
        return None
