#!/usr/bin/env bash
# The one command for a lent GPU machine (see bench/device_checks.py for the parts, limits and outputs):
#   bash bench/device_checks.sh            # everything, at most 9 minutes, results under $OUT
#   bash bench/device_checks.sh --dry-run  # the same on the CPU at tiny sizes (CI runs it)
# Run from anywhere; DALI (optional) is picked up from /tmp/site when ../shared/device/stage.sh put it there.
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/device_checks.py "$@"
