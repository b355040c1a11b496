"""Real miner models with their nameplate figures (manufacturer specs, rounded)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str  # as the firmware names it ("Antminer S19j Pro", "M50S")
    make: str  # "antminer" | "whatsminer"
    nominal_ths: float
    nominal_w: float
    boards: int
    chips_per_board: int
    fans: int
    sleep_w: float  # control board, fans idling, PSU standby
    freq_mhz: int  # stock frequency, names the LuxOS profiles
    wm_type: str = ""  # Whatsminer devdetails Model ("M50S.VH20" style, underscore form)
    wm_min_w: float = 0.0  # smallest power limit the Whatsminer firmware accepts


ANTMINERS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("Antminer S19j Pro", "antminer", 104.0, 3068.0, 3, 126, 4, 22.0, 525),
        ModelSpec("Antminer S19 XP", "antminer", 141.0, 3010.0, 3, 110, 4, 24.0, 500),
        ModelSpec("Antminer S19k Pro", "antminer", 120.0, 2760.0, 3, 77, 4, 20.0, 500),
        ModelSpec("Antminer S21", "antminer", 200.0, 3500.0, 3, 108, 4, 26.0, 490),
    )
}

WHATSMINERS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("M30S++", "whatsminer", 112.0, 3472.0, 3, 111, 2, 18.0, 600, "M30S++_VH30", 1800.0),
        ModelSpec("M50S", "whatsminer", 126.0, 3276.0, 3, 129, 2, 18.0, 600, "M50S_VH50", 1700.0),
        ModelSpec("M60S", "whatsminer", 186.0, 3441.0, 3, 156, 2, 20.0, 600, "M60S_VK30", 1800.0),
    )
}


def family_models(family: str) -> list[ModelSpec]:
    if family in ("luxos", "antminer"):
        return list(ANTMINERS.values())
    if family == "whatsminer":
        return list(WHATSMINERS.values())
    raise ValueError(f"unknown family {family!r}")
