"""The control socket on a real Unix socket: the wire format, bad input, limits, permissions, stale sockets,
and the client's errors a person can act on. The handler is a small real CommandHandler written here."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from hashflex.agent.io.control_socket import (
    AgentUnavailable,
    ControlServer,
    ControlSocketError,
    request,
    request_sync,
)
from hashflex.agent.protocol import Channel
from hashflex.contract.reply import Reply

pytestmark = pytest.mark.timeout(60)


class Handler:
    """Our own interface, implemented for the test: ping, echo, a slow verb and one that crashes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], Channel]] = []

    async def handle(self, verb: str, payload: bytes, channel: Channel, *, retained: bool = False) -> Reply:
        body = json.loads(payload)
        self.calls.append((verb, body, channel))
        rid = body.get("id")
        if verb == "ping":
            return Reply.ok(rid, {"pong": True})
        if verb == "echo":
            return Reply.ok(rid, {"payload": body, "channel": channel.value})
        if verb == "slow":
            await asyncio.sleep(float(body.get("s", 5)))
            return Reply.ok(rid)
        if verb == "crash":
            raise RuntimeError("handler bug")
        return Reply.error(rid, "unknown_verb", f"no verb {verb!r}")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # short, world-traversable path: AF_UNIX paths are limited to 107 bytes, and one test connects as nobody
    path = Path(tempfile.mkdtemp(prefix="hf-ops-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def server(sock_dir: Path) -> AsyncIterator[ControlServer]:
    srv = ControlServer(sock_dir / "run" / "control.sock", Handler(), max_line_bytes=4096, idle_timeout_s=5)
    await srv.start()
    yield srv
    await srv.close()


async def raw_exchange(path: Path, data: bytes, replies: int, *, eof: bool = False) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    await writer.drain()
    if eof:
        writer.write_eof()
    out = [json.loads(await reader.readline()) for _ in range(replies)]
    writer.close()
    await writer.wait_closed()
    return out


async def test_request_round_trip_over_the_socket(server: ControlServer) -> None:
    reply = await request(server.path, "echo", {"id": "r1", "to_kw": 12000.0}, timeout=5)
    assert reply.is_ok
    assert reply.id == "r1"
    assert reply.data == {"payload": {"id": "r1", "to_kw": 12000.0}, "channel": "local"}
    handler = server.handler
    assert isinstance(handler, Handler)
    assert handler.calls == [("echo", {"id": "r1", "to_kw": 12000.0}, Channel.LOCAL)]


async def test_sync_client_round_trip(server: ControlServer) -> None:
    reply = await asyncio.to_thread(request_sync, server.path, "ping", {"id": "p"}, 5)
    assert reply.is_ok
    assert reply.data == {"pong": True}
    assert reply.id == "p"


async def test_error_reply_is_returned_not_raised(server: ControlServer) -> None:
    reply = await request(server.path, "nope", {"id": "x"})
    assert not reply.is_ok
    assert (reply.error_code, reply.id) == ("unknown_verb", "x")


async def test_several_requests_on_one_connection_and_a_last_line_without_newline(server: ControlServer) -> None:
    data = b'{"verb":"ping","payload":{"id":"a"}}\n{"verb":"ping","payload":{"id":"b"}}\n{"verb":"ping"}'
    replies = await raw_exchange(server.path, data, 3, eof=True)
    assert [(r["status"], r["id"]) for r in replies] == [("ok", "a"), ("ok", "b"), ("ok", None)]


@pytest.mark.parametrize(
    ("line", "code", "words"),
    [
        (b"this is not json\n", "bad_request", "not a JSON line"),
        (b"[1, 2]\n", "bad_request", "expected"),
        (b'{"payload": {}}\n', "bad_request", "missing 'verb'"),
        (b'{"verb": "ping", "payload": [1]}\n', "bad_request", "must be a JSON object"),
        (b'{"verb": 7}\n', "bad_request", "missing 'verb'"),
        (b"\xff\xfe\n", "bad_request", "not a JSON line"),
    ],
)
async def test_bad_lines_get_an_error_and_the_connection_stays_usable(
    server: ControlServer, line: bytes, code: str, words: str
) -> None:
    bad, good = await raw_exchange(server.path, line + b'{"verb":"ping","payload":{"id":"after"}}\n', 2)
    assert bad["status"] == "error"
    assert bad["error"]["code"] == code
    assert words in bad["error"]["message"]
    assert good["status"] == "ok"
    assert good["id"] == "after"
    handler = server.handler
    assert isinstance(handler, Handler)
    assert [verb for verb, _, _ in handler.calls] == ["ping"]  # bad lines never reach the handler


async def test_oversize_line_is_refused_and_the_server_keeps_serving(server: ControlServer) -> None:
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    writer.write(b'{"verb":"echo","payload":{"x":"' + b"a" * 10_000 + b'"}}\n')
    await writer.drain()
    reply = json.loads(await reader.readline())
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "too_large"
    assert await reader.read() == b""  # closed: a stream cut mid-line cannot be resynchronised
    writer.close()
    handler = server.handler
    assert isinstance(handler, Handler)
    assert handler.calls == []
    assert (await request(server.path, "ping", {})).is_ok


async def test_a_handler_crash_is_an_internal_error_reply(server: ControlServer) -> None:
    reply = await request(server.path, "crash", {"id": "c1"})
    assert (reply.status, reply.error_code, reply.id) == ("error", "internal", "c1")
    assert "journalctl -u hashflex" in (reply.error_message or "")
    assert (await request(server.path, "ping", {})).is_ok


async def test_socket_mode_0660_in_a_new_folder_0750(server: ControlServer) -> None:
    assert stat.S_ISSOCK(os.lstat(server.path).st_mode)
    assert stat.S_IMODE(os.lstat(server.path).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(server.path.parent).st_mode) == 0o750
    assert not [p.name for p in server.path.parent.iterdir() if p.name.startswith(".hf")]  # no temp socket left


async def test_operator_group_owns_socket_and_folder(sock_dir: Path) -> None:
    group = grp.getgrgid(1).gr_name  # "daemon": any group other than ours
    srv = ControlServer(sock_dir / "g" / "control.sock", Handler(), group=group)
    async with srv:
        assert os.stat(srv.path).st_gid == 1
        assert os.stat(srv.path.parent).st_gid == 1
        assert (await request(srv.path, "ping", {})).is_ok


async def test_unknown_group_is_refused_with_a_remedy(sock_dir: Path) -> None:
    srv = ControlServer(sock_dir / "control.sock", Handler(), group="no-such-group-hf")
    with pytest.raises(ControlSocketError, match="does not exist: create it"):
        await srv.start()
    assert not (sock_dir / "control.sock").exists()


async def test_stale_socket_from_a_dead_agent_is_replaced(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what a crash leaves behind
    old_inode = os.lstat(path).st_ino
    async with ControlServer(path, Handler()) as srv:
        assert os.lstat(path).st_ino != old_inode
        assert (await request(srv.path, "ping", {})).is_ok


async def test_a_regular_file_in_the_way_is_never_deleted(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    path.write_text("operator notes")
    with pytest.raises(ControlSocketError, match="not a socket: refusing"):
        await ControlServer(path, Handler()).start()
    assert path.read_text() == "operator notes"


async def test_a_live_listener_is_not_stolen(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))
    other.listen(1)
    inode = os.lstat(path).st_ino
    try:
        with pytest.raises(ControlSocketError, match="another process is listening"):
            await ControlServer(path, Handler()).start()
        assert os.lstat(path).st_ino == inode  # still the other process's socket
    finally:
        other.close()


async def test_a_second_agent_on_the_same_path_is_refused(server: ControlServer) -> None:
    with pytest.raises(ControlSocketError, match="another hashflex agent holds"):
        await ControlServer(server.path, Handler()).start()
    assert (await request(server.path, "ping", {})).is_ok  # the first one is untouched


async def test_close_removes_the_socket_and_frees_the_lock(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    async with ControlServer(path, Handler()):
        assert path.exists()
    assert not path.exists()
    async with ControlServer(path, Handler()) as again:  # the lock was released
        assert (await request(again.path, "ping", {})).is_ok


async def test_close_leaves_a_successors_socket_alone(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    srv = ControlServer(path, Handler())
    await srv.start()
    path.unlink()
    successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    successor.bind(str(path))
    try:
        await srv.close()
        assert path.exists()
    finally:
        successor.close()


async def test_idle_connections_are_closed(sock_dir: Path) -> None:
    async with ControlServer(sock_dir / "c.sock", Handler(), idle_timeout_s=0.2) as srv:
        reader, writer = await asyncio.open_unix_connection(str(srv.path))
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""
        writer.close()


async def test_connection_limit_answers_busy(sock_dir: Path) -> None:
    async with ControlServer(sock_dir / "c.sock", Handler(), max_connections=1) as srv:
        first_reader, first = await asyncio.open_unix_connection(str(srv.path))
        first.write(b'{"verb":"ping"}\n')
        await first.drain()
        assert json.loads(await first_reader.readline())["status"] == "ok"  # the first connection is held open
        reply = await request(srv.path, "ping", {})
        assert (reply.status, reply.error_code) == ("error", "busy")
        first.close()


async def test_server_close_with_a_request_in_flight(sock_dir: Path) -> None:
    srv = ControlServer(sock_dir / "c.sock", Handler())
    await srv.start()
    pending = asyncio.create_task(request(srv.path, "slow", {"s": 30}, timeout=20))
    await asyncio.sleep(0.2)
    await srv.close()
    with pytest.raises(AgentUnavailable) as info:
        await pending
    assert info.value.reason == "protocol"


# ------------------------------------------------------------------------------------------ client errors
def test_no_socket_says_what_to_do(sock_dir: Path) -> None:
    path = sock_dir / "missing" / "control.sock"
    with pytest.raises(AgentUnavailable) as info:
        request_sync(path, "status", {})
    assert info.value.reason == "missing"
    message = str(info.value)
    assert f"no agent listening on {path}" in message
    assert "systemctl status hashflex" in message


async def test_no_socket_async_client(sock_dir: Path) -> None:
    with pytest.raises(AgentUnavailable) as info:
        await request(sock_dir / "control.sock", "status", {})
    assert info.value.reason == "missing"


def test_stale_socket_is_refused_connection(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    with pytest.raises(AgentUnavailable) as info:
        request_sync(path, "status", {})
    assert info.value.reason == "refused"
    assert "stale socket" in str(info.value)
    assert "systemctl status hashflex" in str(info.value)


async def test_timeout_names_the_verb_and_the_journal(server: ControlServer) -> None:
    with pytest.raises(AgentUnavailable) as info:
        await asyncio.to_thread(request_sync, server.path, "slow", {"s": 5}, 0.3)
    assert info.value.reason == "timeout"
    assert "'slow'" in str(info.value)
    assert "journalctl -u hashflex" in str(info.value)
    with pytest.raises(AgentUnavailable) as again:
        await request(server.path, "slow", {"s": 5}, timeout=0.3)
    assert again.value.reason == "timeout"


async def test_something_else_on_the_socket_is_a_protocol_error(sock_dir: Path) -> None:
    async def not_hashflex(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"HTTP/1.0 400 Bad Request\n")
        await writer.drain()
        writer.close()

    path = sock_dir / "other.sock"
    srv = await asyncio.start_unix_server(not_hashflex, str(path))
    try:
        with pytest.raises(AgentUnavailable) as info:
            await asyncio.to_thread(request_sync, path, "status", {})
        assert info.value.reason == "protocol"
        assert "not a hashflex reply" in str(info.value)
    finally:
        srv.close()


async def test_permission_denied_tells_which_group_to_join(server: ControlServer) -> None:
    """A user outside the socket's group (here: nobody, in a forked child) gets told which group to join."""
    os.chmod(server.path.parent, 0o755)  # let nobody reach the socket itself, so its mode is what refuses
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody, try the socket, report through the pipe
        code = 3
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            request_sync(server.path, "status", {}, 5)
        except AgentUnavailable as exc:
            os.write(write_end, f"{exc.reason}\n{exc}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    with os.fdopen(read_end) as pipe:
        reason, message = pipe.read().split("\n", 1)
    assert os.waitstatus_to_exitcode(status) == 0
    assert reason == "permission"
    group = grp.getgrgid(os.stat(server.path).st_gid).gr_name
    assert f"join group {group!r}" in message
    assert "usermod -aG" in message
