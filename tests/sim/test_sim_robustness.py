"""Malformed input on every port gets the firmware's error answer or a closed connection, never a crash."""

from __future__ import annotations

import contextlib
import json
import random
import socket
from collections.abc import Iterator

import pyasic
import pytest

from hashflex.sim.testing import SimProcess
from tests.sim.conftest import ips_of

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(miners=3, mix="luxos:1,whatsminer:1,antminer:1", base_ip="127.16.0.1", seed=1) as site:
        yield site


def exchange(ip: str, port: int, payload: bytes, *, half_close: bool = False, timeout: float = 5.0) -> bytes:
    with socket.create_connection((ip, port), timeout=timeout) as s:
        try:
            s.sendall(payload)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close on an oversized request before we finish writing
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def rpc_error(reply: bytes) -> dict[str, object]:
    doc = json.loads(reply.rstrip(b"\x00"))
    status = doc["STATUS"][0] if isinstance(doc["STATUS"], list) else doc
    assert status["STATUS"] == "E", doc
    return status  # type: ignore[no-any-return]


def v3_frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "little") + body


def v3_reply(raw: bytes) -> dict[str, object]:
    n = int.from_bytes(raw[:4], "little")
    return json.loads(raw[4 : 4 + n])  # type: ignore[no-any-return]


@pytest.mark.parametrize("family", ["luxos", "whatsminer", "antminer"])
def test_rpc_port_answers_garbage_with_firmware_errors(sim: SimProcess, family: str) -> None:
    ip = ips_of(sim, family)[0]
    assert rpc_error(exchange(ip, 4028, b"\xff\xfe garbage \x00"))["Code"] in (14, 23)
    assert rpc_error(exchange(ip, 4028, b'{"command": "summ', half_close=True))["Code"] == 23
    assert rpc_error(exchange(ip, 4028, b"[1, 2, 3]"))["Code"] == 23
    assert rpc_error(exchange(ip, 4028, b'{"command": 5}'))
    assert rpc_error(exchange(ip, 4028, b'{"command": "no_such_command"}'))["Code"] == 14
    huge = b'{"command": "summary", "parameter": "' + b"A" * 200_000 + b'"}'
    assert rpc_error(exchange(ip, 4028, huge))["Code"] == 23
    many = json.loads(exchange(ip, 4028, json.dumps({"command": "+".join(["summary"] * 500)}).encode()))
    assert len(many) <= 17  # a multicommand is capped, not amplified


def test_luxos_privileged_commands_with_odd_parameters_are_refused(sim: SimProcess) -> None:
    ip = ips_of(sim, "luxos")[0]
    for parameter in ({"a": 1}, [1, 2], "", ",,,,", "x" * 5000, None, 12):
        body = json.dumps({"command": "profileset", "parameter": parameter}).encode()
        assert rpc_error(exchange(ip, 4028, body))["Code"] == 45
    assert sim.truth()["miners"][0]["profile"] == "default"


def test_whatsminer_v3_port_survives_bad_frames(sim: SimProcess) -> None:
    ip = ips_of(sim, "whatsminer")[0]
    assert v3_reply(exchange(ip, 4433, b"\xff\xff\xff\xff{}"))["code"] == -1
    assert v3_reply(exchange(ip, 4433, v3_frame(b"not json"), half_close=True))["code"] == -1
    assert v3_reply(exchange(ip, 4433, v3_frame(b'{"cmd": "get.nothing"}'), half_close=True))["code"] == -2
    assert (
        v3_reply(exchange(ip, 4433, v3_frame(b'{"cmd": "set.miner.service", "param": "stop"}'), half_close=True))[
            "code"
        ]
        == -3
    )
    assert v3_reply(exchange(ip, 4433, v3_frame(b'{"cmd": ["x"]}'), half_close=True))["code"] == -1
    # a truncated frame and a half-close: the connection just ends
    assert exchange(ip, 4433, b"\x10\x00\x00\x00{", half_close=True) == b""
    assert next(m for m in sim.truth()["miners"] if m["ip"] == ip)["state"] == "hashing"


def test_http_ports_survive_bad_requests(sim: SimProcess) -> None:
    ip = ips_of(sim, "antminer")[0]
    assert exchange(ip, 80, b"\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert exchange(ip, 80, b"GET / HTTP/1.1\r\nContent-Length: nope\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert exchange(ip, 80, b"GET / HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n").startswith(b"HTTP/1.1 413")
    big = b"POST /cgi-bin/set_miner_conf.cgi HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n"
    assert exchange(ip, 80, big).startswith(b"HTTP/1.1 413")
    assert exchange(ip, 80, b"GET /cgi-bin/get_system_info.cgi HTTP/1.1\r\nAuthorization: Digest x\r\n\r\n").startswith(
        b"HTTP/1.1 401"
    )
    assert exchange(ip, 80, b"GET / HTTP/1.1\r\nHost: x", half_close=True).startswith(b"HTTP/1.1 400")
    truth = sim.truth_url.removeprefix("http://").split(":")
    host, port = truth[0], int(truth[1])
    assert exchange(host, port, b"GET /nope HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    bad = b"POST /faults HTTP/1.1\r\nContent-Length: 5\r\n\r\n{{{{{"
    assert exchange(host, port, bad).startswith(b"HTTP/1.1 400")


async def test_antminer_cgi_refuses_bad_config_bodies(sim: SimProcess) -> None:
    ip = ips_of(sim, "antminer")[0]
    miner = await pyasic.get_miner(ip)
    for body in ({"miner-mode": "fast"}, {"miner-mode": 7}, {"miner-mode": None}):
        assert (await miner.web.set_miner_conf(body))["stats"] == "error"
    assert next(m for m in sim.truth()["miners"] if m["ip"] == ip)["mode"] == "normal"


def still_answers(ip: str, port: int) -> bool:
    """A well-formed request on `port` gets the firmware's answer."""
    if port == 4028:
        doc = json.loads(exchange(ip, port, b'{"command": "summary"}').rstrip(b"\x00"))
        return bool(doc["STATUS"][0]["STATUS"] == "S")
    if port == 4433:
        return v3_reply(exchange(ip, port, v3_frame(b'{"cmd": "get.nothing"}'), half_close=True))["code"] == -2
    return exchange(ip, port, b"GET /nope HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 ")


def test_random_bytes_on_every_port_never_take_the_site_down(sim: SimProcess) -> None:
    rng = random.Random(20240601)
    ports = {"luxos": (4028,), "whatsminer": (4028, 4433), "antminer": (4028, 80)}
    for family, family_ports in ports.items():
        ip = ips_of(sim, family)[0]
        for port in family_ports:
            for _ in range(40):
                payload = rng.randbytes(rng.randint(1, 3000))
                # a payload that looks like the start of a request just waits: that is fine
                with contextlib.suppress(TimeoutError):
                    exchange(ip, port, payload, half_close=True, timeout=3)
            assert still_answers(ip, port), f"{family} {ip}:{port} no longer answers after random bytes"
    assert len(sim.truth()["miners"]) == len(sim.ips)  # the simulator itself is still up


async def test_the_site_still_serves_everyone_afterwards(sim: SimProcess) -> None:
    assert sim._proc is not None
    assert sim._proc.poll() is None
    for ip in sim.ips:
        miner = await pyasic.get_miner(ip)
        assert miner is not None
        assert type(miner).__name__ not in ("LUXMiner", "UnknownMiner")
    assert "Traceback" not in sim.log_text()
