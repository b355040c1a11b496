"""The systemd unit, sysusers entry, drop-in and example config, as text rendered for an install.

`systemd/` in the repository holds these rendered with the default paths (a test keeps them identical), so
packagers can copy files and `hashflex install-service` can write them from an installed wheel, pointing
`ExecStart=` at the hashflex that is actually installed.
"""

from __future__ import annotations

DEFAULT_BIN = "/opt/hashflex/bin/hashflex"
DEFAULT_CONFIG = "/etc/hashflex/site.yaml"
SERVICE_NAME = "hashflex"
UNIT_NAME = "hashflex.service"
SOCKET_PATH = "/run/hashflex/control.sock"

_UNIT = """\
# hashflex site agent. Installed by `hashflex install-service`; verify with `systemd-analyze verify` and
# `systemd-analyze security hashflex`. Override settings with `systemctl edit hashflex`, not by editing here.
[Unit]
Description=hashflex mining-site agent (grid dispatch, site cap)
Wants=network-online.target time-sync.target
After=network-online.target time-sync.target
# not Requires=mosquitto: the agent must run, and hold the cap, with the broker down
StartLimitIntervalSec=300
StartLimitBurst=10

[Service]
Type=notify
NotifyAccess=main
User=hashflex
Group=hashflex
# refuses to start on a config that does not load, with a message naming the file, field and value
ExecStartPre={bin} config check --config {config}
ExecStart={bin} run --config {config}
Restart=on-failure
RestartSec=5s
# READY=1 comes after the config, the SQLite state restore and the first bounded sweep of the fleet (not after
# the broker connects); a long first sweep asks for more time with EXTEND_TIMEOUT_USEC
TimeoutStartSec=180s
TimeoutStopSec=30s
# WATCHDOG=1 is sent at half this interval, only from a control tick that completed: a hung loop is restarted
WatchdogSec=30s
Environment=PYTHONUNBUFFERED=1

# /run/hashflex holds the control socket (mode 0660): operators in group hashflex can use the CLI
RuntimeDirectory=hashflex
RuntimeDirectoryMode=0750
StateDirectory=hashflex
StateDirectoryMode=0750
ConfigurationDirectory=hashflex
UMask=0027

# secrets as credentials (read from $CREDENTIALS_DIRECTORY; never in site.yaml, never in the environment).
# A missing file with no SetCredential= fallback fails the start, so each has a harmless one: an empty
# password (used only when mqtt.username is set) and no miner passwords.
LoadCredential=mqtt-password:/etc/hashflex/credentials/mqtt-password
SetCredential=mqtt-password:\\n
LoadCredential=miners.yaml:/etc/hashflex/credentials/miners.yaml
SetCredential=miners.yaml:{{}}

# one TCP connection per in-flight miner call: the default soft limit of 1024 is too low for a large site
LimitNOFILE=65536
MemoryMax=2G
TasksMax=512

# Sandbox (after synapse's matrix-synapse.service)
NoNewPrivileges=yes
# no capabilities at all: the agent binds no privileged port and owns no one else's files
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# other processes invisible; not ProcSubset=pid: gateway health reads /proc/meminfo and /proc/stat
ProtectProc=invisible
# AF_UNIX: control socket and sd_notify; AF_INET/AF_INET6: miners and the MQTT broker
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RemoveIPC=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
# @privileged includes chown: leave control_socket.group unset and add operators to group hashflex instead
SystemCallFilter=~@privileged @resources @obsolete
# a filtered call fails with EPERM (and a clear error) instead of killing the agent
SystemCallErrorNumber=EPERM
# Python without ctypes callbacks does not need W+X memory
MemoryDenyWriteExecute=yes

[Install]
WantedBy=multi-user.target
"""

SYSUSERS = """\
# hashflex agent: a system user and group of the same name (systemd-sysusers(8)).
# Operators join the group to use the control socket: `sudo usermod -aG hashflex $USER`.
u hashflex - "hashflex site agent" /var/lib/hashflex
"""

DYNAMIC_USER_DROPIN = """\
# Optional: run with a transient user instead of the static one from sysusers (demo or throw-away gateways).
# The control socket then belongs to that user only: use the CLI with sudo.
[Service]
DynamicUser=yes
"""

EXAMPLE_CONFIG = """\
# hashflex site config. Every setting and its default: `hashflex config dump --config {config}`.
# Check it with `hashflex config check --config {config}` (the service runs that before every start).
site:
  id: my-site                # letters, digits, - and _; used in MQTT topics
  cap_kw: 20000              # the licensed site cap: never exceeded, even in the worst case

miners:
  addresses:                 # single IPs, ranges a-b, CIDRs
    - 10.0.0.0/24
  # passwords per family: systemd credential /etc/hashflex/credentials/miners.yaml ({{luxos: ..., ...}})

mqtt:
  enabled: true
  host: 127.0.0.1
  port: 1883
  # username: hashflex       # its password: /etc/hashflex/credentials/mqtt-password

grid:
  public_keys:               # Ed25519 keys allowed to sign dispatches (PEM or raw base64)
    - /etc/hashflex/keys/grid.pub

state_dir: /var/lib/hashflex

control_socket:
  path: {socket}   # the CLI finds the agent here

metrics:
  host: 127.0.0.1            # Prometheus endpoint, localhost only by default
  port: 9708

logging:
  level: info
  levels: {{drivers: warning}}
"""


def render_unit(bin_path: str = DEFAULT_BIN, config_path: str = DEFAULT_CONFIG) -> str:
    for name, value in (("hashflex binary", bin_path), ("config path", config_path)):
        if not value.startswith("/") or any(c.isspace() for c in value):
            raise ValueError(f"{name} must be an absolute path without spaces: {value!r}")
    return _UNIT.format(bin=bin_path, config=config_path)


def render_example_config(config_path: str = DEFAULT_CONFIG) -> str:
    return EXAMPLE_CONFIG.format(config=config_path, socket=SOCKET_PATH)
