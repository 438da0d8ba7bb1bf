#!/usr/bin/env bash
# Fetch into .whl/ the wheels scripts/gpu-check.sh needs on a bare, air-gapped GPU machine
# (Python 3.12, x86-64 Linux): the list, the versions and why those versions are in
# scripts/gpu_payload.py (CARRIED_WHEELS; BARE_MISSING lists what stays behind). Needs PyPI access
# here, none there. Afterwards `python scripts/gpu_payload.py --dry-run` says whether the checkout
# and the wheels fit the 64 MiB a device call carries.
#   scripts/gpu-wheels.sh            (PYTHON: the interpreter whose pip downloads; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
dir=.whl
# the wheels travel as a carried path, never as tracked files
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx "/$dir/" "$exclude" 2>/dev/null || echo "/$dir/" >>"$exclude"
# only the listed wheels: an old version left beside a new one stops the install there
rm -rf "$dir"
mkdir -p "$dir"
mapfile -t reqs < <("$PYTHON" scripts/gpu_payload.py --requirements)
sdist_only=$("$PYTHON" -c 'import sys; sys.path.insert(0, "scripts"); import gpu_payload; print(" ".join(gpu_payload.BUILT_FROM_SDIST))')
binary=()
built=()
for req in "${reqs[@]}"; do
  if [[ " $sdist_only " == *" ${req%%==*} "* ]]; then built+=("$req"); else binary+=("$req"); fi
done
# pip matches the manylinux tags exactly: the ones the carried versions publish for cp312
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dir" "${binary[@]}"
# pure-Python packages published as an sdist alone: a py3-none-any wheel built here installs there
if ((${#built[@]})); then
  "$PYTHON" -m pip wheel --no-deps --no-binary=:all: -w "$dir" "${built[@]}"
fi
ls -l "$dir"
