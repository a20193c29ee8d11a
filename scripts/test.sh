#!/usr/bin/env bash
# Sets up the machine (packages, model, the pinned OpenAI client) and runs the checks CI runs,
# in CI's order: the coordinator's layout (scripts/check-layout.py), formatting, clippy with warnings as errors, every Rust test on the real model
# (the store's PostgreSQL suite on a throwaway cluster from scripts/pg.sh, stopped on exit),
# then the official `openai` Python client against a real fleet.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

CACHE="${TOKENFLEET_CACHE:-$HOME/.cache/tokenfleet}"
VENV="$CACHE/venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

python3 scripts/check-layout.py
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# The PostgreSQL store tests run for real here: never skipped, on a cluster of their own.
unset TOKENFLEET_TEST_PG
# (Assigned first: a failed start then stops this script; `eval "$(...)"` would hide it.)
pg_env=$(scripts/pg.sh start)
eval "$pg_env"
trap 'scripts/pg.sh stop' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
cargo test --workspace
cargo build -p tokenfleet
"$VENV/bin/python" -m pytest -q tests/python
