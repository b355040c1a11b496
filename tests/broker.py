"""A real Mosquitto for the tests, built from the shipped example config (configs/mosquitto/).

`Mosquitto(workdir)` rewrites configs/mosquitto/mosquitto.conf for a throwaway run: every listener moves to
a free port on 127.0.0.1, /etc/mosquitto/… and /var/lib/mosquitto/… move under `workdir`, the log goes to a
file, and the persistence database is saved every second (so a SIGKILLed broker keeps its sessions). The ACL
is the shipped one, verbatim. A throwaway CA, server and client certificates (and an unrelated "wrong" CA)
are made with `cryptography`; the password file with `mosquitto_passwd`.

    broker = Mosquitto(tmp_path).start()
    broker.plain_port, broker.password_port, broker.tls_port, broker.pki.ca_cert, ...
    broker.kill(); broker.start()          # same ports, same persistence
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DIR = REPO / "configs" / "mosquitto"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
HOST = "127.0.0.1"

# usernames in the example ACL's world: a site's username is its site id
DEFAULT_USERS: Mapping[str, str] = {
    "site-a": "site-a-password",
    "site-b": "site-b-password",
    "grid-operator": "grid-operator-password",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


# ------------------------------------------------------------------------------------------------ certificates
@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path  # CN = site-a, signed by the CA
    client_key: Path
    wrong_ca_cert: Path  # a CA that signed nothing here: trusting it instead must fail


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    cn: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, *, server: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: Path) -> Pki:
    """A throwaway CA with a server certificate (localhost, 127.0.0.1) and a client certificate (CN site-a)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca("hashflex test CA")
    server, server_key = _leaf("localhost", ca, ca_key, server=True)
    client, client_key = _leaf("site-a", ca, ca_key, server=False)
    wrong_ca, _ = _ca("some other CA")
    pki = Pki(
        ca_cert=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        wrong_ca_cert=directory / "wrong-ca.crt",
    )
    pem = serialization.Encoding.PEM
    pki.ca_cert.write_bytes(ca.public_bytes(pem))
    pki.server_cert.write_bytes(server.public_bytes(pem))
    _write_key(pki.server_key, server_key)
    pki.client_cert.write_bytes(client.public_bytes(pem))
    _write_key(pki.client_key, client_key)
    pki.wrong_ca_cert.write_bytes(wrong_ca.public_bytes(pem))
    return pki


def write_password_file(path: Path, users: Mapping[str, str]) -> None:
    """A Mosquitto password file, made by mosquitto_passwd as README.md tells operators to."""
    path.unlink(missing_ok=True)
    for i, (user, password) in enumerate(users.items()):
        args = ["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(path), user, password]
        subprocess.run(args, check=True, capture_output=True, timeout=30)
    path.chmod(0o600)


# ---------------------------------------------------------------------------------------------- the broker
_LISTENER = re.compile(r"^listener\s+(\d+)(\s+\S+)?\s*$")
_OVERRIDDEN = ("log_dest", "log_type", "autosave_interval", "user", "pid_file")


def render_config(example: str, *, ports: Mapping[int, int], workdir: Path, log_file: Path) -> str:
    """The example config with its listeners on `ports` (example port -> test port) and paths under `workdir`."""
    lines: list[str] = []
    for raw in example.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.split()[0] in _OVERRIDDEN:
            continue
        match = _LISTENER.match(line)
        if match:
            example_port = int(match.group(1))
            if example_port not in ports:
                raise ValueError(f"the example config has a listener on {example_port} the tests do not know")
            line = f"listener {ports[example_port]} {HOST}"
        line = line.replace("/etc/mosquitto/", f"{workdir}/").replace("/var/lib/mosquitto/", f"{workdir}/data/")
        lines.append(line)
    # global options for a test run, placed after per_listener_settings (which must come first)
    test_globals = [
        f"log_dest file {log_file}",
        "log_type all",
        "autosave_interval 1",
        *(["user root"] if os.geteuid() == 0 else []),
    ]
    return "\n".join([lines[0], *test_globals, *lines[1:]]) + "\n"


class Mosquitto:
    """One mosquitto process with the example config's three listeners (plain, password, TLS)."""

    def __init__(self, workdir: Path, *, users: Mapping[str, str] = DEFAULT_USERS, pki: Pki | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        self.users = dict(users)
        self.host = HOST
        self.plain_port = free_port()
        self.password_port = free_port()
        self.tls_port = free_port()
        certs = self.workdir / "certs"
        self.pki = pki or make_pki(certs)
        if pki is not None:  # the config names certs/ca.crt etc. under workdir
            certs.mkdir(exist_ok=True)
            for src, name in ((pki.ca_cert, "ca.crt"), (pki.server_cert, "server.crt"), (pki.server_key, "server.key")):
                shutil.copy(src, certs / name)
        write_password_file(self.workdir / "passwd", self.users)
        shutil.copy(EXAMPLE_DIR / "acl", self.workdir / "acl")
        self.log_file = self.workdir / "mosquitto.log"
        self.config_file = self.workdir / "mosquitto.conf"
        self.config_file.write_text(
            render_config(
                (EXAMPLE_DIR / "mosquitto.conf").read_text(),
                ports={1883: self.plain_port, 1884: self.password_port, 8883: self.tls_port},
                workdir=self.workdir,
                log_file=self.log_file,
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ports(self) -> tuple[int, int, int]:
        return self.plain_port, self.password_port, self.tls_port

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 15.0) -> Mosquitto:
        if self.alive:
            return self
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}: {stderr}\n{self.log()}")
            if all(_listening(port) for port in self.ports):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not open its ports within {timeout} s\n{self.log()}")

    def stop(self) -> None:
        """Clean shutdown (SIGTERM: sessions and retained messages are saved)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Crash (SIGKILL): whatever was saved in the last autosave survives."""
        self._end(signal.SIGKILL)

    def _end(self, sig: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()

    @property
    def database(self) -> Path:
        return self.workdir / "data" / "mosquitto.db"

    def wait_saved(self, since: float, timeout: float = 10.0) -> None:
        """Until the persistence database has been saved after wall time `since` (autosave runs every ~2 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.database.stat().st_mtime > since:
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"mosquitto did not save {self.database} within {timeout} s")

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


class _Proxy:
    """A TCP proxy on a free loopback port in front of a real broker (`async with`); `_serve` handles a client."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


async def _read_packet(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One MQTT packet: (fixed header byte + remaining-length varint, body)."""
    header = await reader.readexactly(1)
    length, shift = 0, 0
    while True:
        byte = await reader.readexactly(1)
        header += byte
        length |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            return header, await reader.readexactly(length)


class Mqtt311OnlyProxy(_Proxy):
    """A proxy that behaves like a broker without MQTT 5.

    A CONNECT asking for protocol level 5 gets what an MQTT 3.1.1 broker answers (CONNACK "unacceptable
    protocol version") and the connection is closed; any other connection is piped to the broker untouched.
    `levels` records the protocol level of every CONNECT seen.
    """

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.levels: list[int] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header, body = await _read_packet(reader)
            name_len = int.from_bytes(body[:2], "big")
            level = body[2 + name_len]
            self.levels.append(level)
            if level == 5:
                writer.write(b"\x20\x02\x00\x01")  # CONNACK, return code 1: unacceptable protocol version
                await writer.drain()
                return
            up_reader, up_writer = await asyncio.open_connection(HOST, self.upstream_port)
            up_writer.write(header + body)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()


class PubackDroppingProxy(_Proxy):
    """A proxy that can turn into a half-broken link: while `drop_pubacks` is set, every PUBACK from the broker is
    dropped (the broker still takes the PUBLISH and delivers it; everything else passes). What a client sees when the
    broker cannot store a QoS 1 message (a NATS node whose MQTT streams lost their leader) or a middlebox eats packets
    one way: the connection looks alive, no publish completes."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.drop_pubacks = False
        self.dropped = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.upstream_port)
            await asyncio.gather(_pipe(reader, up_writer), self._downstream(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _downstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Broker to client, one MQTT packet at a time."""
        try:
            while True:
                header, body = await _read_packet(reader)
                if self.drop_pubacks and header[0] >> 4 == 4:  # PUBACK
                    self.dropped += 1
                    continue
                writer.write(header + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
