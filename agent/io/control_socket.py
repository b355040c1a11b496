"""The local control API: a Unix socket the CLI talks to, so the gateway's shell works with the network down.

Wire: the client writes one JSON line `{"verb": "...", "payload": {...}}`; the server answers one JSON line,
`Reply.to_dict()`. A connection may carry several requests, one after the other. The server is a thin
transport: it hands verb and payload to the same `CommandHandler` the MQTT side uses, with `Channel.LOCAL`.

Access is by file permissions: the socket is mode 0660, owned by the agent's user and (optionally) an operator
group; its folder is created 0750. The socket is bound under a temporary name, given its mode and group, and
then renamed into place, so it is never reachable with looser permissions and a stale file from a crashed
agent is replaced atomically. A lock file next to it keeps a second agent from stealing the name; a socket
someone still answers on is never replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import grp
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hashflex.agent.logging import get_logger
from hashflex.agent.protocol import Channel, CommandHandler
from hashflex.contract.reply import Reply
from hashflex.contract.requests import MAX_DEPTH, READ_VERBS, load_json

DEFAULT_MAX_LINE_BYTES = 1 << 20  # a request is a few hundred bytes; anything near this is not a CLI
MAX_REPLY_BYTES = 256 << 20  # `miners` on a 10k-miner site is a few MB
DEFAULT_TIMEOUT_S = 10.0
SOCKET_MODE = 0o660
DIR_MODE = 0o750
_UNIX_PATH_MAX = 107

log = get_logger("control_socket")


class ControlSocketError(Exception):
    """The server cannot take its socket. The message says what to do."""


class AgentUnavailable(Exception):
    """The client could not get a reply. `reason`: missing | refused | permission | timeout | protocol | error."""

    def __init__(self, message: str, *, path: Path, reason: str) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


# ------------------------------------------------------------------------------------------------------ server
class ControlServer:
    def __init__(
        self,
        path: str | Path,
        handler: CommandHandler,
        *,
        group: str | None = None,
        mode: int = SOCKET_MODE,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_connections: int = 64,
        idle_timeout_s: float = 300.0,
    ) -> None:
        self.path = Path(path)
        self.handler = handler
        self.group = group
        self.mode = mode
        self.max_line_bytes = max_line_bytes
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self._server: asyncio.Server | None = None
        self._lock_fd: int | None = None
        self._inode: int | None = None
        self._clients: set[asyncio.Task[None]] = set()

    def hand_over(self, handler: CommandHandler) -> None:
        """Answer from now on with `handler`: the agent answers on its socket while it waits for its store (a
        handler that says so) and hands the same socket to its command service once it runs; a client connected
        across the hand-over gets its next answer from the service."""
        self.handler = handler

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Take the socket: create its folder, lock, replace a stale socket, bind with mode and group."""
        if self._server is not None:
            return
        gid = _group_id(self.group)
        self._prepare_dir(gid)
        self._take_lock()
        try:
            sock = self._bind(gid)
            self._server = await asyncio.start_unix_server(self._on_client, sock=sock, limit=self.max_line_bytes + 1)
        except BaseException:
            self._release_lock()
            raise
        log.info("control socket listening", path=str(self.path), mode=oct(self.mode), group=self.group)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await server.wait_closed()
        with contextlib.suppress(OSError):
            if self._inode is not None and os.lstat(self.path).st_ino == self._inode:
                self.path.unlink()  # only our own socket: a successor may already have replaced it
        self._release_lock()
        log.info("control socket closed", path=str(self.path))

    # -------------------------------------------------------------------------------------------- set-up steps
    def _prepare_dir(self, gid: int | None) -> None:
        parent = self.path.parent
        if parent.exists():
            return
        try:
            parent.mkdir(parents=True, mode=DIR_MODE)
            os.chmod(parent, DIR_MODE)  # mkdir's mode is cut by the umask
            if gid is not None:
                os.chown(parent, -1, gid)
        except OSError as exc:
            raise ControlSocketError(
                f"cannot create the control socket's folder {parent}: {exc.strerror}; create it "
                f"(systemd: RuntimeDirectory=hashflex) or set control_socket.path"
            ) from None

    def _take_lock(self) -> None:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ControlSocketError(
                f"cannot create {self.lock_path}: {exc.strerror}; is {self.path.parent} writable by the agent's user?"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ControlSocketError(
                f"another hashflex agent holds {self.path} (its lock {self.lock_path} is taken): stop it first "
                f"(`systemctl stop hashflex`) or give this one another control_socket.path"
            ) from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock; the file stays (unlinking it would race a new locker)

    def _bind(self, gid: int | None) -> socket.socket:
        self._refuse_live_or_foreign()
        tmp = self.path.parent / f".hf{os.getpid()}.sock"
        if len(os.fsencode(tmp)) > _UNIX_PATH_MAX or len(os.fsencode(self.path)) > _UNIX_PATH_MAX:
            raise ControlSocketError(
                f"control socket path {self.path} is too long for a Unix socket ({_UNIX_PATH_MAX} bytes at most); "
                f"set a shorter control_socket.path"
            )
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, self.mode)
            if gid is not None:
                os.chown(tmp, -1, gid)
            sock.listen(64)
            os.replace(tmp, self.path)  # atomic: the name points at a socket with the right mode from the start
            self._inode = os.lstat(self.path).st_ino
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            hint = " (join that group, or run the agent as its member)" if exc.errno == errno.EPERM else ""
            raise ControlSocketError(f"cannot create the control socket {self.path}: {exc.strerror}{hint}") from None
        sock.setblocking(False)
        return sock

    def _refuse_live_or_foreign(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(
                f"{self.path} exists and is not a socket: refusing to replace it; move it away or set "
                f"control_socket.path"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except OSError:
            log.info("replacing a stale control socket", path=str(self.path))
            return  # refused (or unreadable): nobody listens there any more
        finally:
            probe.close()
        raise ControlSocketError(
            f"another process is listening on {self.path}: stop it first (`systemctl stop hashflex`) or set "
            f"control_socket.path"
        )

    # --------------------------------------------------------------------------------------------- serving
    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= self.max_connections:
            await _send(writer, Reply.error(None, "busy", "too many control connections; try again"))
            await _close(writer)
            return
        self._clients.add(task)
        peer = _peer(writer)
        try:
            await self._serve(reader, writer, peer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            await _close(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: dict[str, int]) -> None:
        while True:
            last = False
            try:
                async with asyncio.timeout(self.idle_timeout_s):
                    line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:  # EOF: a last request without its newline still counts
                line, last = exc.partial, True
                if not line.strip():
                    return
            except asyncio.LimitOverrunError:
                log.warning("control request too large", limit=self.max_line_bytes, **peer)
                reply = Reply.error(None, "too_large", f"request line longer than {self.max_line_bytes} bytes")
                await _send(writer, reply)
                return  # the stream is mid-line: it cannot be resynchronised
            except TimeoutError:
                return
            try:
                reply = await self._dispatch(line, peer)
            except Exception:  # never drop the connection without an answer
                log.exception("control request failed", **peer)
                reply = Reply.error(None, "internal", "the agent failed on this request; see its log")
            await _send(writer, reply)
            if last:
                return

    async def _dispatch(self, line: bytes, peer: dict[str, int]) -> Reply:
        try:
            # the same strict reader as the command gate (bounded nesting, finite numbers, no duplicate keys), one
            # level deeper for the envelope: nothing a client writes can raise out of here and drop the connection
            request = load_json(line, max_depth=MAX_DEPTH + 1)
        except ValueError as exc:
            return Reply.error(None, "bad_request", f"not a JSON line: {exc}")
        if not isinstance(request, dict):
            return Reply.error(None, "bad_request", 'expected {"verb": ..., "payload": {...}}')
        verb, payload = request.get("verb"), request.get("payload", {})
        if payload is None:
            payload = {}
        request_id = payload.get("id") if isinstance(payload, dict) and isinstance(payload.get("id"), str) else None
        if not isinstance(verb, str) or not verb:
            return Reply.error(request_id, "bad_request", "missing 'verb' (a string)")
        if not isinstance(payload, dict):
            return Reply.error(request_id, "bad_request", "'payload' must be a JSON object")
        started = time.monotonic()
        try:
            reply = await self.handler.handle(verb[:64], json.dumps(payload).encode(), Channel.LOCAL)
        except Exception:
            log.exception("control request failed", verb=verb, **peer)
            return Reply.error(
                request_id, "internal", "the agent failed on this request; see its log (`journalctl -u hashflex`)"
            )
        # verbs that only read: logged at debug; everything else with the caller's uid (who curtailed?)
        level = log.debug if verb in READ_VERBS else log.info
        level(
            "control request",
            verb=verb,
            status=reply.status,
            error=reply.error_code,
            dur_ms=round((time.monotonic() - started) * 1000, 1),
            **peer,
        )
        return reply


def _group_id(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlSocketError(
            f"control_socket.group {group!r} does not exist: create it (`systemd-sysusers`, or `groupadd {group}`) "
            f"or remove the setting"
        ) from None


def _peer(writer: asyncio.StreamWriter) -> dict[str, int]:
    sock = writer.get_extra_info("socket")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return {}
    pid, uid, gid = struct.unpack("3i", raw)
    return {"peer_pid": pid, "peer_uid": uid, "peer_gid": gid}


async def _send(writer: asyncio.StreamWriter, reply: Reply) -> None:
    writer.write(reply.to_json() + b"\n")
    await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.CancelledError):
        await writer.wait_closed()


# ------------------------------------------------------------------------------------------------------ client
def _encode(verb: str, payload: Mapping[str, Any] | None) -> bytes:
    return json.dumps({"verb": verb, "payload": dict(payload or {})}, separators=(",", ":")).encode() + b"\n"


def _decode(raw: bytes, path: Path, verb: str) -> Reply:
    if not raw.strip():
        raise AgentUnavailable(
            f"the agent at {path} closed the connection without answering {verb!r}; see its log "
            f"(`journalctl -u hashflex -n 50`)",
            path=path,
            reason="protocol",
        )
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    if not isinstance(doc, dict) or "status" not in doc:
        raise AgentUnavailable(
            f"{path} answered {verb!r} with something that is not a hashflex reply: is it the agent's socket?",
            path=path,
            reason="protocol",
        )
    return Reply.from_dict(doc)


def _owner_group(path: Path) -> str | None:
    for candidate in (path, path.parent):
        try:
            gid = os.stat(candidate).st_gid
        except OSError:
            continue
        try:
            return grp.getgrgid(gid).gr_name
        except KeyError:
            return str(gid)
    return None


def explain_os_error(path: Path, verb: str, exc: BaseException, timeout: float) -> AgentUnavailable:
    """A message a person can act on, for each way reaching the agent fails."""
    status_hint = "is it running? `systemctl status hashflex` (or `hashflex run --config FILE`)"
    if isinstance(exc, TimeoutError):
        return AgentUnavailable(
            f"the agent at {path} did not answer {verb!r} within {timeout:g}s: it may be busy or stuck; "
            f"see `journalctl -u hashflex -n 50`",
            path=path,
            reason="timeout",
        )
    if isinstance(exc, FileNotFoundError):
        return AgentUnavailable(
            f"no agent listening on {path} (no socket there): {status_hint}. If it runs with another config, "
            f"pass the same --config.",
            path=path,
            reason="missing",
        )
    if isinstance(exc, ConnectionRefusedError):
        return AgentUnavailable(
            f"no agent listening on {path} (a stale socket left by a stopped agent): {status_hint}",
            path=path,
            reason="refused",
        )
    if isinstance(exc, PermissionError):
        group = _owner_group(path) or "hashflex"
        return AgentUnavailable(
            f"permission denied on {path}: join group {group!r} (`sudo usermod -aG {group} $USER`, then log in "
            f"again) or run the command with sudo",
            path=path,
            reason="permission",
        )
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return AgentUnavailable(f"cannot reach the agent at {path}: {detail}", path=path, reason="error")


async def request(
    path: str | Path,
    verb: str,
    payload: Mapping[str, Any] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,  # noqa: ASYNC109 (the plan's signature; one deadline for the whole exchange)
) -> Reply:
    """Send one request and return the agent's Reply (ok or error). Raises AgentUnavailable if there is none."""
    path = Path(path)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_REPLY_BYTES)
            writer.write(_encode(verb, payload))
            await writer.drain()
            try:
                raw = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                raw = exc.partial
    except asyncio.LimitOverrunError:
        raise AgentUnavailable(
            f"the reply to {verb!r} is larger than {MAX_REPLY_BYTES} bytes", path=path, reason="protocol"
        ) from None
    except (OSError, TimeoutError) as exc:
        raise explain_os_error(path, verb, exc, timeout) from None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return _decode(raw, path, verb)


def request_sync(
    path: str | Path, verb: str, payload: Mapping[str, Any] | None = None, timeout: float = DEFAULT_TIMEOUT_S
) -> Reply:
    """The same as `request`, with a blocking socket (for the CLI; works inside or outside an event loop)."""
    path = Path(path)
    deadline = time.monotonic() + timeout
    buf = bytearray()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(_encode(verb, payload))
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
                if b"\n" in chunk:
                    break
                if len(buf) > MAX_REPLY_BYTES:
                    raise AgentUnavailable(
                        f"the reply to {verb!r} is larger than {MAX_REPLY_BYTES} bytes", path=path, reason="protocol"
                    )
    except (OSError, TimeoutError) as exc:
        raise explain_os_error(path, verb, exc, timeout) from None
    return _decode(bytes(buf).split(b"\n", 1)[0], path, verb)
