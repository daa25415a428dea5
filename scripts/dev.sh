#!/usr/bin/env bash
# Set up (once) and run comfy_tetriserve from a fresh clone: a private .venv, torch, the package.
#
#   scripts/dev.sh demo [FLAGS]   the main job: the CPU demo of the service (tiny models)
#   scripts/dev.sh test [ARGS]    the whole test suite (pytest ARGS)
#   scripts/dev.sh run CMD...     any command inside the venv (e.g. comfy-tetriserve bench)
#
# Torch: on a machine without an NVIDIA driver the CPU build is installed (torch==2.13.0; where
# no local CPU wheel exists, set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
# With nvidia-smi present the default CUDA build is installed. TETRISERVE_TORCH overrides the
# requirement (e.g. TETRISERVE_TORCH="torch==2.11.0").
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv=${TETRISERVE_VENV:-$root/.venv}

py=${PYTHON:-python3}
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "comfy_tetriserve needs Python 3.10 or newer (found: $("$py" --version 2>&1))" >&2
  exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "== creating $venv" >&2
  "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"

if [ -n "${TETRISERVE_TORCH:-}" ]; then
  torch_req=$TETRISERVE_TORCH
elif command -v nvidia-smi >/dev/null 2>&1; then
  torch_req="torch"
else
  torch_req="torch==2.13.0"
fi

# Reinstall only when the package's requirements (or the torch choice) changed.
stamp="$venv/.tetriserve-installed"
want=$( { cat pyproject.toml; echo "$torch_req"; } | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "== installing $torch_req and comfy-tetriserve[test,bench,cluster] into $venv" >&2
  "$vpy" -m pip install --quiet --upgrade pip
  "$vpy" -m pip install --quiet "$torch_req"
  "$vpy" -m pip install --quiet -e ".[test,bench,cluster]"
  echo "$want" > "$stamp"
fi

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo)
    exec "$venv/bin/comfy-tetriserve" demo "$@"
    ;;
  test)
    set +e
    "$vpy" -m pytest "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
      echo "pytest collected no tests: treating that as a failure" >&2
      exit 1
    fi
    exit "$rc"
    ;;
  run)
    export PATH="$venv/bin:$PATH"
    exec "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh demo|test|run ..." >&2
    exit 2
    ;;
esac
