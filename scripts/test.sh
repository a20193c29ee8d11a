#!/usr/bin/env bash
# Sets up the machine (packages, model) and runs the checks CI runs, in CI's order:
# formatting, clippy with warnings as errors, then every test on the real model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
