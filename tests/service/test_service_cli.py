"""The `remi-serve` entry point, run as docker runs it: a real uvicorn in a subprocess."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import faiss
import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from remi_core.bundle import current_version, resolve_current, sha256_of
from service.cli import app
from tests.helpers import (
    RedisServer,
    child_env,
    free_port,
    remi_serve,
    serve_command,
    write_tiny_bundle,
)


@pytest.mark.integration
def test_remi_serve_answers_over_http(
    tiny_bundle_root: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    with remi_serve(
        ["--bundle-root", str(tiny_bundle_root), "--log-level", "info"],
        tmp_path / "serve.log",
        child_env(REMI_REDIS_URL=redis_server.url, REMI_BUNDLE_ROOT="/flag/overrides/this"),
        cwd=tmp_path,
    ) as served:
        base = served.base
        r = httpx.post(f"{base}/recommend", json={"history": ["books-0001", "books-0002"], "n": 5})
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == current_version(tiny_bundle_root)
        assert len(r.json()["items"]) == 5
        r = httpx.post(
            f"{base}/events",
            json={"events": [{"user_id": "u", "item_id": "books-0003", "timestamp": 1e9}]},
        )
        assert r.status_code == 200, r.text
        assert httpx.post(f"{base}/recommend", json={"user_id": "u"}).status_code == 200
        assert httpx.get(f"{base}/readyz").json()["redis"]["ok"] is True
        # Health checks may use HEAD: the GET's status and headers, no body, and the connection
        # stays usable (a body sent anyway would be read as the next response).
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
        for path in ("/healthz", "/readyz", "/metrics", "/v1/model"):
            conn.request("HEAD", path)
            head = conn.getresponse()
            assert (head.status, head.read()) == (200, b""), path
            assert int(head.headers["content-length"]) > 0, path
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b'{"status":"ok"}'
        conn.close()
    assert "serving bundle" in served.log()  # the service's own logs reach uvicorn's output


@pytest.mark.integration
def test_a_client_that_stalls_mid_body_gets_408_and_its_connection_closed(
    tiny_bundle_root: Path, tmp_path: Path
) -> None:
    # uvicorn has no read timeout: a stalled client held its connection (a file descriptor)
    # for good, and enough of them left the worker refusing everyone.
    env = child_env(REMI_REDIS_URL="redis://127.0.0.1:1/0", REMI_BODY_TIMEOUT_S="1")
    args = ["--bundle-root", str(tiny_bundle_root)]
    with remi_serve(args, tmp_path / "serve.log", env) as served:
        port = served.port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
            stalled.sendall(
                b"POST /recommend HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n" + b'{"history": ['
            )
            sent_at = time.monotonic()
            answer = b"".join(iter(lambda: stalled.recv(65536), b""))  # until the server closes
            took = time.monotonic() - sent_at
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"no more of the request body arrived for 1 s" in answer
        assert b"13 bytes received" in answer and 0.9 < took < 5, (answer, took)
        # A slow upload that keeps sending is not cut off (the deadline is per part).
        body = b'{"history": ["books-0001", "books-0002"], "n": 3}'
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(
                b"POST /recommend HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
            )
            for start in range(0, len(body), 10):  # 1.25 s in all, past the 1 s per part
                time.sleep(0.25)
                slow.sendall(body[start : start + 10])
            answer = b"".join(iter(lambda: slow.recv(65536), b""))
        assert answer.startswith(b"HTTP/1.1 200"), answer


@pytest.mark.integration
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_ends_remi_serve_despite_a_client_still_sending(
    tiny_bundle_root: Path, tmp_path: Path, workers: int
) -> None:
    # A client that sent half its body and stalls held the shutdown forever (uvicorn waits for
    # every connection unless told how long, REMI_GRACEFUL_SHUTDOWN_S).
    args = ["--bundle-root", str(tiny_bundle_root)]
    env = child_env(REMI_REDIS_URL="redis://127.0.0.1:1/0", REMI_GRACEFUL_SHUTDOWN_S="1")
    # Every worker up (the helper waits for each): one still loading its bundle when SIGTERM
    # comes would be a different shutdown from the one tested here.
    with (
        remi_serve(args, tmp_path / "serve.log", env, workers=workers) as served,
        socket.create_connection(("127.0.0.1", served.port), timeout=10) as stalled,
    ):
        stalled.sendall(
            b"POST /recommend HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"history": ['
        )
        time.sleep(0.3)
        sent_at = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        served.proc.wait(20)
        took = time.monotonic() - sent_at
        answer = b"".join(iter(lambda: stalled.recv(65536), b""))
    text = served.log()
    assert took < 10, text
    assert "Application shutdown complete" in text  # the app's own shutdown ran
    assert "Traceback" not in text
    # The stalled client learns why: a 503, not uvicorn's 500 for a cancelled request.
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"shutting down" in answer and b"retry-after: 1" in answer.lower()


@pytest.mark.integration
def test_events_cut_off_by_the_shutdown_with_their_script_sent_are_not_called_unsent(
    tiny_bundle_root: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    # The script was on Redis, its reply not yet back, when the graceful shutdown's deadline
    # cancelled the request: the 503 said "send the request again", and a retry stores twice.
    env = child_env(
        REMI_REDIS_URL=redis_server.url, REMI_REDIS_TIMEOUT_S="20", REMI_GRACEFUL_SHUTDOWN_S="1"
    )
    body = json.dumps(
        {"events": [{"user_id": "amy", "item_id": "books-0001", "timestamp": 1764000000}]}
    ).encode()
    with remi_serve(
        ["--bundle-root", str(tiny_bundle_root)], tmp_path / "serve.log", env
    ) as served:
        redis = redis_server.client()
        redis.execute_command("CLIENT", "PAUSE", "4000", "WRITE")  # TIME answers, EVALSHA waits
        with socket.create_connection(("127.0.0.1", served.port), timeout=15) as client:
            client.sendall(
                b"POST /events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            time.sleep(0.5)
            served.proc.send_signal(signal.SIGTERM)
            answer = b"".join(iter(lambda: client.recv(65536), b""))
        served.proc.wait(20)
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"shutting down; the events may or may not have been stored" in answer, answer


@pytest.mark.integration
def test_remi_serve_refuses_a_corrupt_bundle(tiny_bundle_root: Path) -> None:
    (resolve_current(tiny_bundle_root) / "item_ids.json").write_text('[null, "oops"]')
    result = subprocess.run(
        serve_command("--port", str(free_port()), "--bundle-root", str(tiny_bundle_root)),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot start: no usable bundle" in result.stderr
    assert "checksum mismatch" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
@pytest.mark.parametrize("workers", [1, 2])
def test_remi_serve_fails_when_its_workers_fail_to_start(
    tiny_bundle_root: Path, workers: int
) -> None:
    # With --no-check the workers find out. Under --workers 2 uvicorn's supervisor stopped
    # them all and remi-serve exited 0, which a restart policy (`on-failure`) takes for a stop.
    (resolve_current(tiny_bundle_root) / "item_ids.json").write_text('[null, "oops"]')
    args = ["--port", str(free_port()), "--bundle-root", str(tiny_bundle_root), "--no-check"]
    result = subprocess.run(
        serve_command(*args, "--workers", str(workers)),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert "cannot start: no usable bundle" in result.stderr
    if workers > 1:
        assert "error: a worker failed to start, so all were stopped" in result.stderr


@pytest.mark.integration
def test_remi_serve_starts_on_an_older_version_when_current_is_corrupt(
    tiny_bundle_root: Path, tmp_path: Path
) -> None:
    # A restarted container with a damaged `current`: its check (and then its worker) fall
    # back to the older published version instead of refusing to start.
    older = current_version(tiny_bundle_root)
    bad = write_tiny_bundle(tiny_bundle_root, seed=2)
    (bad / "item_ids.json").write_text('[null, "oops"]')
    env = child_env(REMI_REDIS_URL="redis://127.0.0.1:1/0")
    args = ["--bundle-root", str(tiny_bundle_root)]
    with remi_serve(args, tmp_path / "serve.log", env) as served:
        ready = httpx.get(f"{served.base}/readyz").json()
        assert ready["model_version"] == older and ready["reload"]["rejected_target"] == bad.name
    text = served.log()
    assert f"workers start on {older}, an older published version" in text
    assert "checksum mismatch" in text and "Traceback" not in text


def test_remi_serve_checks_the_bundle_with_the_search_its_workers_use(
    tiny_bundle_root: Path,
) -> None:
    # A Faiss index of the right shape whose vectors are NaN: the torch searches never read it,
    # so a check that ignored REMI_EXACT_SEARCH passed, and then every worker failed to start.
    version = resolve_current(tiny_bundle_root)
    embeddings = np.load(version / "item_embeddings.npy")
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(np.full_like(embeddings[1:], np.nan))
    faiss.write_index(index, str(version / "index.faiss"))
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["files"]["index"]["sha256"] = sha256_of(version / "index.faiss")
    (version / "manifest.json").write_text(json.dumps(manifest))
    env = {"REMI_EXACT_SEARCH": "faiss", "REMI_REDIS_URL": "redis://127.0.0.1:1/0"}
    args = ["--bundle-root", str(tiny_bundle_root), "--port", "0"]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 1, result.output
    assert "cannot start: no usable bundle" in result.output and "finite" in result.output


def test_remi_serve_help_lists_the_options() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--host", "--port", "--workers", "--bundle-root", "--log-level"):
        assert option in result.output


@pytest.mark.parametrize("bad", [["--port", "70000"], ["--workers", "0"]])
def test_remi_serve_rejects_bad_options(bad: list[str]) -> None:
    result = CliRunner().invoke(app, bad)
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--host", "999.1.1.1"], {}, "--host 999.1.1.1: no such address"),
        # --check loads on the CPU, so a bad device failed in every worker, blamed on the bundle.
        ([], {"REMI_DEVICE": "bogus"}, "'bogus' is not a torch device"),
        ([], {"REMI_DEVICE": "meta"}, "'meta': the service runs on cpu or cuda[:N]"),
        ([], {"REMI_DEVICE": "cuda:7"}, "'cuda:7': this host has"),
        (["--workers", "2"], {"PROMETHEUS_MULTIPROC_DIR": "FILE"}, "is not a usable directory"),
        # A directory no file can be written to (even by root): the workers failed in
        # create_app, and uvicorn's supervisor restarted them for ever.
        (["--workers", "2"], {"PROMETHEUS_MULTIPROC_DIR": "/sys/kernel"}, "not a usable"),
    ],
)
def test_remi_serve_names_a_bad_address_device_or_metrics_directory(
    tmp_path: Path, args: list[str], env: dict[str, str], says: str
) -> None:
    if env.get("REMI_DEVICE") == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this host has a cuda:7")
    (tmp_path / "a-file").write_text("")
    env = {k: v.replace("FILE", str(tmp_path / "a-file")) for k, v in env.items()}
    args = [*args, "--bundle-root", str(tmp_path), "--no-check", "--port", "0"]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output
