#!/usr/bin/env bash
# Sets up the machine (packages, model), builds tokenfleet and runs the demo: a
# whole fleet on this machine: a coordinator and 3 agents on simulated vehicles that park,
# charge and leave, serving the real model (SmolLM2-135M-Instruct Q4_1) over the OpenAI API.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# `cargo run` finds the binary wherever CARGO_TARGET_DIR puts it, and replaces itself with it.
exec cargo run --quiet -p tokenfleet -- up "$@"
