#!/usr/bin/env bash
# Create .venv with everything needed to train, serve and test (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
MIN_PYTHON="3.11"
new_enough() {
    "$1" -c "import sys; sys.exit(sys.version_info < (${MIN_PYTHON/./, }))" 2>/dev/null
}
# A venv made anew: none yet; one without pip (its creation was interrupted: Ctrl-C during
# ensurepip); one of an older Python (pip then fails to resolve the project, saying nothing of
# why); one moved or copied from another path (its scripts' #! lines and the editable install
# still name the old one: the commands fail, or run the other clone's code).
interpreter() {  # the Python a console script runs: its #! line, or pip's exec line below
    local first          # `#!/bin/sh` (pip's form for a path with a space, or a long one)
    first=$(head -n 1 "$1")
    if [ "$first" = "#!/bin/sh" ]; then
        sed -n '2s/^[^"]*"\([^"]*\)".*/\1/p' "$1"
    else
        echo "${first#\#!}"
    fi
}
moved() {  # its scripts run another directory's Python than this .venv's (a link to it is fine)
    local named
    [ -e .venv/bin/remi-train ] || return 1
    named=$(dirname "$(interpreter .venv/bin/remi-train)")
    [ "$(cd "$named" 2>/dev/null && pwd -P)" != "$(cd .venv/bin && pwd -P)" ]
}
if [ ! -x .venv/bin/python ] || [ ! -x .venv/bin/pip ] || ! new_enough .venv/bin/python || moved
then
    if [ -L .venv ]; then  # `venv --clear` would empty the environment it links to
        echo "error: .venv links to $(readlink .venv), which is no usable environment for" >&2
        echo "  this checkout: remove the link (or repair that environment) and run again." >&2
        exit 1
    fi
    if ! new_enough "$PYTHON"; then
        echo "error: $PYTHON is not Python $MIN_PYTHON or newer: set PYTHON to one that is" >&2
        exit 1
    fi
    if ! "$PYTHON" -c "import ensurepip" 2>/dev/null; then
        echo "error: $PYTHON cannot make a virtual environment with pip (no ensurepip): install" >&2
        echo "  python3-venv (Debian/Ubuntu: apt-get install -y python3-venv), or set PYTHON." >&2
        exit 1
    fi
    "$PYTHON" -m venv --clear .venv
fi
# Local package mirrors that lack a package make pip print one warning per package; hide those.
quiet_pip() {
    .venv/bin/pip install --quiet "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}
# The project itself counts only as installed (its metadata and entry points): run from the
# repository root, `import training` would find the source tree anyway.
if ! .venv/bin/python -c "import torch, faiss, fastapi, hiredis, matplotlib, orjson, schemathesis
import pytest, ruff, importlib.metadata; importlib.metadata.distribution('remi-retrieval')" \
    2>/dev/null || [ ! -x .venv/bin/remi-train ] || [ ! -x .venv/bin/remi-serve ] \
    || [ ! -x .venv/bin/ruff ]
then
    if [ -L .venv ]; then  # another checkout's environment: not ours to install into
        echo "error: .venv links to $(readlink .venv), which lacks what this checkout needs:" >&2
        echo "  run scripts/setup.sh in that checkout, or remove the link and run again." >&2
        exit 1
    fi
    # Exact versions from docker/constraints.txt (the images use the same file; regenerate it
    # with scripts/lock.sh). torch first, alone: TORCH_INDEX_URL=https://download.pytorch.org/
    # whl/cpu selects the CPU-only build; its dependencies come from PyPI with the rest.
    quiet_pip -c docker/constraints.txt --no-deps torch \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    quiet_pip -c docker/constraints.txt -e ".[dev]"
fi
