#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite (slow tests on the real SmolLM2-135M included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest "$@"
