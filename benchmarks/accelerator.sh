#!/usr/bin/env bash
# The device machine's one command. Its image has JAX, flax, optax, orbax and the like but not
# ml_collections or pytest, and it cannot reach a package index: those travel as wheels in
# .wheels/ (pure Python, the versions this checkout's environment runs), fetched here first:
#
#   bash benchmarks/accelerator.sh --fetch        # here: download the wheels into .wheels/
#   bash benchmarks/accelerator.sh [FLAGS]        # there: install them if missing, then measure
#
# FLAGS go to `python -m benchmarks.accelerator` (e.g. --budget_seconds=300, --sections=...).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.wheels
PACKAGES="ml.collections|pytest|pluggy|iniconfig|pygments"
if [[ "${1:-}" == "--fetch" ]]; then
  mapfile -t pins < <(python -m pip freeze | grep -iE "^(${PACKAGES})==")
  python -m pip download --quiet --no-deps --only-binary=:all: -d "$WHEELS" "${pins[@]}"
  ls "$WHEELS"
  exit 0
fi
if ! python -c "import ml_collections, pytest" 2>/dev/null; then
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "error: ml_collections or pytest is missing and $WHEELS/ holds no wheels: run" \
         "'bash benchmarks/accelerator.sh --fetch' where a package index is reachable" >&2
    exit 1
  fi
  python -m pip install --quiet --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
fi
exec python -m benchmarks.accelerator "$@"
