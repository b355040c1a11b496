#!/usr/bin/env bash
# The chaos runs at full counts, on the whole agent with the simulated site, a real Mosquitto and real SQLite:
#   broker kill/restart cycles, agent kill -9 cycles (crash points and random moments), disk full / locked /
#   read-only state directory (needs root: it mounts a tmpfs), and fuzzed input on every channel.
# Prints one Markdown table row per runner (the README's chaos table) and keeps the rows as JSON lines.
#
#   sudo scripts/chaos.sh                      # 100 cycles each, 10,000 fuzz payloads per channel
#   sudo CYCLES=20 PAYLOADS=2000 scripts/chaos.sh
#   sudo scripts/chaos.sh broker kill          # only some runners (broker kill disk fuzz)
#
# The runners run one after the other (they are timing-sensitive; do not run two at once on a small machine).
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || scripts/setup.sh
PY=.venv/bin/python
CYCLES=${CYCLES:-100}
BROKER_CYCLES=${BROKER_CYCLES:-$CYCLES}
KILL_CYCLES=${KILL_CYCLES:-$CYCLES}
DISK_CYCLES=${DISK_CYCLES:-$CYCLES}
PAYLOADS=${PAYLOADS:-10000}
OUT=${OUT:-chaos-results-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
RUNNERS=("$@")
[ ${#RUNNERS[@]} -gt 0 ] || RUNNERS=(broker kill disk fuzz)

: >"$OUT"
status=0
for runner in "${RUNNERS[@]}"; do
  case "$runner" in
    broker) args=(--cycles "$BROKER_CYCLES") ;;
    kill) args=(--cycles "$KILL_CYCLES") ;;
    disk)
      if [ "$(id -u)" != 0 ]; then
        echo "== disk: skipped (needs root to mount a tmpfs)" >&2
        continue
      fi
      args=(--cycles "$DISK_CYCLES")
      ;;
    fuzz) args=(--payloads "$PAYLOADS") ;;
    *)
      echo "unknown runner $runner (broker kill disk fuzz)" >&2
      exit 2
      ;;
  esac
  echo "== $runner ${args[*]} ($(date -u +%H:%M:%S))" >&2
  $PY -m "tests.bench.chaos_$runner" "${args[@]}" --json-out "$OUT" || status=1
done

echo
echo "== chaos table ($(date -u +%FT%TZ), $(nproc) cores; counts as run)"
$PY - "$OUT" <<'EOF'
import json, sys
from tests.bench.chaos_common import Row, table
rows = [Row(**json.loads(line)) for line in open(sys.argv[1]) if line.strip()]
print(table(rows))
bad = [r.runner for r in rows if not r.clean]
print("\nall clean: 0 lost, 0 doubled, 0 violations, 0 crashes" if not bad else f"\nNOT clean: {', '.join(bad)}")
sys.exit(1 if bad else 0)
EOF
[ $? -eq 0 ] || status=1
echo "rows: $OUT"
exit $status
