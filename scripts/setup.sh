#!/usr/bin/env bash
# Installs what tokenfleet needs on a fresh Debian machine, idempotently:
# - Debian packages: cmake + g++ (llama.cpp is built from source by llama-cpp-sys-2),
#   libclang-dev (bindgen), protobuf-compiler (the tokenfleet.v1 gRPC contract), pkg-config;
# - libtss2-dev (TPM 2.0 attestation through tss-esapi; pulls in the swtpm TCTI) and swtpm
#   (a software TPM per agent for `tokenfleet up` and the attestation tests);
# - postgresql, when no PostgreSQL server binaries are installed: the store's PostgreSQL
#   tests run on a throwaway cluster that scripts/pg.sh makes with them (the package's own
#   cluster is not used);
# - the demo/test model (scripts/fetch-model.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(cmake g++ libclang-dev protobuf-compiler pkg-config python3-pip curl libtss2-dev swtpm)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Any version's server will do (scripts/pg.sh takes the newest), so look for the binaries
# rather than a versioned package.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >&2
fi

scripts/fetch-model.sh >/dev/null
