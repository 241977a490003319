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
# Disk: the torch wheel is ~4.7 GB installed; pip's cache would keep a second copy of it, and
# incremental compilation data (~1.5 GB here) buys nothing for one build on a fresh machine.
export PIP_NO_CACHE_DIR=1
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# One venv for the Python the tests use. moto[server]: the S3-compatible server on 127.0.0.1
# that tests/remote_cache.rs starts; in CI those tests must run, not skip.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check 'moto[server]>=5.1,<6'
export AUTOSCALE_TEST_PYTHON="$PWD/.venv/bin/python"
export AUTOSCALE_REQUIRE_S3_TESTS=1
# pyarrow, HF tokenizers and datasets, pytest: tests/data_stages.rs checks the Arrow shards and
# tokenizer.json from Python (tests/python/test_data.py); in CI those checks must run, not skip.
.venv/bin/pip install --quiet --disable-pip-version-check 'pyarrow>=14' 'tokenizers>=0.20' 'datasets>=2.19' 'pytest>=7'
export AUTOSCALE_REQUIRE_DATA_PYTHON=1
# torch, pinned to the libtorch tch 0.26 expects: the trainer binary `autoscale-train`
# (stages/trainer) links it and the demo pipelines train on it; transformers: a test loads our
# Hugging Face export in it. In CI those checks must run, not skip.
.venv/bin/pip install --quiet --disable-pip-version-check 'torch==2.13.0' 'transformers>=4.40'
export AUTOSCALE_REQUIRE_TRANSFORMERS=1
export AUTOSCALE_REQUIRE_TRAINER=1
# torch-sys finds libtorch in the venv's torch wheel; the trainer gets an rpath to it (its build.rs).
torch_cargo() { PATH="$PWD/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1 cargo "$@"; }

# A single-node Slurm cluster from Debian's packages (slurmctld, slurmd, munge; four fake GPUs) for
# tests/slurm.rs, stopped when this script exits; in CI those tests must run, not skip.
echo "== Slurm test cluster"
bash tests/slurm/cluster.sh start
trap 'bash tests/slurm/cluster.sh stop || true' EXIT
eval "$(bash tests/slurm/cluster.sh env)"
export AUTOSCALE_REQUIRE_SLURM=1

echo "== formatting and lints (the default members without libtorch, then the whole workspace)"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
torch_cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== Python tools"
python3 examples/proxy/ngram_proxy.py --self-test
.venv/bin/python examples/trainers/hf_clm.py --self-test

# One build of the tests, the whole workspace: the trainer binary lands next to `autoscale`,
# where the train tests find it; clippy above checks that the default members build alone.
echo "== Rust tests (the whole workspace, with the trainer)"
torch_cargo test --workspace --locked
