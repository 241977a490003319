#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, then runs them.
# Usage: bash tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "installing the Rust toolchain (rustup)" >&2
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  # shellcheck disable=SC1091
  source "$HOME/.cargo/env"
fi
if ! command -v python3 >/dev/null 2>&1; then
  echo "error: the tests need python3 (the proxy trainer and corpus scripts are Python)" >&2
  echo "hint: apt-get install -y python3" >&2
  exit 1
fi
rustup component add clippy rustfmt >/dev/null 2>&1 || true

echo "== formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== Python tools"
python3 examples/proxy/ngram_proxy.py --self-test

echo "== Rust tests"
cargo test --workspace --locked
