"""Which commands to send again, and which miners the next diff leaves alone: decisions over the agent's memory of
each miner (agent.core.observe keeps it), pure. The memories a decision changes come back as new objects."""

from __future__ import annotations

from collections.abc import Mapping

from hashflex.agent.core.closed_loop import IGNORING_RETRY_CONFIRMS
from hashflex.agent.core.miner_memory import MinerMemory
from hashflex.agent.core.model import Change, Op, Plan, SleepAction


def recommands(
    memory: Mapping[str, MinerMemory],
    planned: Plan,
    in_flight: Mapping[str, Change],
    *,
    skip: set[str],
    now: float,
    confirm_after_s: float,
) -> tuple[list[Change], dict[str, MinerMemory]]:
    """Re-send acknowledged commands telemetry has not confirmed in time, where the plan still wants them (`skip`:
    miners the diff already sends something else). Miners counted as ignoring commands are tried again now and
    then. Returns the changes and the memories they change (new objects)."""
    out: list[Change] = []
    updated: dict[str, MinerMemory] = {}
    for ip, old in memory.items():
        pending = old.pending_op
        if pending is None or ip in in_flight or ip in skip or now - old.pending_at < confirm_after_s:
            continue
        if now < old.failed_retry_at:
            continue  # its last command failed: backing off
        if (now < old.retry_at) if old.ignores_commands else not old.resend_due:
            continue
        mem = updated[ip] = old.copy()
        if mem.ignores_commands:
            mem.retry_at = now + IGNORING_RETRY_CONFIRMS * confirm_after_s
        else:
            mem.resend_due = False
            mem.recommands += 1
        op = Op(pending)
        wanted = planned.actions.get(ip)
        if wanted is not None and isinstance(wanted, SleepAction) != (op is Op.SLEEP):
            continue  # the plan moved on; the diff sends what it wants
        if op is Op.SET_POWER and mem.pending_w is None:
            continue
        out.append(Change(ip, op, mem.pending_w if op is not Op.SLEEP else None, decrease=op is Op.SLEEP))
    return out, updated


def blocked(memory: Mapping[str, MinerMemory], in_flight: Mapping[str, Change], now: float) -> dict[str, Op]:
    """Miners the diff leaves alone: a command is on the wire, or one failed and its back-off is not over (the views
    count such a miner at its worst case). (An acknowledged command awaiting confirmation needs no block: the views
    already take it as done, so the diff only sends what the plan changes.)"""
    out = {ip: Op(m.failed_op) for ip, m in memory.items() if m.failed_op and now < m.failed_retry_at}
    out.update({ip: c.op for ip, c in in_flight.items()})
    return out


def just_lowered(memory: Mapping[str, MinerMemory], now: float, window_s: float) -> set[str]:
    """Miners whose limit went down less than `window_s` (confirm_after_s) ago: a raise waits until then. Re-plans
    on readings that lag the limits they just sent traded one miner's limit against another's every tick for good
    (a LuxOS preset up, a Whatsminer down; then back), and a site that never settles serves nobody; a raise held is
    the safe side (the plan counts the miner at the raised limit)."""
    return {ip for ip, m in memory.items() if now - m.lowered_at < window_s}
