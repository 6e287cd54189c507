#!/usr/bin/env bash
# Train a small REMI model on the built-in synthetic data, export it as a bundle, serve it and
# show one request. The service keeps running afterwards (Ctrl-C stops it) unless
# REMI_QUICKSTART_EXIT=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
PORT="${PORT:-8000}"
RUN_DIR="${RUN_DIR:-runs/demo}"
BUNDLES="${REMI_BUNDLE_ROOT:-artifacts/bundles}"

echo "== training on synthetic data (configs/demo.yaml) =="
rm -rf "$RUN_DIR"
remi-train train --config configs/demo.yaml --run-dir "$RUN_DIR" --no-progress
echo "== exporting a bundle to $BUNDLES =="
remi-train export --config configs/demo.yaml --run-dir "$RUN_DIR" --bundle-root "$BUNDLES"

REDIS_PID=""
if command -v redis-server >/dev/null && ! redis-cli -p 6379 ping >/dev/null 2>&1; then
    redis-server --port 6379 --save "" --appendonly no --daemonize no >/dev/null &
    REDIS_PID=$!
fi
echo "== serving on http://127.0.0.1:$PORT =="
REMI_BUNDLE_ROOT="$BUNDLES" remi-serve --host 127.0.0.1 --port "$PORT" &
SERVER_PID=$!
trap 'kill $SERVER_PID ${REDIS_PID} 2>/dev/null || true' EXIT
ready=0
for _ in $(seq 1 120); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        # Its own message (e.g. "cannot listen on ...: Address already in use") is just above.
        echo "error: remi-serve stopped before it was ready (PORT=$PORT picks another port)" >&2
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
wait $SERVER_PID
