#!/usr/bin/env bash
# The test command: lint, type-check, then the whole test suite against real Mosquitto, real TCP to the
# simulated site and real SQLite. Extra arguments go to pytest (e.g. scripts/test.sh -k mqtt).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== ruff" >&2
.venv/bin/ruff format --check agent drivers sim coordinator contract hashflex tests scripts
.venv/bin/ruff check agent drivers sim coordinator contract hashflex tests scripts
echo "== mypy" >&2
# through the import package (hashflex/ links the folders), so every module has the one name it is imported by
.venv/bin/mypy -p hashflex.agent -p hashflex.drivers -p hashflex.coordinator -p hashflex.contract
echo "== pytest" >&2
# two test files at a time (TEST_JOBS=1 for one): a file is the unit (--dist loadfile), since each keeps to its own
# loopback range and its module-scoped sites sit on fixed addresses; and the slowest tests in every run's log: where
# the 30-minute CI budget goes
exec .venv/bin/pytest -n "${TEST_JOBS:-2}" --dist loadfile --durations=30 "$@"
