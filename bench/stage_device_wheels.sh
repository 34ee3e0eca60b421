#!/usr/bin/env bash
# Before a GPU lease, here: the wheels fastmice needs that the bare lent machine lacks (it has CPython 3.12, torch,
# numpy, scipy, scikit-learn and pytest, and reaches no package registry), for CPython 3.12 on x86-64 Linux, into
# .device-wheels/ (about 43 MB: pyyaml, tqdm, pillow, matplotlib and its dependencies, faiss-cpu). Pass
# `carry: [".device-wheels"]` with the device command; bench/device_checks.sh installs them into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device-wheels
python3 -m pip download --quiet --disable-pip-version-check --dest .device-wheels --no-deps --only-binary=:all: \
  --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 \
  pyyaml tqdm pillow matplotlib contourpy cycler fonttools kiwisolver packaging pyparsing python-dateutil six \
  faiss-cpu
du -sh .device-wheels
