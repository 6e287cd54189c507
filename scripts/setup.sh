#!/usr/bin/env bash
# Create .venv with everything needed to train, serve and test (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# Local package mirrors that lack a package make pip print one warning per package; hide those.
quiet_pip() {
    .venv/bin/pip install --quiet "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}
if ! .venv/bin/python -c "import torch, faiss, fastapi, matplotlib, training, service" 2>/dev/null
then
    # The CPU build of torch; pinning it keeps pip from pulling a multi-GB CUDA build.
    quiet_pip "torch==${TORCH_VERSION:-2.13.0}"
    quiet_pip -e ".[dev]"
fi
