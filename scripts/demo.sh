#!/usr/bin/env bash
# Sets up the machine (packages, model), builds tokenfleet and runs the demo: a
# whole fleet on this machine: a coordinator and 3 agents on simulated vehicles that park,
# charge and leave, serving the real model (SmolLM2-135M-Instruct Q4_1) over the OpenAI API.
#
# `scripts/demo.sh --coordinators 3` runs the fleet on three active coordinators sharing a
# throwaway PostgreSQL cluster (scripts/pg.sh; stopped when the demo ends), unless
# TOKENFLEET_DATABASE_URL names a database already.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
coordinators=1
prev=""
for arg in "$@"; do
  case "$arg" in
    --coordinators=*) coordinators="${arg#*=}" ;;
    *) if [ "$prev" = "--coordinators" ]; then coordinators="$arg"; fi ;;
  esac
  prev="$arg"
done
if [ "$coordinators" != 1 ] && [ -z "${TOKENFLEET_DATABASE_URL:-}" ]; then
  pg_env=$(scripts/pg.sh start)
  eval "$pg_env"
  trap 'scripts/pg.sh stop' EXIT
  export TOKENFLEET_DATABASE_URL="$TOKENFLEET_TEST_PG_URL"
  # Not exec: the trap stops the cluster when the fleet stops.
  cargo run --quiet -p tokenfleet -- up "$@"
  exit $?
fi
# `cargo run` finds the binary wherever CARGO_TARGET_DIR puts it, and replaces itself with it.
exec cargo run --quiet -p tokenfleet -- up "$@"
