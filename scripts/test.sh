#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite (slow tests on the real SmolLM2-135M included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The report's browser test opens the HTML in Debian's headless Chromium; install it where we can (root + apt).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
    || echo "could not install chromium: the browser test will be skipped"
fi
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest "$@"
