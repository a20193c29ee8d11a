#!/usr/bin/env bash
# A throwaway PostgreSQL for tests: a fresh cluster in a temporary directory, listening on a
# free loopback port and on a Unix socket in that directory, with trust authentication for the
# superuser `postgres` (it accepts only local connections).
#
#   eval "$(scripts/pg.sh start)"   # prints `export TOKENFLEET_PG_DIR=... TOKENFLEET_TEST_PG_URL=...`
#   scripts/pg.sh url               # the cluster's URL
#   scripts/pg.sh stop              # stops the server and removes the directory
#
# `url` and `stop` act on $TOKENFLEET_PG_DIR, or else on the cluster this user started last
# (recorded in ${TMPDIR:-/tmp}/tokenfleet-pg.last.<uid>). The server binaries are Debian's
# (postgresql-NN under /usr/lib/postgresql; scripts/setup.sh installs them), or those in
# $PG_BIN. initdb and postgres refuse to run as root: as root they run as the `postgres` user.
set -euo pipefail

LAST="${TMPDIR:-/tmp}/tokenfleet-pg.last.$(id -u)"

die() {
  echo "pg.sh: $*" >&2
  exit 1
}

bindir() {
  if [ -n "${PG_BIN:-}" ]; then
    echo "$PG_BIN"
    return
  fi
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] || die "no PostgreSQL server binaries (run scripts/setup.sh, or set PG_BIN)"
  echo "$dir"
}

# Runs a server binary as the user that owns the cluster.
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

cluster_dir() {
  local dir="${TOKENFLEET_PG_DIR:-}"
  if [ -z "$dir" ] && [ -f "$LAST" ]; then
    dir=$(cat "$LAST")
  fi
  echo "$dir"
}

start() {
  local bin dir port
  bin=$(bindir)
  dir=$(mktemp -d "${TMPDIR:-/tmp}/tokenfleet-pg.XXXXXX")
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$dir"
  fi
  # Reading what it logs needs no privilege; the data directory stays the owner's (0700).
  as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 \
    --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || {
    cat "$dir/initdb.log" >&2
    rm -rf "$dir"
    die "initdb failed"
  }
  # The port may be taken between choosing and binding it: try a few.
  local started=""
  for _ in 1 2 3 4 5; do
    port=$(free_port)
    if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200" >/dev/null; then
      started=1
      break
    fi
  done
  if [ -z "$started" ]; then
    tail -n 20 "$dir/server.log" >&2 || true
    rm -rf "$dir"
    die "the server did not start"
  fi
  echo "$port" >"$dir/port"
  echo "$dir" >"$LAST"
  echo "pg.sh: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port, cluster in $dir" >&2
  echo "export TOKENFLEET_PG_DIR=$dir"
  echo "export TOKENFLEET_TEST_PG_URL=$(url_of "$dir")"
}

url_of() {
  echo "postgresql://postgres@127.0.0.1:$(cat "$1/port")/postgres"
}

url() {
  local dir
  dir=$(cluster_dir)
  [ -n "$dir" ] && [ -f "$dir/port" ] || die "no cluster started (run: eval \"\$(scripts/pg.sh start)\")"
  url_of "$dir"
}

stop() {
  local dir bin
  dir=$(cluster_dir)
  if [ -z "$dir" ] || [ ! -d "$dir" ]; then
    echo "pg.sh: no cluster to stop" >&2
    rm -f "$LAST"
    return 0
  fi
  bin=$(bindir)
  if [ -f "$dir/data/postmaster.pid" ]; then
    as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null ||
      as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w -t 30 stop >/dev/null || true
  fi
  rm -rf "$dir"
  if [ -f "$LAST" ] && [ "$(cat "$LAST")" = "$dir" ]; then
    rm -f "$LAST"
  fi
  echo "pg.sh: stopped, $dir removed" >&2
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  url) url ;;
  *) die "usage: scripts/pg.sh start|stop|url" ;;
esac
