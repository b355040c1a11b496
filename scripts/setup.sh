#!/usr/bin/env bash
# Set up everything hashflex needs on a fresh Debian machine: system packages (Mosquitto for the MQTT side and
# its tests, systemd-analyze for the unit check) and a virtual environment in .venv with the project installed.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
command -v mbpoll >/dev/null 2>&1 || need+=(mbpoll)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.hashflex-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing hashflex and its test tools into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  # setuptools warns that the hashflex/ folder shadows the install: it is the install (an editable one)
  PYTHONWARNINGS=ignore::UserWarning .venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c 'import hashflex.agent, hashflex.drivers, hashflex.sim, pyasic, aiomqtt' # fail loudly if the install did not take
  touch "$stamp"
fi
scripts/link-cli.sh  # `hashflex` on PATH for every shell, sudo included
