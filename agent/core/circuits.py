"""The electrical tree: site → transformer → container → PDU. Every node has a cap; loads add up to the root.

Built from plain values (the runtime maps `site.circuits` from the config). Modelled on evcc's circuit.go: the
worst-case load of every node must stay at or under its cap, and a check guards only increases — a reduction
always goes through (`delta = max(0, new - old)`), so shedding load can never be refused by a full circuit.

Every rule about the tree lives here, and the config check calls the same code the runtime does: `CircuitTree`
(ids, parents, cycles, caps), `caps_above_parents` (a site file's typo guard) and `membership` (which circuit
counts a miner). A miner counts on one circuit and, through its path, on every ancestor; so it may be listed by
a circuit and one of its descendants (it belongs to the deepest), never by two circuits side by side — one of
them would never count it (`check_membership`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hashflex.agent.core.addresses import address, expand, span

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
        if not math.isfinite(site_cap_kw) or site_cap_kw < 0:
            raise ValueError(f"site cap must be a finite, non-negative kW, got {site_cap_kw}")
        by_id: dict[str, Circuit] = {}
        for c in items:
            if c.id == ROOT:
                raise ValueError(
                    f"circuit id {ROOT!r} is reserved for the site itself; name the circuit after its equipment"
                )
            if c.id in by_id:
                raise ValueError(f"circuit id {c.id!r} is repeated")
            if not math.isfinite(c.cap_kw) or c.cap_kw < 0:
                raise ValueError(f"circuit {c.id!r} has a negative or non-finite cap {c.cap_kw}")
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

    def index(self, node: str) -> int:
        return self._index[node]

    def parent_index(self, index: int) -> int | None:
        path = self._paths[self._ids[index]]
        return path[1] if len(path) > 1 else None

    def nested(self, a: str, b: str) -> bool:
        """Is one of the two circuits the other or an ancestor of it?"""
        return self._index[a] in self._paths[b] or self._index[b] in self._paths[a]

    def caps_above_parents(self) -> list[str]:
        """Why a circuit's cap is above its parent's (or the site's), one sentence each; a config refuses these.

        The planner itself copes (the parent binds), so the tree allows them; in a site file it is a typo."""
        out = []
        for i in range(1, len(self._ids)):
            parent = self.parent_index(i)
            if parent is not None and self._caps[i] > self._caps[parent]:
                cap, parent_cap = self._caps[i], self._caps[parent]
                out.append(f"circuit {self._ids[i]!r} cap_kw={cap} exceeds its parent's cap ({parent_cap} kW)")
        return out

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


# ---------------------------------------------------------------------------------------------------- membership
def check_membership(tree: CircuitTree, members: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Raise ValueError if two circuits that are not ancestor and descendant list a common address.

    `members` is (circuit id, address specs) in config order. Works on address runs, never expanding them."""
    order = {cid: n for n, (cid, _specs) in enumerate(members)}
    for cid, _specs in members:
        if not tree.knows(cid) or cid == ROOT:
            raise ValueError(f"miners listed for circuit {cid!r}, which is not defined")
    runs = sorted((*span(spec), cid) for cid, specs in members for spec in specs)
    open_runs: list[tuple[int, str]] = []  # (last address, circuit) of runs that may still overlap the next
    for first, last, cid in runs:
        open_runs = [(end, other) for end, other in open_runs if end >= first]
        for _end, other in open_runs:
            if other != cid and not tree.nested(other, cid):
                a, b = sorted((other, cid), key=order.__getitem__)
                raise ValueError(
                    f"circuits {a!r} and {b!r} both list {address(first)}, and neither is below the other: a "
                    f"miner is fed by one of them, and the other would never count it (list it once)"
                )
        open_runs.append((last, cid))


def membership(tree: CircuitTree, members: Sequence[tuple[str, Sequence[str]]]) -> dict[str, str]:
    """Address → the circuit that feeds it: the deepest circuit listing it (its ancestors count it via its path).

    Refuses overlapping siblings (`check_membership`): first-listed-wins would leave one circuit blind."""
    check_membership(tree, members)
    out: dict[str, str] = {}
    for cid, specs in sorted(members, key=lambda m: -tree.depth(tree.index(m[0]))):  # deepest first
        for ip in expand(specs):
            out.setdefault(ip, cid)
    return out
