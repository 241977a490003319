#!/usr/bin/env bash
# Install the peer tools for the benchmark into a project-local venv.
#   bash examples/bench/setup.sh
# Creates /work/main/.bench-venv (i.e. <repo>/.bench-venv) with pinned DVC 3 and
# Snakemake, and installs GNU make via apt if it is missing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${BENCH_VENV:-$ROOT/.bench-venv}"
PY="${PYTHON:-python3}"

# Pinned versions (what `pip install dvc snakemake` resolved to on
# Python 3.11 when the harness was written).  Override with DVC_VERSION / SNAKEMAKE_VERSION.
DVC_VERSION="${DVC_VERSION:-3.67.1}"
SNAKEMAKE_VERSION="${SNAKEMAKE_VERSION:-9.27.1}"

if ! command -v make >/dev/null 2>&1; then
  echo "== installing make via apt"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq make
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating venv $VENV"
  "$PY" -m venv "$VENV"
fi

"$VENV/bin/python" -m pip install -q --upgrade pip
echo "== installing dvc==$DVC_VERSION snakemake==$SNAKEMAKE_VERSION"
# constraints-peers.txt is the full `pip freeze` of the venv the published
# numbers came from; it pins the transitive dependencies too.
CONSTRAINTS=()
if [ -z "${BENCH_NO_CONSTRAINTS:-}" ] && [ -f "$HERE/constraints-peers.txt" ]; then
  CONSTRAINTS=(-c "$HERE/constraints-peers.txt")
fi
"$VENV/bin/python" -m pip install -q "${CONSTRAINTS[@]}" "dvc==$DVC_VERSION" "snakemake==$SNAKEMAKE_VERSION"

echo "== versions"
make --version | head -1
"$VENV/bin/dvc" --version | sed 's/^/dvc /'
"$VENV/bin/snakemake" --version | sed 's/^/snakemake /'
echo "ok: venv at $VENV"
