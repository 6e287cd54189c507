#!/usr/bin/env bash
# Create .venv with everything needed to train, serve and test (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, faiss, fastapi, training, service" 2>/dev/null; then
    .venv/bin/pip install --quiet --upgrade pip
    # The CPU build of torch; pinning it keeps pip from pulling a multi-GB CUDA build.
    .venv/bin/pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
    .venv/bin/pip install --quiet -e ".[dev]"
fi
