"""Stock Bitmain firmware (S19/S21 family): read-only cgminer-style RPC (bmminer) on 4028, and the web CGI on
port 80 behind HTTP Digest auth (root/root), where `set_miner_conf.cgi` switches the work mode: 0 normal,
1 sleep, 3 low power. No power limit and no wattage reading anywhere: an agent must estimate this miner's power."""

from __future__ import annotations

import json
from typing import Any

from hashflex.sim.device import Device
from hashflex.sim.digest import DigestAuth
from hashflex.sim.physics import hashrate_at
from hashflex.sim.transport import HttpRequest, http_response

MINER_VERSION = "49.0.1.3"
BMMINER_VERSION = "1.0.0"
COMPILE_TIME = "Thu Mar 10 19:26:23 CST 2022"
REALM = "antMiner Configuration"
LOW_POWER_SHARE = 0.78  # LPM: about three quarters of stock power
MODES = {0: "normal", 1: "sleep", 3: "low"}
INDEX_HTML = b"<html><head><title>Antminer</title></head><body><div id='app'></div></body></html>"


class AntminerDevice(Device):
    family = "antminer"
    firmware = f"Antminer {MINER_VERSION}"
    ports = (4028, 80)
    web_password = "root"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.work_mode = 0
        self.blinking = False
        self.auth = DigestAuth(REALM, "root", self.web_password, secret=self.serial.encode())
        self.pools = [
            {"url": "stratum+tcp://btc.example-pool.net:3333", "user": f"site.{self.serial[:6].lower()}", "pass": "x"},
            {"url": "", "user": "", "pass": ""},
            {"url": "", "user": "", "pass": ""},
        ]

    def reset_to_defaults(self) -> None:
        # a power cycle that loses what was set since the last save: normal mode, LED off
        self.work_mode = 0
        self.blinking = False

    def default_setpoint_w(self) -> float:
        return self.spec.nominal_w

    def _mode_setpoint(self, mode: int) -> float:
        return self.spec.nominal_w * (LOW_POWER_SHARE if mode == 3 else 1.0)

    def truth(self, t: float) -> dict[str, Any]:
        doc = super().truth(t)
        doc["mode"] = MODES.get(self.work_mode, str(self.work_mode))
        return doc

    # -- RPC 4028 (bmminer) -------------------------------------------------------------------------------
    def rpc(self, command: str, param: str | None, req: dict[str, Any]) -> dict[str, Any]:
        t = self.now()
        st = self.status
        if command == "version":
            return {
                "STATUS": [st("S", 22, "BMMiner versions")],
                "VERSION": [
                    {
                        "BMMiner": BMMINER_VERSION,
                        "API": "3.1",
                        "Miner": MINER_VERSION,
                        "CompileTime": COMPILE_TIME,
                        "Type": self.spec.name,
                    }
                ],
                "id": 1,
            }
        if command == "summary":
            ghs = self.physics.hashrate_ths(t) * 1000.0
            return {
                "STATUS": [st("S", 11, "Summary")],
                "SUMMARY": [
                    {
                        "Elapsed": self.uptime_s(t),
                        "GHS 5s": f"{ghs:.2f}",
                        "GHS av": round(ghs, 2),
                        "GHS 30m": round(ghs, 2),
                        "Found Blocks": 0,
                        "Getworks": self.accepted // 3,
                        "Accepted": self.accepted,
                        "Rejected": 9,
                        "Hardware Errors": 31,
                        "Utility": 1.1,
                        "Discarded": 200,
                        "Stale": 0,
                        "Get Failures": 0,
                        "Local Work": self.accepted * 4,
                        "Remote Failures": 0,
                        "Network Blocks": 500,
                        "Total MH": ghs * self.uptime_s(t) * 1e3,
                        "Work Utility": 1.4e6,
                        "Difficulty Accepted": 6.5e9,
                        "Difficulty Rejected": 5.9e5,
                        "Difficulty Stale": 0.0,
                        "Best Share": 2.1e9,
                        "Device Hardware%": 0.0001,
                        "Device Rejected%": 0.01,
                        "Pool Rejected%": 0.01,
                        "Pool Stale%": 0.0,
                        "Last getwork": self.site.clock.unix(),
                    }
                ],
                "id": 1,
            }
        if command == "stats":
            return self._stats(t)
        if command == "pools":
            rows = [
                {
                    "POOL": i,
                    "URL": p["url"],
                    "Status": "Alive" if p["url"] else "Dead",
                    "Priority": i,
                    "Quota": 1,
                    "Long Poll": "N",
                    "Getworks": 0,
                    "Accepted": self.accepted if i == 0 else 0,
                    "Rejected": 9 if i == 0 else 0,
                    "Discarded": 0,
                    "Stale": 0,
                    "Get Failures": 0,
                    "Remote Failures": 0,
                    "User": p["user"],
                    "Last Share Time": "0:00:01",
                    "Diff": "65.5K",
                    "Diff1 Shares": 0,
                    "Proxy Type": "",
                    "Proxy": "",
                    "Difficulty Accepted": 0.0,
                    "Difficulty Rejected": 0.0,
                    "Difficulty Stale": 0.0,
                    "Last Share Difficulty": 65536.0,
                    "Has Stratum": True,
                    "Stratum Active": i == 0,
                    "Stratum URL": p["url"].split("//")[-1],
                    "Has GBT": False,
                    "Best Share": 0,
                    "Pool Rejected%": 0.0,
                    "Pool Stale%%": 0.0,
                }
                for i, p in enumerate(self.pools)
                if p["url"]
            ]
            return {"STATUS": [st("S", 7, f"{len(rows)} Pool(s)")], "POOLS": rows, "id": 1}
        if command == "devs":
            _, chains = self._chains(t)
            rows = [
                {
                    "ASC": i,
                    "Name": "BTM_SOC0",
                    "ID": i,
                    "Enabled": "Y",
                    "Status": "Alive",
                    "MHS av": r * 1000,
                    "MHS 5s": r * 1000,
                    "Device Elapsed": self.uptime_s(t),
                }
                for i, r in enumerate(chains)
            ]
            return {"STATUS": [st("S", 9, f"{len(rows)} ASC(s)")], "DEVS": rows, "id": 1}
        return {"STATUS": [st("E", 14, "Invalid command")], "id": 1}

    def status(self, kind: str, code: int, msg: str) -> dict[str, Any]:
        return {
            "STATUS": kind,
            "When": self.site.clock.unix(),
            "Code": code,
            "Msg": msg,
            "Description": f"bmminer {BMMINER_VERSION}",
        }

    def _chains(self, t: float) -> tuple[float, list[float]]:
        ghs = self.physics.hashrate_ths(t) * 1000.0
        return ghs, [round(ghs * s, 2) for s in (0.333, 0.332, 0.335)[: self.spec.boards]]

    def _stats(self, t: float) -> dict[str, Any]:
        ghs, chains = self._chains(t)
        board, chip = self.physics.temps(t)
        b, c = round(board), round(chip)
        rpm = self.physics.fan_rpm(t)
        ideal = hashrate_at(self.spec, self._mode_setpoint(self.work_mode)) * 1000.0
        row: dict[str, Any] = {
            "STATS": 0,
            "ID": "BTM_SOC0",
            "Elapsed": self.uptime_s(t),
            "Calls": 0,
            "Wait": 0.0,
            "Max": 0.0,
            "Min": 99999999.0,
            "GHS 5s": round(ghs, 2),
            "GHS av": round(ghs, 2),
            "rate_30m": round(ghs, 2),
            "Mode": 2,
            "miner_count": self.spec.boards,
            "frequency": self.spec.freq_mhz,
            "fan_num": self.spec.fans,
            "total_rateideal": round(ideal, 2),
            "total_freqavg": self.spec.freq_mhz,
            "total_acn": self.spec.boards * self.spec.chips_per_board,
            "total_rate": round(ghs, 2),
            "temp_max": c,
            "no_matching_work": 0,
            "rate_unit": "GH",
            "miner_version": MINER_VERSION,
            "miner_id": self.serial.lower(),
        }
        for i in range(self.spec.fans):
            row[f"fan{i + 1}"] = rpm + 40 * i
        for i, rate in enumerate(chains, start=1):
            row[f"chain_acn{i}"] = self.spec.chips_per_board
            row[f"chain_acs{i}"] = " ooooooo" * 4
            row[f"chain_hw{i}"] = 10
            row[f"chain_rate{i}"] = f"{rate:.2f}"
            row[f"chain_rateideal{i}"] = round(ideal / self.spec.boards, 2)
            row[f"temp_pcb{i}"] = f"{b - 4}-{b - 4}-{b}-{b}"
            row[f"temp_chip{i}"] = f"{c - 5}-{c - 5}-{c}-{c}"
            row[f"temp_pic{i}"] = f"{c - 5}-{c - 5}-{c}-{c}"
            row[f"freq{i}"] = self.spec.freq_mhz
        head = {"BMMiner": BMMINER_VERSION, "Miner": MINER_VERSION, "CompileTime": COMPILE_TIME, "Type": self.spec.name}
        return {"STATUS": [self.status("S", 70, "BMMiner stats")], "STATS": [head, row], "id": 1}

    # -- web CGI on port 80 -------------------------------------------------------------------------------
    def handle_http(self, port: int, request: HttpRequest) -> bytes | None:
        if "blackhole" in self.faults:
            return None
        if not self.auth.check(request.method, request.headers.get("authorization")):
            return http_response(
                401, b"<html><body>401 Unauthorized</body></html>", extra={"WWW-Authenticate": self.auth.challenge()}
            )
        if "error" in self.faults:
            return http_response(500, b"<html><body>500 Internal Server Error</body></html>")
        path = request.path
        if path in ("/", "/index.html"):
            return http_response(200, INDEX_HTML)
        if not path.startswith("/cgi-bin/") or not path.endswith(".cgi"):
            return http_response(404, b"<html><body>404 Not Found</body></html>")
        name = path[len("/cgi-bin/") : -len(".cgi")]
        t = self.now()
        handler = getattr(self, f"_cgi_{name}", None)
        if handler is None:
            return http_response(404, b"<html><body>404 Not Found</body></html>")
        doc = handler(request, t)
        return http_response(200, json.dumps(doc, separators=(",", ":")).encode(), "application/json")

    def _cgi_get_system_info(self, request: HttpRequest, t: float) -> dict[str, Any]:
        return {
            "minertype": self.spec.name,
            "nettype": "DHCP",
            "netdevice": "eth0",
            "macaddr": self.mac,
            "hostname": "Antminer",
            "ipaddress": self.ip,
            "netmask": "255.0.0.0",
            "gateway": "127.0.0.1",
            "dnsservers": "127.0.0.53",
            "system_mode": "GNU/Linux",
            "system_kernel_version": "Linux 4.9.113 #1 SMP PREEMPT",
            "system_filesystem_version": COMPILE_TIME,
            "firmware_type": "Release",
            "serinum": self.serial,
        }

    def _cgi_get_network_info(self, request: HttpRequest, t: float) -> dict[str, Any]:
        return {
            "nettype": "DHCP",
            "netdevice": "eth0",
            "macaddr": self.mac,
            "ipaddress": self.ip,
            "netmask": "255.0.0.0",
            "conf_nettype": "DHCP",
            "conf_hostname": "Antminer",
            "conf_ipaddress": "",
            "conf_netmask": "",
            "conf_gateway": "",
            "conf_dnsservers": "",
        }

    def _cgi_get_miner_conf(self, request: HttpRequest, t: float) -> dict[str, Any]:
        return {
            "pools": self.pools,
            "api-listen": True,
            "api-network": True,
            "api-groups": "A:stats:pools:devs:summary:version",
            "api-allow": "A:0/0,W:*",
            "bitmain-fan-ctrl": False,
            "bitmain-fan-pwm": "100",
            "bitmain-use-vil": True,
            "bitmain-freq": str(self.spec.freq_mhz),
            "bitmain-voltage": "1400",
            "bitmain-ccdelay": "0",
            "bitmain-pwth": "0",
            "bitmain-work-mode": str(self.work_mode),
            "bitmain-freq-level": "100",
        }

    def _cgi_set_miner_conf(self, request: HttpRequest, t: float) -> dict[str, Any]:
        try:
            conf = json.loads(request.body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"stats": "error", "code": "M001", "msg": "Illegal json!"}
        if not isinstance(conf, dict):
            return {"stats": "error", "code": "M001", "msg": "Illegal json!"}
        mode_raw = conf.get("miner-mode", self.work_mode)
        try:
            mode = int(mode_raw)
        except (TypeError, ValueError):
            return {"stats": "error", "code": "M002", "msg": "Illegal miner-mode!"}
        if mode not in MODES:
            return {"stats": "error", "code": "M002", "msg": "Illegal miner-mode!"}
        if not self.ignoring():
            pools = conf.get("pools")
            if isinstance(pools, list) and all(isinstance(p, dict) for p in pools):
                self.pools = [
                    {"url": str(p.get("url", "")), "user": str(p.get("user", "")), "pass": str(p.get("pass", ""))}
                    for p in pools[:3]
                ]
            self._set_mode(mode, t)
        return {"stats": "success", "code": "M000", "msg": "OK!"}

    def _set_mode(self, mode: int, t: float) -> None:
        old = self.work_mode
        self.work_mode = mode
        if mode == 1:
            self.physics.sleep(t)
            return
        setpoint = self._mode_setpoint(mode)
        if old == 1 or self.physics.current_state(t) == "sleeping":
            self.physics.setpoint_w = setpoint
            self.physics.wake(t)
        else:
            self.physics.set_setpoint(t, setpoint)

    def _web_status(self, t: float) -> dict[str, Any]:
        return {"STATUS": "S", "when": self.site.clock.unix(), "Msg": "", "api_version": "1.0.0"}

    def _info(self) -> dict[str, Any]:
        return {"miner_version": MINER_VERSION, "CompileTime": COMPILE_TIME, "type": self.spec.name}

    def _cgi_summary(self, request: HttpRequest, t: float) -> dict[str, Any]:
        ghs, _ = self._chains(t)
        ideal = hashrate_at(self.spec, self._mode_setpoint(self.work_mode)) * 1000.0
        sleeping = self.work_mode == 1
        rate_ok = "s" if sleeping or ghs > 0.5 * ideal or self.physics.current_state(t) == "waking" else "w"
        return {
            "STATUS": {**self._web_status(t), "Msg": "summary"},
            "INFO": self._info(),
            "SUMMARY": [
                {
                    "elapsed": self.uptime_s(t),
                    "rate_5s": round(ghs, 2),
                    "rate_30m": round(ghs, 2),
                    "rate_avg": round(ghs, 2),
                    "rate_ideal": round(ideal, 2),
                    "rate_unit": "GH/s",
                    "hw_all": 31,
                    "bestshare": 2100000000,
                    "status": [
                        {"type": "rate", "status": rate_ok, "code": 0, "msg": "" if rate_ok == "s" else "hashrate low"},
                        {"type": "network", "status": "s", "code": 0, "msg": ""},
                        {"type": "fans", "status": "s", "code": 0, "msg": ""},
                        {"type": "temp", "status": "s", "code": 0, "msg": ""},
                    ],
                }
            ],
        }

    def _cgi_stats(self, request: HttpRequest, t: float) -> dict[str, Any]:
        ghs, chains = self._chains(t)
        board, chip = self.physics.temps(t)
        b, c = round(board), round(chip)
        ideal = hashrate_at(self.spec, self._mode_setpoint(self.work_mode)) * 1000.0
        rpm = self.physics.fan_rpm(t)
        return {
            "STATUS": {**self._web_status(t), "Msg": "stats"},
            "INFO": self._info(),
            "STATS": [
                {
                    "elapsed": self.uptime_s(t),
                    "rate_5s": round(ghs, 2),
                    "rate_30m": round(ghs, 2),
                    "rate_avg": round(ghs, 2),
                    "rate_ideal": round(ideal, 2),
                    "rate_unit": "GH/s",
                    "chain_num": self.spec.boards,
                    "fan_num": self.spec.fans,
                    "fan": [rpm + 40 * i for i in range(self.spec.fans)],
                    "hwp_total": 0.0001,
                    "miner-mode": self.work_mode,
                    "freq-level": 100,
                    "chain": [
                        {
                            "index": i,
                            "freq_avg": self.spec.freq_mhz,
                            "rate_ideal": round(ideal / self.spec.boards, 2),
                            "rate_real": rate,
                            "asic_num": self.spec.chips_per_board,
                            "asic": "oooooooo " * 4,
                            "temp_pic": [c - 5, c - 5, c, c],
                            "temp_pcb": [b - 4, b - 4, b, b],
                            "temp_chip": [c - 5, c - 5, c, c],
                            "hw": 10,
                            "eeprom_loaded": True,
                            "sn": f"{self.serial[:10]}B{i}",
                            "hwp": 0.0001,
                            "tpl": [],
                        }
                        for i, rate in enumerate(chains)
                    ],
                }
            ],
        }

    def _cgi_pools(self, request: HttpRequest, t: float) -> dict[str, Any]:
        return {
            "STATUS": {**self._web_status(t), "Msg": "pools"},
            "INFO": self._info(),
            "POOLS": [
                {
                    "index": i,
                    "url": p["url"],
                    "user": p["user"],
                    "status": "Alive",
                    "priority": i,
                    "getworks": 0,
                    "accepted": self.accepted if i == 0 else 0,
                    "rejected": 0,
                    "discarded": 0,
                    "stale": 0,
                    "diff": "65.5K",
                    "diff1": 0,
                    "diffa": 0,
                    "diffr": 0,
                    "diffs": 0,
                    "lsdiff": 0,
                    "lstime": "0:00:01",
                }
                for i, p in enumerate(self.pools)
                if p["url"]
            ],
        }

    def _cgi_get_blink_status(self, request: HttpRequest, t: float) -> dict[str, Any]:
        return {"blink": self.blinking}

    def _cgi_blink(self, request: HttpRequest, t: float) -> dict[str, Any]:
        try:
            body = json.loads(request.body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = {}
        on = isinstance(body, dict) and str(body.get("blink", "false")).lower() == "true"
        if not self.ignoring():
            self.blinking = on
        return {"code": "B000" if on else "B100", "msg": "OK!"}

    def _cgi_reboot(self, request: HttpRequest, t: float) -> dict[str, Any]:
        if not self.ignoring():
            self.site.reboot(self, self.params.reboot_s)
        return {"code": "R000", "msg": "OK!"}
