"""LuxOS (Luxor firmware on Antminers): cgminer-style RPC on 4028 with LuxOS's own commands. Power is set through
discrete profiles (frequency steps); privileged commands carry a session id from `logon` as the first parameter;
only one session exists at a time; `curtail sleep|wakeup` sleeps and wakes; ATM (advanced thermal management) may
move the profile by itself, within the profiles `atmset min_profile=`/`max_profile=` bound it to, and blocks
`profileset` while enabled."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from hashflex.sim.device import Device
from hashflex.sim.physics import hashrate_at

FREQ_STEP_MHZ = 25
STEPS = range(-8, 4)  # profiles from 8 steps under the stock frequency to 3 over
VERSION = "2024.11.1.123456-4c2b7a1f"
API_VERSION = "3.7"

PRIVILEGED = frozenset(
    {
        "atmset",
        "curtail",
        "profileset",
        "logoff",
        "rebootdevice",
        "resetminer",
        "ledset",
        "fanset",
        "frequencyset",
        "voltageset",
        "reboot",
        "healthchipset",
        "healthctrlset",
        "updaterun",
        "tempctrlset",
        "frequencystop",
    }
)


@dataclass(frozen=True)
class Profile:
    name: str
    step: int
    freq: int
    watts: int
    ths: float
    volts: float


def profiles_for(spec: Any) -> list[Profile]:
    out = []
    for step in STEPS:
        freq = spec.freq_mhz + step * FREQ_STEP_MHZ
        # dynamic power ∝ f·V² and voltage scales with f: the curve that gives hashrate ∝ P^0.75
        watts = round(spec.nominal_w * (freq / spec.freq_mhz) ** (4.0 / 3.0))
        name = "default" if step == 0 else f"{freq}MHz"
        out.append(
            Profile(
                name,
                step,
                freq,
                watts,
                round(hashrate_at(spec, watts), 2),
                round(13.2 * (freq / spec.freq_mhz) ** 0.33, 2),
            )
        )
    return out


class LuxosDevice(Device):
    family = "luxos"
    firmware = f"LUXminer {VERSION}"
    ports = (4028,)
    privileged_rpc = PRIVILEGED

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._profiles: list[Profile] | None = None
        super().__init__(*args, **kwargs)
        self.profile = "default"
        self.atm_enabled = True
        # ATM's bounds (`atmset min_profile=`/`max_profile=`), profile names; None: unbounded (the lowest, and the
        # highest profile: a pessimistic default, as an owner who allowed overclocking set it; LuxOS ships "default")
        self.atm_min: str | None = None
        self.atm_max: str | None = None
        self.session_id = ""
        self.session_counter = 0
        self.red_led = "off"
        self._atm_last = 0.0
        self._atm_dir = -1

    @property
    def profiles(self) -> list[Profile]:
        if self._profiles is None:
            self._profiles = profiles_for(self.spec)
        return self._profiles

    def _profile(self, name: str) -> Profile | None:
        return next((p for p in self.profiles if p.name == name), None)

    def default_setpoint_w(self) -> float:
        p = self._profile("default")
        assert p is not None
        return float(p.watts)

    def power_limit_w(self) -> float | None:
        p = self._profile(self.profile)
        return float(p.watts) if p else None

    def reset_to_defaults(self) -> None:
        self.profile = "default"
        self.atm_enabled = True
        self.atm_min = self.atm_max = None
        self.session_id = ""

    def truth(self, t: float) -> dict[str, Any]:
        doc = super().truth(t)
        doc["profile"] = self.profile
        doc["atm"] = self.atm_enabled
        return doc

    def fault_started(self, mode: str) -> None:
        if mode == "session_held":
            self._foreign_session()  # another client (a pool tool, a second controller) logs on

    # -- time-driven faults -------------------------------------------------------------------------------
    def tick(self, t: float) -> None:
        atm = self.faults.get("atm")
        if atm is None or not self.atm_enabled:
            return
        interval = float(atm.get("interval_s", 60.0))
        if t - self._atm_last < interval:
            return
        self._atm_last = t
        idx = next(i for i, p in enumerate(self.profiles) if p.name == self.profile)
        direction = str(atm.get("direction", "down"))
        step = -1 if direction == "down" else 1 if direction == "up" else self._atm_dir
        new = self._atm_step(idx, step)
        if direction == "cycle" and new == idx:
            self._atm_dir = -self._atm_dir
            new = self._atm_step(idx, self._atm_dir)
        if new != idx:
            self._apply_profile(t, self.profiles[new])

    def _atm_step(self, idx: int, step: int) -> int:
        """The profile index one ATM step from `idx`: never above its max profile nor below its min (a profile
        already outside them, set by `profileset`, is left where it is rather than moved further out)."""
        lo = self._index(self.atm_min, 0)
        hi = self._index(self.atm_max, len(self.profiles) - 1)
        new = idx + step
        if (step > 0 and new > hi) or (step < 0 and new < lo):
            return idx
        return min(max(new, 0), len(self.profiles) - 1)

    def _index(self, name: str | None, unbounded: int) -> int:
        return unbounded if name is None else next(i for i, p in enumerate(self.profiles) if p.name == name)

    def _atm_profile(self, value: str) -> Profile | None:
        """A profile as `atmset` takes it: its name, or its step from the default (`+1`, `-2`), as `profileset`."""
        if value[:1] in "+-" and value[1:].isdigit():
            return next((p for p in self.profiles if p.step == int(value)), None)
        return self._profile(value)

    def _apply_profile(self, t: float, prof: Profile) -> None:
        self.profile = prof.name
        self.physics.set_setpoint(t, float(prof.watts))

    # -- RPC ----------------------------------------------------------------------------------------------
    def ok(self, code: int, msg: str, **sections: Any) -> dict[str, Any]:
        return {"STATUS": [self.status("S", code, msg)], **sections, "id": 1}

    def err(self, code: int, msg: str) -> dict[str, Any]:
        return {"STATUS": [self.status("E", code, msg)], "id": 1}

    def rpc(self, command: str, param: str | None, req: dict[str, Any]) -> dict[str, Any]:
        t = self.now()
        if command in PRIVILEGED:
            args = [] if param is None else param.split(",")
            if "session_held" in self.faults:
                self._foreign_session()  # the other client logs on again between our calls
            if not args or not self.session_id or args[0] != self.session_id:
                return self.err(45, f"Access denied to '{command}' command: invalid session id")
            return self._privileged(command, args[1:], t)
        handler = getattr(self, f"_cmd_{command}", None)
        if handler is None:
            return self.err(14, "Invalid command")
        result: dict[str, Any] = handler(t, param)
        return result

    def _foreign_session(self) -> None:
        self.session_counter += 1
        self.session_id = hashlib.sha256(f"{self.ip}:other:{self.session_counter}".encode()).hexdigest()[:8]

    def _new_session(self) -> str:
        self.session_counter += 1
        return hashlib.sha256(f"{self.ip}:{self.session_counter}:{self.serial}".encode()).hexdigest()[:8]

    def _cmd_version(self, t: float, _p: str | None) -> dict[str, Any]:
        return self.ok(
            22,
            "LUXminer versions",
            VERSION=[
                {
                    "API": API_VERSION,
                    "CompileTime": "Tue Nov 12 14:31:07 UTC 2024",
                    "LUXminer": VERSION,
                    "Miner": VERSION,
                    "Type": self.spec.name,
                }
            ],
        )

    def _cmd_devdetails(self, t: float, _p: str | None) -> dict[str, Any]:
        prof = self._profile(self.profile)
        freq = prof.freq if prof else self.spec.freq_mhz
        rows = [
            {
                "ASC": i,
                "Chips": self.spec.chips_per_board,
                "Cores": self.spec.chips_per_board * 4,
                "DEVDETAILS": i,
                "Driver": "bitmain",
                "Frequency": freq,
                "Kernel": "",
                "Model": self.spec.name,
                "Name": "Antminer",
                "ID": i,
                "Voltage": prof.volts if prof else 13.2,
            }
            for i in range(self.spec.boards)
        ]
        return self.ok(69, "Device Details", DEVDETAILS=rows)

    def _rates(self, t: float) -> tuple[float, list[float]]:
        ghs = self.physics.hashrate_ths(t) * 1000.0
        shares = (0.334, 0.331, 0.335)
        return ghs, [round(ghs * s, 2) for s in shares[: self.spec.boards]]

    def _cmd_summary(self, t: float, _p: str | None) -> dict[str, Any]:
        ghs, _ = self._rates(t)
        up = self.uptime_s(t)
        return self.ok(
            11,
            "Summary",
            SUMMARY=[
                {
                    "Elapsed": up,
                    "GHS 5s": round(ghs, 2),
                    "GHS av": round(ghs, 2),
                    "GHS 30m": round(ghs, 2),
                    "Found Blocks": 0,
                    "Getworks": self.accepted // 3,
                    "Accepted": self.accepted,
                    "Rejected": 7,
                    "Hardware Errors": 12,
                    "Utility": 1.2,
                    "Discarded": 310,
                    "Stale": 0,
                    "Get Failures": 0,
                    "Local Work": self.accepted * 4,
                    "Remote Failures": 0,
                    "Network Blocks": 640,
                    "Total MH": ghs * up * 1e3,
                    "Work Utility": 1400000.0,
                    "Difficulty Accepted": self.accepted * 65536.0,
                    "Difficulty Rejected": 7 * 65536.0,
                    "Difficulty Stale": 0.0,
                    "Best Share": 1503281829,
                    "Device Hardware%": 0.0001,
                    "Device Rejected%": 0.01,
                    "Pool Rejected%": 0.01,
                    "Pool Stale%": 0.0,
                    "Last getwork": self.site.clock.unix(),
                }
            ],
        )

    def _cmd_stats(self, t: float, _p: str | None) -> dict[str, Any]:
        ghs, chains = self._rates(t)
        board, chip = self.physics.temps(t)
        state = self.physics.current_state(t)
        b, c = round(board), round(chip)
        if state == "offline":
            b = c = 0
        ideal = hashrate_at(self.spec, self.physics.setpoint_w) * 1000.0
        rpm = self.physics.fan_rpm(t)
        row: dict[str, Any] = {
            "STATS": 0,
            "ID": "BC50",
            "Elapsed": self.uptime_s(t),
            "Calls": 0,
            "Wait": 0.0,
            "Max": 0.0,
            "Min": 99.0,
            "GHS 5s": round(ghs, 2),
            "GHS av": round(ghs, 2),
            "miner_count": self.spec.boards,
            "frequency": (self._profile(self.profile) or self.profiles[0]).freq,
            "fan_num": self.spec.fans,
            "total_rateideal": round(ideal, 2),
            "total_freqavg": self.spec.freq_mhz,
            "rate_unit": "GH",
            "total_rate": round(ghs, 2),
            "total_acn": self.spec.chips_per_board * self.spec.boards,
            "temp_max": c,
            "no_matching_work": 0,
        }
        for i in range(self.spec.fans):
            row[f"fan{i + 1}"] = rpm + 30 * i
        for i, rate in enumerate(chains, start=1):
            row[f"chain_rate{i}"] = rate
            row[f"chain_rateideal{i}"] = round(ideal / self.spec.boards, 2)
            row[f"chain_acn{i}"] = self.spec.chips_per_board
            row[f"chain_acs{i}"] = "o" * 8
            row[f"chain_hw{i}"] = 4
            row[f"temp_pcb{i}"] = f"{b - 3}-{b}-{b}-{b - 3}"
            row[f"temp_chip{i}"] = f"{c}-{c - 4}-{c - 4}-{c}"
            row[f"temp{i}"] = b
            row[f"temp2_{i}"] = c
            row[f"freq{i}"] = row["frequency"]
        head = {
            "STATS": 0,
            "ID": "LUXminer",
            "LUXminer": VERSION,
            "Miner": VERSION,
            "CompileTime": "Tue Nov 12 14:31:07 UTC 2024",
            "Type": self.spec.name,
        }
        return self.ok(70, "LUXminer stats", STATS=[head, row])

    def _cmd_power(self, t: float, _p: str | None) -> dict[str, Any]:
        return self.ok(300, "Power", POWER=[{"PSU": True, "Watts": round(self.physics.power_w(t))}])

    def _cmd_config(self, t: float, _p: str | None) -> dict[str, Any]:
        return self.ok(
            33,
            "LUXminer config",
            CONFIG=[
                {
                    "ASC Count": self.spec.boards,
                    "PGA Count": 0,
                    "Pool Count": 2,
                    "Strategy": "Failover",
                    "Log Interval": 5,
                    "Device Code": "",
                    "OS": "Linux",
                    "Hotplug": "None",
                    "IsAtmEnabled": self.atm_enabled,
                    "MACAddr": self.mac.lower(),
                    "Model": self.spec.name,
                    "Profile": self.profile,
                    "RedLed": self.red_led,
                    "GreenLed": "off",
                    "SerialNumber": self.serial,
                    "SystemStatus": self.physics.current_state(t),
                    "CurtailMode": "Sleep" if self.physics.state == "sleeping" else "None",
                    "NumCores": 4,
                }
            ],
        )

    def _cmd_profiles(self, t: float, _p: str | None) -> dict[str, Any]:
        rows = [
            {
                "Profile Name": p.name,
                "Step": str(p.step),
                "Frequency": p.freq,
                "Hashrate": p.ths,
                "Voltage": p.volts,
                "Watts": p.watts,
                "IsDynamic": False,
                "IsTuned": False,
            }
            for p in self.profiles
        ]
        return self.ok(327, "Profiles", PROFILES=rows)

    def _cmd_fans(self, t: float, _p: str | None) -> dict[str, Any]:
        rpm = self.physics.fan_rpm(t)
        rows = [
            {"FAN": i, "ID": i, "RPM": rpm + 30 * i, "Speed": min(100, rpm * 100 // 6000)}
            for i in range(self.spec.fans)
        ]
        return self.ok(
            202,
            f"{self.spec.fans} Fan(s)",
            FANS=rows,
            FANCTRL=[{"MinFans": self.spec.fans, "Mode": "Auto", "Speed": -1}],
        )

    def _cmd_tempctrl(self, t: float, _p: str | None) -> dict[str, Any]:
        return self.ok(
            201, "Temperature control", TEMPCTRL=[{"Dangerous": 95, "Hot": 85, "Mode": "Auto", "Target": 75}]
        )

    def _cmd_temps(self, t: float, _p: str | None) -> dict[str, Any]:
        board, chip = self.physics.temps(t)
        rows = [
            {
                "ID": i,
                "TEMP": i,
                "Board": round(board, 1),
                "Chip": round(chip, 1),
                "BottomLeft": round(board - 3, 1),
                "BottomRight": round(board, 1),
                "TopLeft": round(chip, 1),
                "TopRight": round(chip - 4, 1),
            }
            for i in range(self.spec.boards)
        ]
        return self.ok(201, f"{self.spec.boards} Temp(s)", TEMPS=rows)

    def _cmd_pools(self, t: float, _p: str | None) -> dict[str, Any]:
        rows = [
            {
                "POOL": i,
                "URL": url,
                "Status": "Alive",
                "Priority": i,
                "Quota": 1,
                "Long Poll": "N",
                "Getworks": self.accepted // 3 if i == 0 else 0,
                "Accepted": self.accepted if i == 0 else 0,
                "Rejected": 7 if i == 0 else 0,
                "Works": 0,
                "Discarded": 0,
                "Stale": 0,
                "Get Failures": 0,
                "Remote Failures": 0,
                "User": f"site.{self.serial[:6].lower()}",
                "Last Share Time": 0,
                "Diff1 Shares": 0,
                "Proxy Type": "",
                "Proxy": "",
                "Difficulty Accepted": 0.0,
                "Difficulty Rejected": 0.0,
                "Difficulty Stale": 0.0,
                "Last Share Difficulty": 65536.0,
                "Has Stratum": True,
                "Stratum Active": i == 0,
                "Stratum URL": url.split("//")[-1],
                "Best Share": 0,
                "Pool Rejected%": 0.0,
                "Pool Stale%%": 0.0,
                "Bad Work": 0,
                "Current Block Height": 0,
                "Current Block Version": 0,
                "GROUP": 0,
            }
            for i, url in enumerate(
                ("stratum+tcp://btc.global.luxor.tech:700", "stratum+tcp://btc.global.luxor.tech:9700")
            )
        ]
        return self.ok(7, f"{len(rows)} Pool(s)", POOLS=rows)

    def _cmd_groups(self, t: float, _p: str | None) -> dict[str, Any]:
        return self.ok(322, "Groups", GROUPS=[{"GROUP": 0, "Name": "Default", "Quota": 1}])

    def _cmd_atm(self, t: float, _p: str | None) -> dict[str, Any]:
        return self.ok(
            339,
            "ATM configuration values",
            ATM=[
                {
                    "Enabled": self.atm_enabled,
                    "MaxProfile": self.atm_max or self.profiles[-1].name,
                    "MinProfile": self.atm_min or "",
                    "PostRampMinutes": 15,
                    "StartupMinutes": 15,
                    "TempWindow": 10,
                }
            ],
        )

    def _cmd_session(self, t: float, _p: str | None) -> dict[str, Any]:
        return self.ok(8, "Session", SESSION=[{"SessionID": self.session_id}])

    def _cmd_logon(self, t: float, _p: str | None) -> dict[str, Any]:
        if "session_held" in self.faults and not self.session_id:
            self._foreign_session()
        if self.session_id:
            return self.err(402, "Another session is active")
        self.session_id = self._new_session()
        return self.ok(9, "Session created", SESSION=[{"SessionID": self.session_id}])

    def _cmd_coin(self, t: float, _p: str | None) -> dict[str, Any]:
        return self.ok(
            78,
            "LUXminer coin",
            COIN=[
                {
                    "Hash Method": "sha256",
                    "Current Block Time": 0,
                    "Current Block Hash": "",
                    "LP": True,
                    "Network Difficulty": 1.0e14,
                }
            ],
        )

    def _cmd_devs(self, t: float, _p: str | None) -> dict[str, Any]:
        _, chains = self._rates(t)
        board, _chip = self.physics.temps(t)
        rows = [
            {
                "ASC": i,
                "Name": "BTM",
                "ID": i,
                "Enabled": "Y",
                "Status": "Alive",
                "Temperature": round(board, 1),
                "MHS av": rate * 1000,
                "MHS 5s": rate * 1000,
                "Accepted": 0,
                "Rejected": 0,
                "Hardware Errors": 0,
                "Utility": 0.0,
                "Last Share Pool": 0,
                "Last Share Time": 0,
                "Total MH": 0.0,
                "Device Elapsed": self.uptime_s(t),
            }
            for i, rate in enumerate(chains)
        ]
        return self.ok(9, f"{len(rows)} ASC(s)", DEVS=rows)

    def _cmd_limits(self, t: float, _p: str | None) -> dict[str, Any]:
        return self.ok(
            320, "Limits", LIMITS=[{"AtmMaxProfile": self.profiles[-1].name, "AtmMinProfile": self.profiles[0].name}]
        )

    # -- privileged ---------------------------------------------------------------------------------------
    def _privileged(self, command: str, args: list[str], t: float) -> dict[str, Any]:
        ignoring = self.ignoring()
        if command == "logoff":
            self.session_id = ""
            return self.ok(10, "Session terminated")
        if command == "curtail":
            mode = args[0] if args else ""
            if mode not in ("sleep", "wakeup"):
                return self.err(411, f"Invalid curtail mode '{mode}'")
            if not ignoring:
                if mode == "sleep":
                    self.physics.sleep(t)
                else:
                    self.physics.wake(t)
            return self.ok(410, f"Curtail mode set to {mode}", CURTAIL=[{"Mode": mode}])
        if command == "profileset":
            name = args[0] if args else ""
            prof = self._profile(name)
            if prof is None:
                return self.err(413, f"Invalid profile '{name}'")
            if self.atm_enabled:
                return self.err(414, "Cannot change profile while ATM is enabled")
            if not ignoring:
                self._apply_profile(t, prof)
            return self.ok(412, "Profile set", PROFILE=[{"Profile": name, "Result": "success"}])
        if command == "atmset":
            # every key is checked before any is applied: an invalid value is an error and changes nothing
            update: dict[str, Any] = {}
            for arg in args:
                key, _, value = arg.partition("=")
                if key == "enabled":
                    if value not in ("true", "false"):
                        return self.err(341, f"Invalid value for enabled: {value}")
                    update[key] = value == "true"
                elif key in ("min_profile", "max_profile"):
                    prof = self._atm_profile(value)
                    if prof is None and not (key == "min_profile" and value == ""):  # an empty min: unbounded
                        return self.err(341, f"Invalid value for {key}: {value}")
                    update[key] = None if prof is None else prof.name
            if not ignoring:
                if "enabled" in update:
                    self.atm_enabled = update["enabled"]
                    self._atm_last = t
                self.atm_min = update.get("min_profile", self.atm_min)
                self.atm_max = update.get("max_profile", self.atm_max)
            return self.ok(340, "Advanced Thermal Management configuration updated")
        if command == "ledset":
            if len(args) >= 2 and not ignoring:
                self.red_led = args[1] if args[0] == "red" else self.red_led
            return self.ok(330, "LED set")
        if command in ("rebootdevice", "resetminer"):
            if not ignoring:
                self.site.reboot(self, self.params.reboot_s if command == "rebootdevice" else 5.0)
            return self.ok(60 if command == "rebootdevice" else 61, f"{command} requested")
        return self.ok(999, f"{command} accepted")
