"""The circuit tree: building, worst-case loads per node, and the reduction-always-passes check."""

from __future__ import annotations

import pytest

from hashflex.agent.core.circuits import ROOT, Circuit, CircuitTree, check_membership, membership


def site() -> CircuitTree:
    return CircuitTree(
        100.0,
        [
            Circuit("pdu-a1", "container-a", 20.0),  # children may come before their parents
            Circuit("transformer", None, 80.0),
            Circuit("container-a", "transformer", 50.0),
            Circuit("pdu-a2", "container-a", 25.0),
        ],
    )


def test_paths_run_from_a_circuit_up_to_the_site() -> None:
    t = site()
    assert [t.ids[i] for i in t.path("pdu-a1")] == ["pdu-a1", "container-a", "transformer", ROOT]
    assert [t.ids[i] for i in t.path(None)] == [ROOT]
    assert t.ids[0] == ROOT
    assert t.cap_kw(ROOT) == 100.0


def test_parents_come_before_children_in_ids() -> None:
    t = site()
    for cid in t.ids[1:]:
        path = t.path(cid)
        assert all(p < path[0] for p in path[1:])


def test_loads_add_up_the_tree() -> None:
    loads = site().loads_kw([("pdu-a1", 10.0), ("pdu-a2", 5.0), (None, 3.0), ("transformer", 1.0)])
    assert loads == {ROOT: 19.0, "transformer": 16.0, "container-a": 15.0, "pdu-a1": 10.0, "pdu-a2": 5.0}


def test_overloads_name_every_node_over_its_cap() -> None:
    t = site()
    loads = t.loads_kw([("pdu-a1", 30.0), ("pdu-a2", 24.0)])
    assert [node for node, _, _ in t.overloads(loads)] == ["container-a", "pdu-a1"]


def test_with_site_cap_changes_only_the_root() -> None:
    t = site().with_site_cap(40.0)
    assert t.cap_kw(ROOT) == 40.0
    assert t.cap_kw("pdu-a1") == 20.0
    assert site().cap_kw(ROOT) == 100.0


@pytest.mark.parametrize(
    ("circuits", "message"),
    [
        ([Circuit("site", None, 1.0)], "reserved"),
        ([Circuit("a", None, 1.0), Circuit("a", None, 2.0)], "repeated"),
        ([Circuit("a", "ghost", 1.0)], "not defined"),
        ([Circuit("a", "b", 1.0), Circuit("b", "a", 1.0)], "cycle"),
        ([Circuit("a", None, -1.0)], "negative"),
    ],
)
def test_bad_trees_are_refused(circuits: list[Circuit], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CircuitTree(10.0, circuits)


def test_unknown_circuits_are_reported() -> None:
    t = site()
    assert t.knows(None)
    assert t.knows("pdu-a2")
    assert not t.knows("pdu-z9")
    assert t.subtree_contains(t.ids.index("container-a"), "pdu-a2")


# ---------------------------------------------------------------------------------------------- membership
def test_a_miner_listed_by_a_circuit_and_its_descendant_belongs_to_the_deepest() -> None:
    t = site()
    members = [("transformer", ["10.0.0.0/24"]), ("pdu-a1", ["10.0.0.10-20"]), ("container-a", ["10.0.0.1-50"])]
    of = membership(t, members)
    assert of["10.0.0.15"] == "pdu-a1"  # listed three times; the PDU counts it, and so do its ancestors
    assert of["10.0.0.30"] == "container-a"
    assert of["10.0.0.200"] == "transformer"
    loads = t.loads_kw([(of["10.0.0.15"], 3.0)])
    assert loads["pdu-a1"] == loads["container-a"] == loads["transformer"] == loads[ROOT] == 3.0


def test_a_miner_in_two_sibling_circuits_is_refused() -> None:
    # first-listed-wins used to put it on pdu-a1 only: pdu-a2 never counted it
    members = [("pdu-a1", ["10.0.0.1-10.0.0.20"]), ("pdu-a2", ["10.0.0.0/28"])]
    with pytest.raises(ValueError, match=r"'pdu-a1' and 'pdu-a2' both list 10\.0\.0\.1,"):
        membership(site(), members)
    t = CircuitTree(100.0, [Circuit("tx1", None, 50.0), Circuit("tx2", None, 50.0), Circuit("pdu", "tx2", 9.0)])
    with pytest.raises(ValueError, match=r"'tx1' and 'pdu' both list 10\.0\.0\.7, and neither is below the other"):
        check_membership(t, [("tx1", ["10.0.0.0/24"]), ("pdu", ["10.0.0.7"])])  # cousins, not siblings: same
    check_membership(site(), [("transformer", ["10.0.0.7"]), ("pdu-a2", ["10.0.0.7"])])  # nested: allowed


def test_circuits_with_miners_must_exist() -> None:
    with pytest.raises(ValueError, match="'ghost', which is not defined"):
        check_membership(site(), [("ghost", ["10.0.0.7"])])


def test_caps_above_parents_are_reported() -> None:
    t = CircuitTree(100.0, [Circuit("tx", None, 120.0), Circuit("pdu", "tx", 50.0), Circuit("pdu2", "tx", 130.0)])
    assert t.caps_above_parents() == [
        "circuit 'tx' cap_kw=120.0 exceeds its parent's cap (100.0 kW)",
        "circuit 'pdu2' cap_kw=130.0 exceeds its parent's cap (120.0 kW)",
    ]
    assert site().caps_above_parents() == []


@pytest.mark.parametrize("cap", [float("inf"), float("nan")])
def test_non_finite_caps_are_refused(cap: float) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        CircuitTree(10.0, [Circuit("a", None, cap)])
    with pytest.raises(ValueError, match="finite"):
        CircuitTree(cap, [])
