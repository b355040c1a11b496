"""The site-level closed loop from measurement: how far below the level to plan so the site draws what it should."""

from __future__ import annotations


def corrected_bias(
    bias_kw: float,
    present_kw: float,
    level_kw: float,
    *,
    tolerance_kw: float,
    ramp_up_kw_per_min: float | None,
    tick_s: float,
) -> float:
    """The correction after a settled picture: the site (`present_kw`, less what the plan already counts per miner)
    draws more than the level beyond `tolerance_kw` (a miner drifting above its limit, a reading higher than the plan
    counts): plan lower by the excess, at once. Draws less again: give that correction back, in steps no larger than
    the ramp allows. Room the plan leaves because miners draw less than it counts is not spent: the plan's worst case
    stays at or under the target (and the cap) whatever they draw. Only for error the last executed plan explains:
    the caller decides when a picture may teach it (before the first plan went out, or while its commands settle,
    what the site draws above the level is what those commands are cutting: taking it for model error blacked a
    site out that started at twice its cap)."""
    error = present_kw - level_kw
    if error > tolerance_kw:
        return min(level_kw, bias_kw + error)
    if bias_kw > 0 and error < -tolerance_kw:
        step = -error / 2
        if ramp_up_kw_per_min is not None:
            step = min(step, ramp_up_kw_per_min * tick_s / 60.0)
        return max(0.0, bias_kw - step)
    return bias_kw
