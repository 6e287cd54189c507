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
    # torch first and pinned, so the project install below does not pick another release.
    # TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu selects the CPU-only build.
    quiet_pip "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    quiet_pip -e ".[dev]"
fi
