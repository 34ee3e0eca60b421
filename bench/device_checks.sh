#!/usr/bin/env bash
# The one command for a lent GPU machine (see bench/device_checks.py for the parts, limits and outputs):
#   bash bench/device_checks.sh            # everything, at most 9 minutes, results under $OUT
#   bash bench/device_checks.sh --dry-run  # the same on the CPU at tiny sizes (CI runs it)
# Run from anywhere. The wheels of bench/stage_device_wheels.sh (carried as .device-wheels/) are installed into
# /tmp/site first, where ../shared/device/stage.sh puts DALI too; the package itself runs from the checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".device-wheels/*.whl" >/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --no-index --target /tmp/site \
    .device-wheels/*.whl || echo "device_checks.sh: installing .device-wheels failed; the missing modules are listed in the summary"
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
exec python3 bench/device_checks.py "$@"
