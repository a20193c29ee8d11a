"""Starts a real fleet for the OpenAI-client tests: `tokenfleet up` with two agents on the real
model, on free loopback ports, and stops it (by its own process id) afterwards."""

import os
import socket
import subprocess
import time
import urllib.request
import json

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# The binary `cargo build -p tokenfleet` made: TOKENFLEET_BIN, else under CARGO_TARGET_DIR as
# cargo puts it (scripts/test.sh builds it just before), else ./target.
BINARY = os.environ.get(
    "TOKENFLEET_BIN",
    os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"), "debug", "tokenfleet"),
)
API_KEY = "pytest-key-0123456789abcdef"
MODEL = "SmolLM2-135M-Instruct.Q4_1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def fleet(tmp_path_factory):
    port = free_port()
    db = tmp_path_factory.mktemp("fleet") / "jobs.db"
    log = open(tmp_path_factory.mktemp("logs") / "up.log", "w")
    proc = subprocess.Popen(
        [BINARY, "up", "--agents", "2", "--always-parked", "--http", f"127.0.0.1:{port}",
         "--api-key", API_KEY, "--db", str(db), "--slots", "4"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    try:
        while True:
            assert proc.poll() is None, f"tokenfleet up exited with {proc.returncode}"
            assert time.time() < deadline, "fleet did not come up within 120 s"
            try:
                req = urllib.request.Request(f"{base}/models", headers={"Authorization": f"Bearer {API_KEY}"})
                with urllib.request.urlopen(req, timeout=2) as resp:
                    if json.load(resp)["data"]:
                        break
            except OSError:
                pass
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
