#!/usr/bin/env bash
# Builds llama.cpp's own `llama-bench` and `llama-server`: the reference that
# `tokenfleet bench engine` / `tokenfleet bench e2e` compare our engine against.
#
# Why the PyPI sdist: the llama-cpp-sys-2 crate ships llama.cpp without tools/, and only the
# package registries are reachable, so the full llama.cpp tree comes from the sdist of
# `llama-cpp-python` (vendor/llama.cpp). The pinned version is the one whose vendored tree is
# closest to llama-cpp-sys-2 0.1.161's (see LLAMA_REF_VERSION below).
#
# Usage:   scripts/llama-ref.sh [CACHE_DIR]
#   CACHE_DIR          default ${TOKENFLEET_CACHE:-$HOME/.cache/tokenfleet}
#   LLAMA_REF_VERSION  llama-cpp-python version to build (default 0.3.36)
#   LLAMA_REF_JOBS     parallel build jobs (default 2)
#
# Output:  $CACHE_DIR/llama-ref-$VERSION/bin/{llama-bench,llama-server} and
#          $CACHE_DIR/llama-ref-$VERSION/VERSION (key=value lines). The last line on stdout
#          is the bin directory; everything else (pip, cmake, compiler) goes to stderr.
#
# Idempotent: if both binaries and VERSION exist it only prints the bin directory. A lock
# file serialises concurrent runs on the same cache directory.
#
# Needs: a fresh Debian 12 after `apt-get install -y cmake g++` is enough. Missing cmake,
# g++, make or python3-pip are installed with apt-get when running as root. Network: PyPI only
# (the UI download from Hugging Face and OpenSSL/curl are switched off).
#
# Flags mirror llama-cpp-sys-2's defaults: GGML_NATIVE=OFF (so AVX2/FMA/F16C, no AVX-512),
# OpenMP on, Release, static libraries (the copied binaries must not depend on the build dir).
set -euo pipefail

VERSION="${LLAMA_REF_VERSION:-0.3.36}"
CACHE="${1:-${TOKENFLEET_CACHE:-$HOME/.cache/tokenfleet}}"
JOBS="${LLAMA_REF_JOBS:-2}"
ROOT="$CACHE/llama-ref-$VERSION"
BIN="$ROOT/bin"

# stdout is reserved for the final bin-directory line; route all tool output to stderr.
exec 3>&1 1>&2

log() { echo "llama-ref: $*" >&2; }
die() { echo "llama-ref: error: $*" >&2; exit 1; }

is_built() {
    [[ -x "$BIN/llama-bench" && -x "$BIN/llama-server" && -s "$ROOT/VERSION" ]]
}

if is_built; then
    echo "$BIN" >&3
    exit 0
fi

mkdir -p "$ROOT" || die "cannot create $ROOT"
exec 9>"$ROOT/.lock"
flock 9 || die "cannot lock $ROOT/.lock"
# Another run may have finished the build while we waited for the lock.
if is_built; then
    echo "$BIN" >&3
    exit 0
fi

# --- prerequisites --------------------------------------------------------------------------
need_apt=()
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
command -v make >/dev/null 2>&1 || need_apt+=(make)
PY=""
for cand in python3 /usr/bin/python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -m pip --version >/dev/null 2>&1; then
        PY="$cand"
        break
    fi
done
[[ -n "$PY" ]] || need_apt+=(python3-pip)
if ((${#need_apt[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing ${need_apt[*]} with apt-get"
        apt-get update -q || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}" \
            || die "apt-get install ${need_apt[*]} failed"
        [[ -n "$PY" ]] || PY=python3
    else
        die "missing ${need_apt[*]}; install them (Debian: apt-get install -y ${need_apt[*]})"
    fi
fi

# --- download and unpack the sdist ----------------------------------------------------------
DL="$ROOT/dl"
mkdir -p "$DL"
find_sdist() {
    find "$DL" -maxdepth 1 -type f \( -name "llama_cpp_python-$VERSION.tar.gz" \
        -o -name "llama-cpp-python-$VERSION.tar.gz" \) | head -n 1
}
SDIST="$(find_sdist)"
if [[ -z "$SDIST" ]]; then
    log "downloading llama-cpp-python==$VERSION sdist from PyPI"
    # PIP_BREAK_SYSTEM_PACKAGES: harmless for `download`, avoids PEP 668 refusals on Debian pip.
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip download --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$DL" \
        || die "pip download llama-cpp-python==$VERSION failed"
    SDIST="$(find_sdist)"
    [[ -n "$SDIST" ]] || die "pip download left no llama-cpp-python-$VERSION sdist in $DL"
fi

SRC_PARENT="$ROOT/src"
if [[ ! -f "$SRC_PARENT/.unpacked" ]]; then
    log "unpacking $SDIST"
    rm -rf "$SRC_PARENT"
    mkdir -p "$SRC_PARENT"
    tar -xzf "$SDIST" -C "$SRC_PARENT" || die "tar -xzf $SDIST failed"
    touch "$SRC_PARENT/.unpacked"
fi
PKG_DIR="$(find "$SRC_PARENT" -mindepth 1 -maxdepth 1 -type d | head -n 1)"
LLAMA_SRC="$PKG_DIR/vendor/llama.cpp"
[[ -f "$LLAMA_SRC/CMakeLists.txt" ]] || die "no vendor/llama.cpp in $SDIST"
[[ -d "$LLAMA_SRC/tools/llama-bench" && -d "$LLAMA_SRC/tools/server" ]] \
    || die "$SDIST has no tools/llama-bench or tools/server (too old a llama-cpp-python?)"

# --- build identifiers ----------------------------------------------------------------------
# The sdist carries no .git, so llama.cpp's own build-info would say "unknown". The package's
# CHANGELOG names the upstream commit in the section of this version
# ("update llama.cpp to ggml-org/llama.cpp@<hash>"), the first such line being the newest.
BUILD_COMMIT="unknown"
if [[ -f "$PKG_DIR/CHANGELOG.md" ]]; then
    BUILD_COMMIT="$(awk -v ver="$VERSION" '
        /^## \[/ { insec = ($0 ~ "^## \\[" ver "\\]") ; next }
        insec && match($0, /llama\.cpp@[0-9a-f]+/) { print substr($0, RSTART + 10, RLENGTH - 10); exit }
    ' "$PKG_DIR/CHANGELOG.md")"
    [[ -n "$BUILD_COMMIT" ]] || BUILD_COMMIT="unknown"
fi
cmake_version_var() {  # $1 = file, $2 = prefix (LLAMA / GGML)
    local f="$1" p="$2" maj min pat
    maj="$(sed -n "s/^set(${p}_VERSION_MAJOR \([0-9]*\))/\1/p" "$f" | head -n 1)"
    min="$(sed -n "s/^set(${p}_VERSION_MINOR \([0-9]*\))/\1/p" "$f" | head -n 1)"
    pat="$(sed -n "s/^set(${p}_VERSION_PATCH \([0-9]*\))/\1/p" "$f" | head -n 1)"
    [[ -n "$maj" ]] && echo "$maj.$min.$pat" || echo "unknown"
}
LLAMA_VERSION="$(cmake_version_var "$LLAMA_SRC/CMakeLists.txt" LLAMA)"
GGML_VERSION="$(cmake_version_var "$LLAMA_SRC/ggml/CMakeLists.txt" GGML)"
log "llama-cpp-python $VERSION: llama.cpp $BUILD_COMMIT (llama $LLAMA_VERSION, ggml $GGML_VERSION)"

# --- configure and build only the two targets -----------------------------------------------
BUILD="$ROOT/build"
start=$(date +%s)
# LLAMA_BUILD_NUMBER/COMMIT are given explicitly so that build-info never asks git (a cache dir
# inside some other repository would otherwise yield that repository's commit).
cmake -S "$LLAMA_SRC" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_NUMBER=0 \
    -DLLAMA_BUILD_COMMIT="$BUILD_COMMIT" \
    || die "cmake configure of $LLAMA_SRC failed"
cmake --build "$BUILD" --config Release -j "$JOBS" --target llama-bench llama-server \
    || die "cmake --build (targets llama-bench llama-server) failed"
elapsed=$(( $(date +%s) - start ))
log "built in ${elapsed}s"

# --- install ----------------------------------------------------------------------------------
mkdir -p "$BIN"
for t in llama-bench llama-server; do
    src="$(find "$BUILD" -type f -name "$t" -perm -u+x | head -n 1)"
    [[ -n "$src" ]] || die "build finished but no $t binary under $BUILD"
    cp "$src" "$BIN/.$t.tmp" && mv -f "$BIN/.$t.tmp" "$BIN/$t" || die "cannot install $t into $BIN"
done
# VERSION is written last: its presence marks a complete install (see is_built).
cat >"$ROOT/VERSION.tmp" <<EOF
llama_cpp_python=$VERSION
llama_cpp_build=$BUILD_COMMIT
llama_cpp_version=$LLAMA_VERSION
ggml_version=$GGML_VERSION
build_seconds=$elapsed
EOF
mv -f "$ROOT/VERSION.tmp" "$ROOT/VERSION"

echo "$BIN" >&3
