"""How CLI commands reach the running agent: find its socket from the config, send one verb, handle failure.

Every failure ends the command with a message that says what to do (see `control_socket.explain_os_error`):
exit 2 when there is no agent to talk to (or no usable config), exit 1 when the agent refused.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from hashflex.agent.cli.common import EXIT_REFUSED, EXIT_UNAVAILABLE, config_or_exit, fail
from hashflex.agent.config import AgentConfig
from hashflex.agent.io.control_socket import DEFAULT_TIMEOUT_S, AgentUnavailable, request_sync
from hashflex.agent.service_files import SOCKET_PATH

# Where the systemd unit's agent listens ($RUNTIME_DIRECTORY is /run/hashflex there, but unset in a shell)
SYSTEMD_SOCKET = Path(SOCKET_PATH)


def socket_path(cfg: AgentConfig) -> Path:
    """The agent's socket: as configured; without `control_socket.path`, the systemd location if it exists."""
    configured = cfg.socket_path
    if (
        cfg.control_socket.path is None
        and not os.environ.get("RUNTIME_DIRECTORY")
        and not configured.exists()
        and SYSTEMD_SOCKET.exists()
    ):
        return SYSTEMD_SOCKET
    return configured


def request_id() -> str:
    """An id for an operator request: retrying the same request with it is idempotent on the agent."""
    return f"cli-{uuid.uuid4().hex[:16]}"


def call(
    config: Path,
    verb: str,
    payload: dict[str, Any] | None = None,
    *,
    as_json: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """The reply's data, or exit with a message (and one JSON document with --json)."""
    cfg = config_or_exit(config, as_json=as_json)
    path = socket_path(cfg)
    try:
        reply = request_sync(path, verb, payload or {}, timeout=timeout)
    except AgentUnavailable as exc:
        fail(str(exc), EXIT_UNAVAILABLE, as_json=as_json, data={"reason": exc.reason, "socket": str(path)})
    if not reply.is_ok:
        fail(
            f"the agent refused {verb!r}: {reply.error_message or 'no reason given'} [{reply.error_code}]",
            EXIT_REFUSED,
            as_json=as_json,
            data={"code": reply.error_code, "message": reply.error_message, "id": reply.id},
        )
    return reply.data
