"""The CPU patches to pyasic change nothing but cost: same command lists, same text."""

from __future__ import annotations

from typing import Any, ClassVar

import httpx
import pytest
from pyasic import settings

from hashflex.drivers import pyasic_patches
from hashflex.drivers.asic import build_miner
from hashflex.sim.testing import SimProcess

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


class _CountingTransport(httpx.AsyncHTTPTransport):
    """pyasic's own transport, counting what goes over it."""

    sent: ClassVar[list[tuple[str, int]]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        self.sent.append((request.url.path, response.status_code))
        return response


async def test_stock_antminer_calls_answer_the_digest_challenge_once_and_reply_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same replies as pyasic's own `send_command`, over real HTTP Digest to a simulated stock Antminer; after
    the first call, each CGI call is one exchange instead of two (no 401 round trip)."""
    monkeypatch.setattr(settings, "transport", lambda verify=settings.ssl_cxt: _CountingTransport(verify=verify))
    with SimProcess(miners=1, mix="antminer:100", base_ip="127.20.253.1", seed=5) as sim:
        ip = sim.ips[0]

        async def conf_twice() -> tuple[list[dict[str, Any]], list[tuple[str, int]]]:
            _CountingTransport.sent = []
            web = build_miner("BMMinerS19jPro", ip).web
            replies = [await web.get_miner_conf(), await web.get_miner_conf()]
            return replies, list(_CountingTransport.sent)

        patched, patched_sent = await conf_twice()
        try:
            pyasic_patches.revert()
            original, original_sent = await conf_twice()
        finally:
            pyasic_patches.apply()
    assert patched == original
    assert patched[0]["bitmain-work-mode"] == "0"
    assert [code for _, code in original_sent] == [401, 200, 401, 200]
    assert [code for _, code in patched_sent] == [401, 200, 200]
