#!/bin/sh
# Make sure redis-server is installed for the test suite (the Redis tests start their own
# servers on free ports; none is left running). On Debian/Ubuntu it installs the
# `redis-server` package with apt-get, as root or through password-less sudo; otherwise it stops
# with a message saying what to install. Exit 0: redis-server is there.
set -eu
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
# The tests' documented override: another redis-server binary (tests/helpers.py).
if [ -n "${REMI_TEST_REDIS_SERVER:-}" ] && [ -x "$REMI_TEST_REDIS_SERVER" ]; then
    exit 0
fi
fail() {
    echo "error: redis-server is not installed, and $1." >&2
    echo "  The Redis tests need it: install Redis (Debian/Ubuntu: sudo apt-get install -y" >&2
    echo "  redis-server; macOS: brew install redis) and run the tests again." >&2
    exit 1
}
command -v apt-get >/dev/null 2>&1 || fail "this is not a Debian/Ubuntu system (no apt-get)"
if [ "$(id -u)" -eq 0 ]; then
    sudo=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo"
else
    fail "installing it needs root or password-less sudo"
fi
echo "redis-server is not installed: installing it with apt-get" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends redis-server
command -v redis-server >/dev/null 2>&1 || fail "apt-get did not provide it"
