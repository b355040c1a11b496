"""sd_notify(3) without a dependency (as synapse does: "easier to duplicate it here than to add a dependency").

The agent says READY=1 only once state is loaded and the fleet read, STATUS= a one-line summary each tick
(shown by `systemctl status`), WATCHDOG=1 from a tick that completed (so a hung loop gets restarted),
EXTEND_TIMEOUT_USEC= during a long first sweep, and STOPPING=1 on the way out. Outside systemd
($NOTIFY_SOCKET unset) every call is a cheap no-op; a failed send is logged by the caller, never raised.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class SdNotifier:
    def __init__(self, address: str | None = None) -> None:
        raw = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        # "@name" is Linux's abstract namespace: on the wire the name starts with a NUL byte
        self.address: str | None = ("\0" + raw[1:] if raw.startswith("@") else raw) or None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` lines in one datagram. True if sent, False if not under systemd or it failed."""
        if self.address is None or not assignments:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(assignments).encode())
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text.replace(chr(10), ' ')}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before systemd gives up on a start (or stop) in progress."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when no watchdog applies to us."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
        pid = int(env.get("WATCHDOG_PID", "0") or "0")
    except ValueError:
        return None
    if usec <= 0 or (pid and pid != os.getpid()):
        return None
    return usec / 2_000_000
