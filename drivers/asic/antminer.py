"""Stock Bitmain firmware (Antminer), as pyasic 0.79.0 drives it: sleep and wake only (work mode 1 and 0), no
power reading (the agent estimates it), a web UI behind HTTP Digest auth.

- `stop_mining` / `resume_mining` return True whatever the miner said: the work mode is read back.
- Reads of the modern web UI's models avoid that UI except where it decides something (`_collect_lean`).
"""

from __future__ import annotations

from typing import Any

from hashflex.drivers.asic.collect import GARBLED, Collected, board_figures, rpc_replies, ths
from hashflex.drivers.asic.profile import BaseProfile, FirmwareProfile, Reader, StateCheck, class_names
from hashflex.drivers.asic.vendor import BMMiner
from hashflex.drivers.base import Family


class AntminerProfile(BaseProfile):
    family = Family.ANTMINER
    password_settings = ("default_antminer_web_password",)
    reports_power = False
    fast_options = ("hashrate", "is_mining", "errors", "hashboards")  # the old web UI (AntminerOld)

    def recognises(self, names: frozenset[str]) -> bool:
        return bool(names & {"AntminerModern", "AntminerOld"}) and "StockFirmware" in names

    def reader(self, miner: Any) -> Reader:
        if "AntminerModern" in class_names(type(miner)) and miner.web is not None:
            return Reader(_collect_lean, has_slow=True)
        return super().reader(miner)

    def switch_check(self, miner: Any, *, on: bool) -> StateCheck | None:
        return lambda: _mode_is(miner, sleeping=not on)


async def _mode_is(miner: Any, *, sleeping: bool) -> bool | None:
    conf = await miner.web.get_miner_conf()
    mode = conf.get("bitmain-work-mode") if isinstance(conf, dict) else None
    if mode is None:
        return None
    return (str(mode) == "1") == sleeping


# The modern web UI: pyasic reads mining state, errors and board temperatures through digest-auth CGI calls, a new
# httpx client per request and two round trips each (~8 ms of CPU per read, against ~0.3 ms for one RPC
# connection). So a read is one RPC connection (summary+stats: hashrate per board); the web work mode is asked
# only when the hashrate is zero (asleep, or coming up: the only case where it decides anything); errors and board
# temperatures come from the web UI on slow reads and are carried over in between (they change slowly).
async def _collect_lean(miner: Any, slow: bool) -> Collected:
    rpc = await rpc_replies(miner.rpc, ("summary", "stats"))
    values: dict[str, Any] = {}
    summary, stats = rpc.get("summary"), rpc.get("stats")
    try:
        if summary:
            values["hashrate"] = await miner._get_hashrate(rpc_summary=summary)
        if stats:  # the RPC parser of pyasic's own BMMiner base; AntminerModern's override goes to the web
            values["rpc_boards"] = await BMMiner._get_hashboards(miner, rpc_stats=stats)
    except GARBLED:
        pass
    answered = any(rpc.values())
    if not answered:
        return Collected(values, rpc, answered, hashrate_boards="rpc_boards")
    rate = ths(miner, values.get("hashrate"))
    if rate is None:
        rate, _ = board_figures(miner, values.get("rpc_boards"))
    if rate:
        values["is_mining"] = True
    else:
        conf = await miner.web.get_miner_conf()
        values["is_mining"] = await miner._is_mining(web_get_conf=conf) if conf else None
    if slow:
        try:
            values["hashboards"] = await miner._get_hashboards()
            values["errors"] = await miner._get_errors(web_summary=await miner.web.summary())
        except GARBLED:
            pass
    return Collected(values, rpc, answered, hashrate_boards="rpc_boards")


PROFILE: FirmwareProfile = AntminerProfile()
