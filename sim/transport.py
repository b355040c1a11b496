"""Wire framings shared by the families: cgminer-style JSON over TCP, Whatsminer v3 length-prefixed JSON, and a
minimal HTTP/1.1 server. One asyncio.Protocol per connection (cheaper than streams); the family object only maps a
request to a reply, and the transport applies the network faults (blackhole, slow, error)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Protocol, cast

import structlog

log = structlog.get_logger("sim.transport")


class Device(Protocol):
    """What a transport needs from the thing it serves (a simulated miner, or the truth endpoint)."""

    def note_connection(self) -> None: ...
    def latency_s(self) -> float: ...
    def rpc_error_bytes(self, code: int, msg: str) -> bytes: ...
    def handle_rpc(self, req: dict[str, Any]) -> bytes | None: ...
    def v3_error(self, code: int, msg: str) -> dict[str, Any]: ...
    def handle_v3(self, req: dict[str, Any]) -> dict[str, Any] | None: ...
    def handle_http(self, port: int, request: HttpRequest) -> bytes | asyncio.Future[bytes] | None: ...


MAX_REQUEST = 64 * 1024  # bigger requests are refused: no firmware takes more
IDLE_CLOSE_S = 15.0  # a client that sends half a request and waits gets closed
BLACKHOLE_HOLD_S = 600.0


def _open_depth(text: bytes) -> int:
    """Nesting depth left open at the end of `text` (strings skipped): > 0 means the object is not finished."""
    depth = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == 0x5C:  # backslash
                esc = True
            elif ch == 0x22:
                in_str = False
        elif ch == 0x22:
            in_str = True
        elif ch in (0x7B, 0x5B):
            depth += 1
        elif ch in (0x7D, 0x5D):
            depth -= 1
            if depth < 0:
                return -1
    return depth + (1 if in_str else 0)


class _Base(asyncio.Protocol):
    __slots__ = ("buf", "device", "done", "idle", "transport")

    def __init__(self, device: Device) -> None:
        self.device = device
        self.buf = b""
        self.done = False
        self.transport: asyncio.Transport | None = None
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.idle = asyncio.get_running_loop().call_later(IDLE_CLOSE_S, self._abort)
        self.device.note_connection()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        self.transport = None

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def reply(self, data: bytes | None, *, close: bool = True) -> None:
        """Send `data` (after the slow fault's latency) and close; None = the blackhole fault: hold the line."""
        self.done = True
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        if data is None:
            self.idle = asyncio.get_running_loop().call_later(BLACKHOLE_HOLD_S, self._abort)
            return
        delay = self.device.latency_s()
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._send, data, close)
        else:
            self._send(data, close)

    def _send(self, data: bytes, close: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(data)
        if close:
            t.close()


class RpcProtocol(_Base):
    """cgminer-style API on 4028: one JSON object (no newline, no half-close needed), one reply, then close."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buf += data
        if len(self.buf) > MAX_REQUEST:
            self.reply(self.device.rpc_error_bytes(23, "JSON request too long"))
            return
        text = self.buf.rstrip(b"\x00 \r\n\t")
        if not text:
            return
        if text[:1] != b"{":
            self.reply(self.device.rpc_error_bytes(23, "Invalid JSON"))
            return
        try:
            req = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if _open_depth(text) > 0:
                return  # incomplete: wait for more (or EOF / idle timeout)
            self.reply(self.device.rpc_error_bytes(23, "Invalid JSON"))
            return
        if not isinstance(req, dict):
            self.reply(self.device.rpc_error_bytes(23, "Invalid JSON"))
            return
        try:
            answer = self.device.handle_rpc(req)
        except Exception:  # a bug in one reply must not take the site down: answer like a confused firmware
            log.exception("rpc handler failed", request=str(req)[:200])
            answer = self.device.rpc_error_bytes(45, "Internal error")
        self.reply(answer)

    def eof_received(self) -> bool | None:
        if not self.done and self.buf.strip(b"\x00 \r\n\t"):
            self.reply(self.device.rpc_error_bytes(23, "Invalid JSON"))
            return True
        return None


class V3Protocol(_Base):
    """Whatsminer API v3 on 4433: 4-byte little-endian length + JSON, both ways. The connection stays open for
    further requests, as the firmware's does."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 4:
            n = int.from_bytes(self.buf[:4], "little")
            if n <= 0 or n > MAX_REQUEST:
                self._frame_reply(self.device.v3_error(-1, "invalid length"), close=True)
                self.buf = b""
                return
            if len(self.buf) < 4 + n:
                return
            body, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
            try:
                req = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                req = None
            if not isinstance(req, dict):
                self._frame_reply(self.device.v3_error(-1, "invalid json"), close=False)
                continue
            try:
                reply = self.device.handle_v3(req)
            except Exception:
                log.exception("v3 handler failed", request=str(req)[:200])
                reply = self.device.v3_error(-1, "internal error")
            if reply is None:
                self.reply(None)
                return
            self._frame_reply(reply, close=False)
        if self.idle is not None:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(IDLE_CLOSE_S, self._abort)

    def _frame_reply(self, obj: dict[str, Any], *, close: bool) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        data = len(body).to_bytes(4, "little") + body
        delay = self.device.latency_s()
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._send, data, close)
        else:
            self._send(data, close)


class HttpRequest:
    __slots__ = ("body", "headers", "method", "path", "query")

    def __init__(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        path, _, query = target.partition("?")
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body


REASONS = {
    200: "OK",
    307: "Temporary Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    500: "Internal Server Error",
}


def http_response(
    status: int, body: bytes = b"", content_type: str = "text/html", extra: dict[str, str] | None = None
) -> bytes:
    head = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    for k, v in (extra or {}).items():
        head.append(f"{k}: {v}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class HttpProtocol(_Base):
    """Just enough HTTP/1.1 for pyasic's httpx: one request per connection, Content-Length bodies."""

    __slots__ = ("max_request", "port")

    def __init__(self, device: Device, port: int, max_request: int = MAX_REQUEST) -> None:
        super().__init__(device)
        self.port = port
        self.max_request = max_request

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buf += data
        if len(self.buf) > self.max_request:
            self.reply(http_response(413, b"Payload Too Large"))
            return
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        try:
            lines = self.buf[:head_end].decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length", "0"))
        except ValueError:
            self.reply(http_response(400, b"Bad Request"))
            return
        if length < 0 or length > self.max_request:
            self.reply(http_response(413, b"Payload Too Large"))
            return
        body = self.buf[head_end + 4 :]
        if len(body) < length:
            return
        try:
            result = self.device.handle_http(self.port, HttpRequest(method, target, headers, body[:length]))
        except Exception:
            log.exception("http handler failed", path=target[:200])
            result = http_response(500, b"Internal Server Error")
        if isinstance(result, asyncio.Future):
            self.done = True
            result.add_done_callback(self._deferred)
        else:
            self.reply(result)

    def _deferred(self, fut: asyncio.Future[bytes]) -> None:
        try:
            data = fut.result()
        except Exception:  # a bug in a handler must not take the site down
            data = http_response(500, b"Internal Server Error")
        self.reply(data)

    def eof_received(self) -> bool | None:
        if not self.done and self.buf:
            self.reply(http_response(400, b"Bad Request"))
            return True
        return None
