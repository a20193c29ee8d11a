#!/usr/bin/env bash
# Runs every libFuzzer target in fuzz/ for a bounded time: scripts/fuzz.sh [seconds-per-target]
# (default 60). Installs cargo-fuzz when it is missing. Not run in CI.
#
# The toolchain is stable (rust-toolchain.toml); cargo fuzz passes nightly -Z flags, which
# RUSTC_BOOTSTRAP=1 allows. AddressSanitizer is off (--sanitizer none): the code under test is
# safe Rust, where libFuzzer's coverage guidance and the targets' panics and assertions find
# what there is to find, and the build is faster without it. FUZZ_SANITIZER=address turns it
# back on. cargo fuzz builds release without debug assertions (no integer overflow checks).
#
# FUZZ_SKIP_TOKEN_CAP=1 turns off node_messages' max_tokens invariant (it found hole 5 of
# issue 13 before on_chunk capped chunks; the regression test is
# issue_13_a_node_cannot_send_more_tokens_than_max_tokens in coordinator's manager/harness.rs).
#
# The build, the corpus earlier runs found and the logs go to fuzz/target (git-ignored), or to
# FUZZ_TARGET_DIR when set (an absolute path, e.g. outside the checkout: the build is a few GB).
#
# Each target starts from its committed seeds (fuzz/corpus/<target>/, read only) plus what
# earlier runs found (<target dir>/corpus/<target>/). A crash stops that target,
# is saved under fuzz/artifacts/<target>/, and makes the script exit non-zero after the other
# targets ran; reproduce it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none [--target-dir DIR] <target> fuzz/artifacts/<target>/<file>
# Set FUZZ_TARGETS="openai_request vss_value" to run only some.
set -euo pipefail

SECONDS_PER_TARGET="${1:-60}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT/fuzz"
export RUSTC_BOOTSTRAP=1
# The fuzz build uses its own flags, so it gets its own target dir, never a shared one that a
# developer's environment points at.
unset CARGO_TARGET_DIR
TARGET_DIR="${FUZZ_TARGET_DIR:-$ROOT/fuzz/target}"
SANITIZER="${FUZZ_SANITIZER:-none}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz ..." >&2
  cargo install cargo-fuzz --locked
fi

TARGETS="${FUZZ_TARGETS:-$(cargo fuzz list)}"
cargo fuzz build --sanitizer "$SANITIZER" --target-dir "$TARGET_DIR" >&2

failed=()
for t in $TARGETS; do
  mkdir -p "$TARGET_DIR/corpus/$t" "artifacts/$t"
  log="$TARGET_DIR/fuzz-$t.log"
  echo "== $t: ${SECONDS_PER_TARGET}s" >&2
  if cargo fuzz run --sanitizer "$SANITIZER" --target-dir "$TARGET_DIR" "$t" \
      "$TARGET_DIR/corpus/$t" "corpus/$t" -- \
      -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 >"$log" 2>&1; then
    status=ok
  else
    status=CRASH
    failed+=("$t")
  fi
  execs=$(grep -m1 '^stat::number_of_executed_units' "$log" | awk '{print $2}')
  echo "$t: $status, ${SECONDS_PER_TARGET}s, ${execs:-?} execs, corpus $(ls "$TARGET_DIR/corpus/$t" | wc -l) inputs (log: $log)"
  if [ "$status" = CRASH ]; then
    grep -m1 -A3 'panicked at\|ERROR: libFuzzer\|SUMMARY' "$log" >&2 || true
    ls -t "artifacts/$t" | head -1 | sed "s|^|  input: fuzz/artifacts/$t/|" >&2
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "crashes in: ${failed[*]}" >&2
  exit 1
fi
