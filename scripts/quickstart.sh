#!/usr/bin/env bash
# Train a small REMI model on the built-in synthetic data, export it as a bundle, serve it and
# show one request. The service keeps running afterwards (Ctrl-C stops it) unless
# REMI_QUICKSTART_EXIT=1. PORT picks the service's port (8000).
#
# Its run and bundles are always runs/demo and artifacts/bundles in this checkout, and the
# REMI_* settings of the calling shell (a real bundle root, a Redis URL, workers) are not
# used, but for REMI_THREADS: the demo must never publish into, or delete, someone's data.
set -euo pipefail
cd "$(dirname "$0")/.."
for name in $(compgen -e); do
    case "$name" in REMI_THREADS | REMI_QUICKSTART_EXIT) ;; REMI_*) unset "$name" ;; esac
done
# Everything it talks to is on this host, whatever proxy the shell has.
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}" no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"
PORT="${PORT:-8000}"
RUN_DIR=runs/demo
BUNDLES=artifacts/bundles

# Training and export run in the background and are waited for, so that SIGTERM or Ctrl-C
# stops them at once (bash runs a trap only after a foreground command ends).
CHILD="" SERVER_PID="" REDIS_PID=""
cleanup() {
    local pids="$CHILD $SERVER_PID $REDIS_PID"
    [ -n "${pids// /}" ] || return 0
    # shellcheck disable=SC2086  # the PIDs, as words
    kill $pids 2>/dev/null || true
    # shellcheck disable=SC2086
    wait $pids 2>/dev/null || true  # the port is free when this script has ended
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
step() {
    "$@" &
    CHILD=$!
    wait "$CHILD"
    CHILD=""
}

case "$PORT" in
    '' | *[!0-9]*)
        echo "error: PORT must be a TCP port number, not '$PORT'" >&2
        exit 2
        ;;
esac
# In the foreground: Ctrl-C reaches pip itself (a background job's children ignore SIGINT).
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
if ! python -c "import socket; socket.create_server(('127.0.0.1', $PORT)).close()" 2>/dev/null; then
    echo "error: port $PORT is taken on 127.0.0.1: set PORT to a free one (PORT=8001 ...)" >&2
    exit 1
fi

echo "== training on synthetic data (configs/demo.yaml) =="
rm -rf "$RUN_DIR"
step remi-train train --config configs/demo.yaml --run-dir "$RUN_DIR" --no-progress
echo "== exporting a bundle to $BUNDLES =="
step remi-train export --config configs/demo.yaml --run-dir "$RUN_DIR" --bundle-root "$BUNDLES"

if command -v redis-server >/dev/null && ! redis-cli -p 6379 ping >/dev/null 2>&1; then
    redis-server --port 6379 --save "" --appendonly no --daemonize no >/dev/null &
    REDIS_PID=$!
fi
echo "== serving on http://127.0.0.1:$PORT =="
remi-serve --host 127.0.0.1 --port "$PORT" --workers 1 --bundle-root "$BUNDLES" &
SERVER_PID=$!
ready=0
for _ in $(seq 1 120); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        # Its own message (e.g. "cannot listen on ...: Address already in use") is just above.
        echo "error: remi-serve stopped before it was ready (on port $PORT; PORT picks another)" >&2
        exit 1
    fi
    # Ready, and ours: another server on the port (an earlier quickstart, the compose stack)
    # answers too, until ours finds the port taken and stops.
    if python -c "import httpx,sys; r = httpx.get('http://127.0.0.1:$PORT/readyz'); sys.exit(r.status_code != 200 or r.json()['worker_pid'] != $SERVER_PID)" 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.5
done
if [ "$ready" != 1 ]; then
    echo "error: remi-serve did not get ready on port $PORT (120 tries, 0.5 s apart)" >&2
    exit 1
fi

echo "== POST /recommend =="
python - "$PORT" <<'PY'
import json, sys, httpx
request = {"history": ["books-0003", "books-0010", "games-0050", "books-0001", "games-0049"],
           "n": 10}
print("request: ", json.dumps(request))
response = httpx.post(f"http://127.0.0.1:{sys.argv[1]}/recommend", json=request, timeout=10)
print("response:", json.dumps(response.json(), indent=2))
PY
if [ "${REMI_QUICKSTART_EXIT:-0}" = "1" ]; then
    exit 0
fi
echo "== the service is running on http://127.0.0.1:$PORT (Ctrl-C to stop) =="
wait "$SERVER_PID"
