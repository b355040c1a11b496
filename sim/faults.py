"""Fault specs: what `POST /faults` and `--faults` accept, validated before anything changes.

A spec is one object, a list of them, or {"faults": [...]}. Each object:
  {"mode": M, <selector>, <params>}
  mode      refuse | blackhole | slow | error | ignore | reboot | session_held | atm | drift | clear
  selector  "ips": ["127.10.0.3", ...]            explicit addresses, or
            "share": 0.25 (+ optional "seed")      that share of the eligible miners, chosen deterministically, or
            "count": 3 (+ optional "seed")         that many; absent selector = every eligible miner
            "family": "luxos"                      optional filter before share/count
  params    slow:   "min_ms" (500), "max_ms" (3000)          reply latency drawn uniformly per request
            error:  "code" (45), "msg" ("Internal error")    every request answered with the firmware's error
            reboot: "duration_s" (--reboot-s)                offline (refused) that long in sim time, then back
                                                             at the firmware defaults through a full wake-up
            atm:    "interval_s" (60), "direction" down|up|cycle   LuxOS ATM steps the profile by itself
            drift:  "pct" (8)                                draws pct % above its setting (and reports it)
  clear     {"mode": "clear"} clears every fault; add "ips"/"share"/"family" to choose miners and
            "modes": [...] to clear only those modes.
Eligible miners: session_held and atm apply to LuxOS only; every other mode to every family."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

MODES = ("refuse", "blackhole", "slow", "error", "ignore", "reboot", "session_held", "atm", "drift")
LUXOS_ONLY = frozenset({"session_held", "atm"})
PARAMS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "refuse": {},
    "blackhole": {},
    "ignore": {},
    "session_held": {},
    "slow": {"min_ms": (int, float), "max_ms": (int, float)},
    "error": {"code": int, "msg": str},
    "reboot": {"duration_s": (int, float)},
    "atm": {"interval_s": (int, float), "direction": str},
    "drift": {"pct": (int, float)},
}
SELECTOR_KEYS = {"mode", "ips", "share", "count", "seed", "family", "modes"}


class FaultSpecError(ValueError):
    pass


@dataclass
class FaultAction:
    mode: str  # one of MODES or "clear"
    ips: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    modes: list[str] = field(default_factory=list)  # for clear


def _items(spec: Any) -> list[Any]:
    if isinstance(spec, dict) and "faults" in spec and "mode" not in spec:
        spec = spec["faults"]
    if isinstance(spec, dict):
        return [spec]
    if isinstance(spec, list):
        return spec
    raise FaultSpecError('a fault spec is an object, a list of objects, or {"faults": [...]}')


def parse(spec: Any, *, all_ips: list[str], families: dict[str, str], site_seed: int) -> list[FaultAction]:
    """Validate `spec` completely and resolve its selectors to addresses. Raises FaultSpecError."""
    actions = []
    for n, item in enumerate(_items(spec)):
        if not isinstance(item, dict):
            raise FaultSpecError(f"fault #{n}: not an object")
        mode = item.get("mode")
        if mode != "clear" and mode not in MODES:
            raise FaultSpecError(f"fault #{n}: unknown mode {mode!r} (one of {', '.join((*MODES, 'clear'))})")
        allowed = SELECTOR_KEYS | set(PARAMS.get(mode, {}))
        unknown = set(item) - allowed
        if unknown:
            raise FaultSpecError(f"fault #{n} ({mode}): unknown keys {sorted(unknown)}")
        params: dict[str, Any] = {}
        for key, kind in PARAMS.get(mode, {}).items():
            if key in item:
                value = item[key]
                if isinstance(value, bool) or not isinstance(value, kind):
                    raise FaultSpecError(f"fault #{n} ({mode}): {key} has the wrong type")
                params[key] = value
        _check_params(n, mode, params)
        modes: list[str] = []
        if mode == "clear":
            modes = item.get("modes", list(MODES))
            if not isinstance(modes, list) or any(m not in MODES for m in modes):
                raise FaultSpecError(f"fault #{n} (clear): modes must be a list of {', '.join(MODES)}")
        ips = _select(n, item, mode, all_ips=all_ips, families=families, site_seed=site_seed)
        actions.append(FaultAction(mode, ips, params, modes))
    return actions


def _check_params(n: int, mode: str, params: dict[str, Any]) -> None:
    if mode == "slow":
        lo, hi = params.get("min_ms", 500), params.get("max_ms", max(3000, params.get("min_ms", 500)))
        if lo < 0 or hi < lo or hi > 600_000:
            raise FaultSpecError(f"fault #{n} (slow): need 0 <= min_ms <= max_ms <= 600000")
    if mode == "reboot" and not 0 < params.get("duration_s", 1) <= 86400:
        raise FaultSpecError(f"fault #{n} (reboot): duration_s must be in (0, 86400]")
    if mode == "atm":
        if params.get("direction", "down") not in ("down", "up", "cycle"):
            raise FaultSpecError(f"fault #{n} (atm): direction is down, up or cycle")
        if not 0 < params.get("interval_s", 60) <= 86400:
            raise FaultSpecError(f"fault #{n} (atm): interval_s must be in (0, 86400]")
    if mode == "drift" and not -50 <= params.get("pct", 8) <= 100:
        raise FaultSpecError(f"fault #{n} (drift): pct must be in [-50, 100]")


def _select(
    n: int, item: dict[str, Any], mode: str, *, all_ips: list[str], families: dict[str, str], site_seed: int
) -> list[str]:
    family = item.get("family")
    if family is not None and family not in set(families.values()):
        raise FaultSpecError(f"fault #{n}: no miner of family {family!r}")
    eligible = [
        ip
        for ip in all_ips
        if (family is None or families[ip] == family) and (mode not in LUXOS_ONLY or families[ip] == "luxos")
    ]
    selectors = [k for k in ("ips", "share", "count") if k in item]
    if len(selectors) > 1:
        raise FaultSpecError(f"fault #{n}: use only one of ips, share, count")
    if "ips" in item:
        ips = item["ips"]
        if not isinstance(ips, list) or not all(isinstance(i, str) for i in ips):
            raise FaultSpecError(f"fault #{n}: ips must be a list of strings")
        missing = [i for i in ips if i not in families]
        if missing:
            raise FaultSpecError(f"fault #{n}: not simulated here: {missing[:5]}")
        wrong = [i for i in ips if i not in eligible]
        if wrong:
            raise FaultSpecError(f"fault #{n} ({mode}): not eligible: {wrong[:5]}")
        return list(dict.fromkeys(ips))
    seed = item.get("seed", site_seed)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FaultSpecError(f"fault #{n}: seed must be an integer")
    rng = random.Random(f"{seed}:{mode}:{family}")
    if "share" in item:
        share = item["share"]
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise FaultSpecError(f"fault #{n}: share must be a number in [0, 1]")
        k = round(share * len(eligible))
    elif "count" in item:
        k = item["count"]
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(eligible):
            raise FaultSpecError(f"fault #{n}: count must be an integer in [0, {len(eligible)}]")
    else:
        return eligible
    if k >= len(eligible):
        return eligible
    chosen = set(rng.sample(eligible, k))
    return [ip for ip in eligible if ip in chosen]
