"""Whatsminer with firmware ≥ 2024-11 (API v3): length-prefixed JSON on 4433 with a sha256 token on `set.*`
commands, plus the legacy cgminer-style port 4028 answering `devdetails`, `get_version` and a few reads, which
pyasic's identification needs to pick its v3 backend. Power: a continuous limit in watts; power off/on through
`set.miner.service stop|start`."""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any

from hashflex.sim.device import Device
from hashflex.sim.physics import hashrate_at

FW_VERSION = "20250915.16.Rel2"
API_VERSION = "3.0.2"
MAX_LIMIT_W = 99999
TOKEN_WINDOW_S = 300  # the firmware rejects a ts this far from its clock


def v3_token(cmd: str, password: str, salt: str, ts: int) -> str:
    """What the firmware expects in `token`: first 8 chars of base64(sha256(cmd + password + salt + ts))."""
    digest = hashlib.sha256(f"{cmd}{password}{salt}{ts}".encode()).digest()
    return base64.b64encode(digest).decode()[:8]


class WhatsminerDevice(Device):
    family = "whatsminer"
    firmware = FW_VERSION
    ports = (4028, 4433)
    password = "super"  # the `super` account's factory password

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit_w = int(self.spec.nominal_w)
        self.salt = self.serial[:8].lower()
        self.led = "auto"

    def power_limit_w(self) -> float | None:
        return float(self.limit_w)

    def default_setpoint_w(self) -> float:
        return self.spec.nominal_w

    def reset_to_defaults(self) -> None:
        # the sim's reboot is a power cycle that loses what was set since the last save: stock limit, LED auto
        self.limit_w = int(self.spec.nominal_w)
        self.led = "auto"

    def truth(self, t: float) -> dict[str, Any]:
        doc = super().truth(t)
        doc["service"] = "stopped" if self.physics.state == "sleeping" else "running"
        return doc

    # -- 4028: legacy API, only what identification and old tools use -------------------------------------
    def rpc(self, command: str, param: str | None, req: dict[str, Any]) -> dict[str, Any]:
        t = self.now()
        when = self.site.clock.unix()
        if command == "devdetails":
            rows = [
                {"DEVDETAILS": i, "Name": "SM", "ID": i, "Driver": "bitmicro", "Kernel": "", "Model": self.spec.wm_type}
                for i in range(self.spec.boards)
            ]
            return {
                "STATUS": [
                    {"STATUS": "S", "When": when, "Code": 69, "Msg": "Device Details", "Description": "btminer"}
                ],
                "DEVDETAILS": rows,
                "id": 1,
            }
        if command == "get_version":
            return {
                "STATUS": "S",
                "When": when,
                "Code": 131,
                "Msg": {"api_ver": "2.0.5", "fw_ver": FW_VERSION, "platform": "H616", "chip": "BM1370"},
                "Description": "",
            }
        if command == "summary":
            p = self.physics
            board, chip = p.temps(t)
            mhs = p.hashrate_ths(t) * 1e6
            return {
                "STATUS": [{"STATUS": "S", "When": when, "Code": 11, "Msg": "Summary", "Description": "btminer"}],
                "SUMMARY": [
                    {
                        "Elapsed": self.uptime_s(t),
                        "MHS av": round(mhs, 2),
                        "MHS 5s": round(mhs, 2),
                        "MHS 1m": round(mhs, 2),
                        "MHS 15m": round(mhs, 2),
                        "Temperature": round(board, 1),
                        "Fan Speed In": p.fan_rpm(t),
                        "Fan Speed Out": p.fan_rpm(t) + 40,
                        "Power": int(p.power_w(t)),
                        "Power Limit": self.limit_w,
                        "Chip Temp Min": round(chip - 6, 1),
                        "Chip Temp Max": round(chip, 1),
                        "Chip Temp Avg": round(chip - 3, 1),
                        "Firmware Version": f"'{FW_VERSION}'",
                        "MAC": self.mac,
                        "Factory GHS": int(hashrate_at(self.spec, self.spec.nominal_w) * 1000),
                        "Power Mode": "Normal",
                        "btminer_fast_boot": "disable",
                        "Upfreq Complete": 1,
                    }
                ],
                "id": 1,
            }
        if command == "status":
            return {
                "STATUS": "S",
                "When": when,
                "Code": 131,
                "Msg": {
                    "btmineroff": "true" if self.physics.state == "sleeping" else "false",
                    "Firmware Version": f"'{FW_VERSION}'",
                },
                "Description": "",
            }
        # `version` and the rest: the firmware's own error shape (a flat STATUS object)
        return {"STATUS": "E", "When": when, "Code": 14, "Msg": "invalid cmd", "Description": ""}

    def rpc_error_bytes(self, code: int, msg: str) -> bytes:
        return self.dumps({"STATUS": "E", "When": self.site.clock.unix(), "Code": code, "Msg": msg, "Description": ""})

    # -- 4433: API v3 -------------------------------------------------------------------------------------
    def _reply(self, cmd: str, msg: Any, code: int = 0) -> dict[str, Any]:
        return {"code": code, "when": self.site.clock.unix(), "msg": msg, "desc": cmd}

    def v3_error(self, code: int, msg: str) -> dict[str, Any]:
        return {"code": code, "when": self.site.clock.unix(), "msg": msg, "desc": ""}

    def handle_v3(self, req: dict[str, Any]) -> dict[str, Any] | None:
        if "blackhole" in self.faults:
            return None
        cmd = req.get("cmd")
        if not isinstance(cmd, str) or not cmd:
            return self.v3_error(-1, "invalid json")
        if "error" in self.faults:
            return self._reply(
                cmd,
                str(self.faults["error"].get("msg", "internal error")),
                int(self.faults["error"].get("code", -4)) if "code" in self.faults["error"] else -4,
            )
        param = req.get("param")
        t = self.now()
        if cmd.startswith("set."):
            refused = self._check_token(cmd, req)
            if refused is not None:
                return refused
            return self._set(cmd, param, t)
        handler = {
            "get.device.info": self._device_info,
            "get.miner.status": self._miner_status,
            "get.miner.setting": self._miner_setting,
            "get.system.setting": self._system_setting,
            "get.fan.setting": self._fan_setting,
        }.get(cmd)
        if handler is None:
            return self._reply(cmd, "invalid command", -2)
        return handler(cmd, param, t)

    def _check_token(self, cmd: str, req: dict[str, Any]) -> dict[str, Any] | None:
        ts, account, token = req.get("ts"), req.get("account"), req.get("token")
        if not isinstance(ts, int) or not isinstance(account, str) or not isinstance(token, str):
            return self._reply(cmd, "missing ts, account or token", -3)
        if account != "super":
            return self._reply(cmd, "permission denied", -1)
        if abs(ts - time.time()) > TOKEN_WINDOW_S:
            return self._reply(cmd, "ts expired", -1)
        if token != v3_token(cmd, self.password, self.salt, ts):
            return self._reply(cmd, "invalid token", -1)
        return None

    def _device_info(self, cmd: str, param: Any, t: float) -> dict[str, Any]:
        if param == "salt":
            return self._reply(cmd, {"salt": self.salt})
        p = self.physics
        working = p.current_state(t) in ("hashing", "waking")
        ths = hashrate_at(self.spec, self.spec.nominal_w) / self.spec.boards
        msg = {
            "network": {
                "ip": self.ip,
                "proto": "dhcp",
                "netmask": "255.0.0.0",
                "dns": "127.0.0.53",
                "mac": self.mac,
                "gateway": "127.0.0.1",
                "hostname": "WhatsMiner",
            },
            "miner": {
                "working": "true" if working else "false",
                "type": self.spec.wm_type,
                "hash-board": self.spec.wm_type.split("_")[-1][:3],
                "detect-hash-rate": ":".join(str(int(ths * 1000)) for _ in range(self.spec.boards)),
                "cointype": "BTC/BCH/BSV",
                "pool-strategy": "FAILOVER",
                "heatmode": "",
                "hash-percent": "",
                "fast-boot": "disable",
                "board-num": str(self.spec.boards),
                **{f"pcbsn{i}": f"HHM{self.serial[:12]}{i}" for i in range(self.spec.boards)},
                **{f"chipdata{i}": "H3LA03-00000000 BINVE2-0000000" for i in range(self.spec.boards)},
                "miner-sn": f"HTM{self.serial}",
                "power-limit-set": str(self.limit_w),
                "UpfreqSpeed": "",
                "web-pool": 1,
                "permission": "super=255 user1=0 user2=0 user3=0",
            },
            "system": {
                "api": API_VERSION,
                "platform": "H616",
                "fwversion": FW_VERSION,
                "control-board-version": "CB6V10",
                "apiswitch": "1",
                "ledstatus": self.led,
            },
            "power": {
                "type": "P221B",
                "mode": "1",
                "hwversion": "V00.05",
                "swversion": "V02.01.V02.04",
                "model": "P221B",
                "iin": round(p.power_w(t) / 231.0, 2),
                "vin": 231.0,
                "vout": 1222,
                "pin": int(p.power_w(t)),
                "fanspeed": 4900 if working else 0,
                "temp0": 45,
                "sn": f"A{self.serial[:15]}",
                "vendor": "7",
            },
            "salt": self.salt,
            "error-code": [],
        }
        if isinstance(param, str) and param in msg:
            return self._reply(cmd, {param: msg[param]})
        return self._reply(cmd, msg)

    def _miner_status(self, cmd: str, param: Any, t: float) -> dict[str, Any]:
        p = self.physics
        board, chip = p.temps(t)
        ths = p.hashrate_ths(t)
        state = p.current_state(t)
        if param == "edevs":
            shares = (0.334, 0.331, 0.335)
            rows = [
                {
                    "id": i,
                    "slot": i,
                    "hash-average": round(ths * shares[i % 3], 3),
                    "factory-hash": round(hashrate_at(self.spec, self.spec.nominal_w) / self.spec.boards, 3),
                    "freq": self.spec.freq_mhz if ths else 0,
                    "effective-chips": self.spec.chips_per_board,
                    "chip-temp-min": round(chip - 6, 1),
                    "chip-temp-avg": round(chip - 3, 1),
                    "chip-temp-max": round(chip, 1),
                    "upfreq-complete": 1 if state == "hashing" else 0,
                }
                for i in range(self.spec.boards)
            ]
            return self._reply(cmd, {"edevs": rows})
        if param == "pools":
            return self._reply(
                cmd,
                {
                    "pools": [
                        {
                            "id": 1,
                            "url": "stratum+tcp://btc.example-pool.net:3333",
                            "status": "alive",
                            "account": f"site.{self.serial[:6].lower()}",
                            "stratum-active": True,
                            "priority": 0,
                            "reject-rate": 0.001,
                            "accepted": self.accepted,
                        }
                    ]
                },
            )
        if param not in (None, "summary"):
            return self._reply(cmd, "invalid param", -2)
        factory = hashrate_at(self.spec, self.spec.nominal_w)
        return self._reply(
            cmd,
            {
                "summary": {
                    "elapsed": self.uptime_s(t),
                    "bootup-time": int(self.site.clock.unix() - self.uptime_s(t)),
                    "freq-avg": self.spec.freq_mhz if ths else 0,
                    "target-freq": self.spec.freq_mhz,
                    "factory-hash": round(factory, 3),
                    "hash-average": round(ths, 3),
                    "hash-realtime": round(ths, 3),
                    "hash-1min": round(ths, 3),
                    "hash-15min": round(ths, 3),
                    "hash-percent": 100,
                    "power-limit": self.limit_w,
                    "power-realtime": round(p.power_w(t)),
                    "power-5min": round(p.power_w(t)),
                    "power-rate": round(p.power_w(t) / ths, 2) if ths else 0,
                    "environment-temperature": 25.0,
                    "fan-speed-in": p.fan_rpm(t),
                    "fan-speed-out": p.fan_rpm(t) + 40,
                    "chip-temp-min": round(chip - 6, 1),
                    "chip-temp-avg": round(chip - 3, 1),
                    "chip-temp-max": round(chip, 1),
                    "board-temperature": [round(board, 1)] * self.spec.boards,
                    "up-freq-finish": 1 if state == "hashing" else 0,
                    "btmineroff": "true" if state == "sleeping" else "false",
                }
            },
        )

    def _miner_setting(self, cmd: str, param: Any, t: float) -> dict[str, Any]:
        return self._reply(
            cmd,
            {
                "power-mode": "normal",
                "power-limit": self.limit_w,
                "fast-boot": "disable",
                "heat-mode": "normal",
                "web-pool": 1,
                "hostname": "WhatsMiner",
            },
        )

    def _system_setting(self, cmd: str, param: Any, t: float) -> dict[str, Any]:
        return self._reply(
            cmd, {"ntp-server": ["pool.ntp.org"], "timezone": "UTC", "hostname": "WhatsMiner", "log-server": ""}
        )

    def _fan_setting(self, cmd: str, param: Any, t: float) -> dict[str, Any]:
        return self._reply(cmd, {"fan-poweroff-cool": 1, "fan-zero-speed": 0, "fan-temp-offset": 0})

    def _set(self, cmd: str, param: Any, t: float) -> dict[str, Any]:
        ignoring = self.ignoring()
        if cmd == "set.miner.power_limit":
            try:
                watts = int(param)
            except (TypeError, ValueError):
                return self._reply(cmd, "invalid param", -2)
            if isinstance(param, bool) or not self.spec.wm_min_w <= watts <= MAX_LIMIT_W:
                return self._reply(cmd, f"power limit out of range [{int(self.spec.wm_min_w)}, {MAX_LIMIT_W}]", -2)
            if not ignoring:
                self.limit_w = watts
                # the board cannot draw more than its stock setting, whatever the limit says
                self.physics.set_setpoint(t, float(min(watts, self.spec.nominal_w)))
            return self._reply(cmd, "ok")
        if cmd == "set.miner.service":
            if param not in ("start", "stop", "restart", "enable", "disable"):
                return self._reply(cmd, "invalid param", -2)
            if not ignoring:
                if param in ("stop", "disable"):
                    self.physics.sleep(t)
                elif param in ("start", "enable"):
                    self.physics.wake(t)
                else:
                    self.physics.sleep(t)
                    self.physics.wake(t)
            return self._reply(cmd, "ok")
        if cmd == "set.system.reboot":
            if not ignoring:
                self.site.reboot(self, self.params.reboot_s)
            return self._reply(cmd, "ok")
        if cmd == "set.system.led":
            if not ignoring:
                self.led = "auto" if param == "auto" else "manual"
            return self._reply(cmd, "ok")
        return self._reply(cmd, "invalid command", -2)
