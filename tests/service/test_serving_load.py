"""A real `remi-serve` under the heaviest allowed requests: the event loop stays responsive, and
micro-batched answers over HTTP equal the unbatched ones."""

from __future__ import annotations

import gc
import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    child_env,
    dead_redis_url,
    remi_serve,
    same_response,
    tiny_item_ids,
    write_tiny_bundle,
)

pytestmark = pytest.mark.integration  # real servers in subprocesses
ITEMS = 5001  # enough for n=1000 after excluding a history
# Ids of 60 characters: 256 histories of 1000 of them nearly fill the default body limit
# (REMI_MAX_BODY_BYTES, 16 MiB), so the heavy test sends the largest body the service accepts.
ID_PREFIX = "catalogue-item-with-a-long-identifier-as-some-shops-use-"


@contextmanager
def serving(bundle_root: Path, log: Path, **env: str) -> Iterator[int]:
    """`remi-serve` in a subprocess; yields its port once it is ready."""
    settings = child_env(
        REMI_BUNDLE_ROOT=str(bundle_root),
        REMI_REDIS_URL=dead_redis_url(),  # histories come in the body
        REMI_RELOAD_INTERVAL_S="0",
        **env,
    )
    with remi_serve(["--log-level", "warning"], log, settings) as served:
        yield served.port


def request(port: int, method: str, path: str, body: bytes | None = None, conn=None):
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, body, headers)
    response = conn.getresponse()
    return response.status, response.read()


def random_entries(count: int, seed: int, n: int = 1000, length: int = 20) -> list[dict]:
    rng = np.random.default_rng(seed)
    ids = tiny_item_ids(ITEMS, ID_PREFIX)[1:]
    return [
        {"history": [ids[j] for j in rng.integers(0, len(ids), length)], "n": n}
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("load-bundle")
    write_tiny_bundle(root, num_items=ITEMS, dim=32, seq_len=20, id_prefix=ID_PREFIX)
    return root


# A client in its own process (so its GIL is not the measuring thread's): posts the body file
# to the route back to back, printing each status.
HEAVY_CLIENT = """
import http.client, sys
body = open(sys.argv[2], "rb").read()
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=60)
while True:
    conn.request("POST", sys.argv[3], body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    print(response.status, flush=True)
"""


def cpus_env(one_cpu: bool) -> dict[str, str]:
    """A worker with one CPU or two, set explicitly so the test means the same on any host; the
    loop's budget at its largest, which a one-CPU worker uses and a two-CPU one ignores."""
    return {"REMI_THREADS": "1" if one_cpu else "2", "REMI_BATCH_INLINE_MS": "15"}


def healthz_p99(port: int, conn: http.client.HTTPConnection) -> float:
    """The 99th percentile of 400 GET /healthz, 10 ms apart, in ms."""
    latencies = []
    for _ in range(400):
        start = time.perf_counter()
        status, _ = request(port, "GET", "/healthz", conn=conn)
        latencies.append(time.perf_counter() - start)
        assert status == 200
        time.sleep(0.01)
    return float(np.percentile(latencies, 99)) * 1e3


def metric(port: int, name: str) -> float:
    """The value of the unlabelled metric `name` in the server's GET /metrics."""
    _, text = request(port, "GET", "/metrics")
    return float(next(line for line in text.decode().splitlines()
                      if line.startswith(name + " ")).split()[1])  # fmt: skip


@pytest.mark.parametrize("one_cpu", [False, True], ids=["two-cpus", "one-cpu"])
def test_healthz_stays_fast_under_the_largest_batches(
    bundle_root: Path, tmp_path: Path, one_cpu: bool
) -> None:
    """Two clients send the heaviest legal batches back to back: 256 users (REMI_MAX_BATCH), each
    with a history of 1000 long ids (REMI_MAX_HISTORY; a body just under the 16 MiB limit, to
    decode and validate) and n=1000 (256,000 items per response); /healthz must keep answering
    within 20 ms at the 99th percentile. On a worker with one CPU a third client sends plain
    requests back to back, which the event loop computes itself (REMI_BATCH_INLINE_MS) between
    the heavy batches."""
    body = tmp_path / "batch.json"
    body.write_text(json.dumps({"requests": random_entries(256, seed=1, length=1000)}))
    assert 15 * 2**20 < body.stat().st_size <= 16 * 2**20
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(random_entries(1, seed=3, n=50)[0]))
    env = cpus_env(one_cpu)
    with serving(bundle_root, tmp_path / "serve.log", **env) as port:
        sends = [(body, "/recommend/batch")] * 2 + ([(plain, "/recommend")] if one_cpu else [])
        logs = [tmp_path / f"client{i}.log" for i in range(len(sends))]
        clients = [
            subprocess.Popen(
                [sys.executable, "-c", HEAVY_CLIENT, str(port), str(path), route],
                stdout=log.open("w"),
            )
            for log, (path, route) in zip(logs, sends, strict=True)
        ]
        try:
            time.sleep(1.5)  # the clients are sending
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            # Rounds of 400 samples (the 99th percentile is the 4th slowest of a round) until
            # one is under 20 ms, at most six: a loop that the batches block is slow in every
            # one, while a VM scheduling hiccup or a busy neighbour hits some (full-suite runs
            # measured 23 and 29 ms where runs of this test alone measured 7-12; under one busy
            # core, rounds of 23, 22, 21 then 15 ms). This process's own garbage collections
            # are not the server's latency, so they wait.
            rounds: list[float] = []
            gc.disable()
            try:
                while len(rounds) < 6 and not (rounds and min(rounds) < 20):
                    rounds.append(healthz_p99(port, conn))
            finally:
                gc.enable()
            on_loop = metric(port, "remi_loop_batches_total")
        finally:
            for client in clients:
                client.kill()
                client.wait()
    statuses = [log.read_text().split() for log in logs]
    assert len(statuses[0] + statuses[1]) >= 4, "the heavy requests did not run meanwhile"
    assert {status for sent in statuses for status in sent} == {"200"}, statuses
    assert min(rounds) < 20, f"/healthz p99 {rounds} ms under load (every round)"
    assert (on_loop > 0) is one_cpu, on_loop


@pytest.mark.parametrize("one_cpu", [False, True], ids=["two-cpus", "one-cpu"])
def test_batched_and_unbatched_servers_answer_the_same(
    bundle_root: Path, tmp_path: Path, one_cpu: bool
) -> None:
    """The same seeded requests, sent concurrently to a micro-batching server and one by one to
    a server with batching off, get the same answers; on a worker with one CPU, plain requests
    (no explain), two rounds of them, so that the loop computes the second itself. Batches hold
    at most 2 users: a user costs ~1 ms here (0.7-1.2 ms measured on an idle 2-core VM), and
    batches of 12 were expected at 10-14 ms against the loop's largest budget, 15 ms, so that a
    slower host sent every batch to the thread."""
    entries = random_entries(24, seed=2, n=30)
    for i, entry in enumerate(entries):
        entry["exclude_history"] = bool(i % 2)
        entry["explain"] = i % 4 == 0 and not one_cpu
    bodies = [json.dumps(e).encode() for e in entries]

    with serving(bundle_root, tmp_path / "off.log", REMI_BATCH_MAX_USERS="1") as port:
        alone = [json.loads(request(port, "POST", "/recommend", b)[1]) for b in bodies]

    env = cpus_env(one_cpu)
    batching = {"REMI_BATCH_WAIT_MS": "20", "REMI_BATCH_MAX_USERS": "2"}
    with serving(bundle_root, tmp_path / "on.log", **batching, **env) as port:
        together: list = [None] * len(bodies)

        def send(i: int) -> None:
            together[i] = json.loads(request(port, "POST", "/recommend", bodies[i])[1])

        half = len(bodies) // 2
        for wave in (range(half), range(half, len(bodies))):
            threads = [threading.Thread(target=send, args=(i,)) for i in wave]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        batches = metric(port, "remi_batch_users_count")
        assert (metric(port, "remi_loop_batches_total") > 0) is one_cpu
        # More than one CPU: the loop never computes, whatever REMI_BATCH_INLINE_MS says.
        model = json.loads(request(port, "GET", "/v1/model")[1])
        assert model["batch_inline_ms"] == (15 if one_cpu else 0)
    assert batches < len(bodies) + 1, "requests were not gathered"  # +1: the start-up smoke test
    for a, b in zip(alone, together, strict=True):
        assert same_response(a, b)
        assert len(a["items"]) == 30
