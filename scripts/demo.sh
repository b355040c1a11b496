#!/usr/bin/env bash
# The main job: a simulated site and the agent driving it through a short dispatch scenario. Prints a live
# status, and writes a plot of site power against cap and target plus the audit export to ./demo-out.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/hashflex demo "$@"
