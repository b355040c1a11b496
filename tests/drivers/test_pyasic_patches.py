"""The CPU patches to pyasic change nothing but cost: same command lists, same text."""

from __future__ import annotations

import pytest

from drivers import pyasic_patches
from drivers.pyasic_driver import build_miner

CLASSES = ["LUXMinerS19jPro", "BTMinerM60SVK30:BTMinerV3", "BTMinerM50SVH50:BTMinerV2", "BMMinerS19jPro"]


@pytest.mark.parametrize("driver_class", CLASSES)
def test_patched_get_commands_and_repr_equal_pyasics_own(driver_class: str) -> None:
    assert pyasic_patches.applied()  # importing the driver applies them
    rpc = build_miner(driver_class, "127.20.252.1").rpc
    patched = (rpc.get_commands(), repr(rpc), rpc.commands)
    try:
        pyasic_patches.revert()
        fresh = build_miner(driver_class, "127.20.252.1").rpc
        original = (fresh.get_commands(), repr(fresh), fresh.commands)
    finally:
        pyasic_patches.apply()
    assert patched == original
    assert len(patched[0]) > 5
    assert "127.20.252.1" in patched[1]


def test_cached_command_list_is_a_copy_callers_cannot_corrupt() -> None:
    rpc = build_miner("LUXMinerS19jPro", "127.20.252.2").rpc
    rpc.get_commands().clear()
    assert "profileset" in rpc.get_commands()
