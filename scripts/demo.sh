#!/usr/bin/env bash
# Sets up the machine (packages, model), builds tokenfleet and runs the demo: the on-vehicle
# engine answering a chat prompt from the real model (SmolLM2-135M-Instruct Q4_1).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build -p tokenfleet
exec target/debug/tokenfleet chat "${@:-Explain why the sky is blue.}"
