"""sd_notify on real AF_UNIX datagram sockets, as systemd's manager would receive it (with the sender's pid)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hashflex.agent.io.sdnotify import SdNotifier, watchdog_interval


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for systemd's notify socket, with SO_PASSCRED to see who sent."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(10)
    yield path, sock
    sock.close()


def receive(sock: socket.socket) -> tuple[str, int]:
    """One datagram and the pid of the process that sent it (what NotifyAccess=main checks)."""
    data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    pid = -1
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid, _uid, _gid = struct.unpack("3i", payload[: struct.calcsize("3i")])
    return data.decode(), pid


def test_ready_status_watchdog_stopping_extend(manager: tuple[str, socket.socket]) -> None:
    path, sock = manager
    notifier = SdNotifier(path)
    assert notifier.enabled
    assert notifier.ready("tick 1 target 41.2 MW")
    assert notifier.status("tick 2\nsecond line")
    assert notifier.watchdog()
    assert notifier.extend_timeout(90)
    assert notifier.stopping()
    got = [receive(sock) for _ in range(5)]
    assert [text for text, _ in got] == [
        "READY=1\nSTATUS=tick 1 target 41.2 MW",
        "STATUS=tick 2 second line",
        "WATCHDOG=1",
        "EXTEND_TIMEOUT_USEC=90000000",
        "STOPPING=1",
    ]
    assert {pid for _, pid in got} == {os.getpid()}


def test_abstract_namespace_address() -> None:
    name = f"hashflex-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(10)
    try:
        assert SdNotifier("@" + name).watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_reads_notify_socket_from_the_environment(
    manager: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sock = manager
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert SdNotifier().ready()
    assert receive(sock)[0] == "READY=1"


def test_outside_systemd_it_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SdNotifier()
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False


def test_a_gone_manager_socket_is_reported_not_raised(tmp_path: Path) -> None:
    assert SdNotifier(str(tmp_path / "nobody-here.sock")).ready() is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 100_000)}, None),  # meant for another pid
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


def test_a_child_process_notifies_ready_then_pings_then_stops(manager: tuple[str, socket.socket]) -> None:
    """The lifecycle from a separate process, as the agent under systemd would send it."""
    path, sock = manager
    script = textwrap.dedent(
        """
        import time
        from hashflex.agent.io.sdnotify import SdNotifier, watchdog_interval
        n = SdNotifier()
        interval = watchdog_interval()
        assert interval == 0.05, interval
        n.ready("state loaded, fleet read")
        for _ in range(3):
            time.sleep(interval)
            n.watchdog()
        n.stopping()
        """
    )
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"}
    env.pop("WATCHDOG_PID", None)
    child = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        got = [receive(sock) for _ in range(5)]
    finally:
        assert child.wait(timeout=30) == 0
    assert [text for text, _ in got] == [
        "READY=1\nSTATUS=state loaded, fleet read",
        "WATCHDOG=1",
        "WATCHDOG=1",
        "WATCHDOG=1",
        "STOPPING=1",
    ]
    assert {pid for _, pid in got} == {child.pid}
