#!/usr/bin/env bash
# The project's whole test suite, as CI runs it (.ci/run calls this script).
# 1. Rust: unit and integration tests of the whole workspace (the project and its PTX emulator) in
#    release mode (the CPU UNet is too slow unoptimised), with NVRTC from PyPI (scripts/nvrtc.sh).
# 2. Python: the weight converters and tools, in a light venv (numpy, safetensors, pytest; no
#    PyTorch, so the checks that need it report as skipped; run them with a venv that has torch:
#    .venv/bin/python -m pytest tests/golden weights/tests).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/nvrtc.sh
cargo test --release --workspace

venv=target/pytest-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r weights/requirements.txt
fi
"$venv/bin/python" -m pytest -q tests/golden weights/tests
