#!/usr/bin/env bash
# The embedded default demo, end to end, from a fresh machine: builds autoscale, runs
# pipelines/tiny.yaml (corpus from registry packages, DDO at two scales, the AutoScale predictor,
# target trainings, report) and prints where the report is. Extra arguments go to `autoscale run`
# (for example `--with pipelines/smoke.yaml` for the small CI variant).
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
    echo "hint: apt-get install -y python3 npm dpkg-dev groff-base" >&2
    exit 1
  fi
done

cargo build --release --locked
./target/release/autoscale run pipelines/tiny.yaml "$@"
./target/release/autoscale show pipelines/tiny.yaml report "$@" | head -12
