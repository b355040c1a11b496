#!/usr/bin/env bash
# The long run of the randomized closed-loop suite: N scenarios (default 10,000) of the real controller, actuator,
# fleet and store against the in-process simulated site, on virtual time. Prints scenarios, steps, site time, the
# worst safety and service margins seen and every violation by kind (with the first scenario story of each).
#   scripts/soak.sh                 # 10,000 scenarios, a new seed, both cores
#   scripts/soak.sh 2000 42         # 2,000 scenarios, seed 42
#   JOBS=1 scripts/soak.sh 500
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-10000}"
SEED="${2:-$(date +%s)}"
exec .venv/bin/python -m tests.bench.bench_closedloop --scenarios "$N" --seed "$SEED" --jobs "${JOBS:-2}"
