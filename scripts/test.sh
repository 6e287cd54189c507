#!/usr/bin/env bash
# Set up .venv if needed, make sure redis-server is installed, lint, and run the whole suite.
# REMI_REQUIRE_REDIS=1 turns a Redis test's skip into a failure: here only GPU tests may skip
# (and those needing ../shared/data when it is absent).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
sh scripts/ensure-redis.sh
export REMI_REQUIRE_REDIS=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q "$@"
