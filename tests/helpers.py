"""Test helpers shared by several test modules (fixtures live in conftest.py, which imports
from here; nothing here imports a test module or conftest)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import yaml

from remi_core.bundle import Bundle, write_bundle
from remi_core.models import EncoderConfig, build_encoder, pad_histories

REPO = Path(__file__).resolve().parents[1]
TINY = {"num_items": 201, "dim": 16, "num_interests": 4, "seq_len": 10}


def tiny_item_ids(num_items: int = TINY["num_items"], prefix: str = "books-") -> list[str | None]:
    return [None] + [f"{prefix}{i:04d}" for i in range(1, num_items)]


def random_histories(count: int, seed: int = 0) -> list[list[str]]:
    """Seeded histories of the tiny catalogue's ids, with lengths around seq_len=10 (shorter,
    equal, longer) and repeats, as real histories have."""
    rng = np.random.default_rng(seed)
    ids = [i for i in tiny_item_ids() if i is not None]
    return [list(rng.choice(ids, size=int(rng.integers(1, 25)))) for _ in range(count)]


def write_tiny_bundle(
    root: Path,
    seed: int = 0,
    publish: bool = True,
    version: str | None = None,
    popularity_size: int = 50,
    index_factory: str = "Flat",
    search_params: str = "",
    categories: tuple[np.ndarray, list[str]] | None = None,
    id_prefix: str = "books-",
    **config: int,
) -> Path:
    """Write a bundle from a seeded random encoder; returns the version directory."""
    cfg = EncoderConfig(**{**TINY, **config})
    with torch.random.fork_rng():  # seeded without disturbing other tests' randomness
        torch.manual_seed(seed)
        encoder = build_encoder(cfg)
    rng = np.random.default_rng(seed)
    popularity = rng.permutation(np.arange(1, cfg.num_items))[:popularity_size]
    return write_bundle(
        root,
        encoder=encoder,
        item_ids=tiny_item_ids(cfg.num_items, id_prefix),
        popularity=popularity,
        metadata={"dataset": "tiny-test", "seed": seed},
        index_factory=index_factory,
        search_params=search_params,
        version=version,
        publish=publish,
        categories=categories,
    )


def dead_redis_url() -> str:
    """A Redis URL nothing listens on (for tests that must not need Redis)."""
    return f"redis://127.0.0.1:{free_port()}/0"


def encode(bundle: Bundle, history: list[str]) -> tuple[np.ndarray, list[int]]:
    """Interests (K, d) computed independently of the service, and all known rows."""
    row_of = bundle.row_of()
    rows = [row_of[item] for item in history if item in row_of]
    items, mask = pad_histories([rows[-bundle.config.seq_len :]], bundle.config.seq_len)
    with torch.inference_mode():
        interests, _ = bundle.encoder(items, mask)
    return interests[0].numpy(), rows


def assert_brute_force(
    bundle: Bundle, history: list[str], body: dict, n: int, exclude_history: bool
) -> None:
    """Every score is max_k <v_k, e_item>, and no item left out scores higher (Eq. 7, exact)."""
    interests, rows = encode(bundle, history)
    per_interest = bundle.item_embeddings @ interests.T  # (N, K)
    best = per_interest.max(axis=1)
    eligible = np.ones(len(best), dtype=bool)
    eligible[0] = False
    if exclude_history:
        eligible[rows] = False
    row_of = bundle.row_of()
    returned = [row_of[item["item_id"]] for item in body["items"]]
    assert len(returned) == len(set(returned)), "duplicate items"
    assert len(returned) == min(n, int(eligible.sum()))
    for item, row in zip(body["items"], returned, strict=True):
        assert eligible[row], f"{item['item_id']} should have been excluded"
        np.testing.assert_allclose(item["score"], best[row], rtol=1e-5, atol=1e-6)
        assert per_interest[row, item["interest"]] == best[row] or np.isclose(
            per_interest[row, item["interest"]], best[row], rtol=1e-5, atol=1e-6
        )
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)
    outside = eligible.copy()
    outside[returned] = False
    if outside.any() and returned:
        assert best[outside].max() <= min(scores) + 1e-6


def same_response(a: Any, b: Any) -> bool:
    """Deep equality that allows float noise: encoding a user inside a batch and alone may pick
    different matmul kernels, which round differently in the last bits."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-5, atol=1e-6))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_response(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_response(x, y) for x, y in zip(a, b, strict=True))
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        return same_response(dataclasses.asdict(a), dataclasses.asdict(b))
    return a == b


# --- Redis ---------------------------------------------------------------------------------------


def _find_redis_server() -> str | None:
    # REMI_TEST_REDIS_SERVER: another binary (a custom build), or a missing path for "absent".
    override = os.environ.get("REMI_TEST_REDIS_SERVER")
    if override is not None:
        return override if Path(override).is_file() else None
    found = shutil.which("redis-server")
    return found or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)


REDIS_SERVER = _find_redis_server()


# The OpenMP and BLAS settings this test process started with: the thread set-up run in process
# (create_app, the train command) writes its own into os.environ, and a subprocess started after
# it would run with them (OMP_WAIT_POLICY=PASSIVE for a training run, say).
_THREAD_PREFIXES = ("OMP_", "GOMP_", "MKL_", "OPENBLAS_")
_STARTING_THREAD_ENV = {k: v for k, v in os.environ.items() if k.startswith(_THREAD_PREFIXES)}


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess running this checkout: ours without any REMI_* setting
    (the test says which ones it wants) and with the thread settings this process started with,
    this checkout first on the import path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REMI_", *_THREAD_PREFIXES))}
    env.update(_STARTING_THREAD_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, **extra}


def serve_command(*args: str) -> list[str]:
    # `python -m service.cli` is what the `remi-serve` console script calls (service.cli:main).
    return [sys.executable, "-m", "service.cli", *args]


@dataclasses.dataclass
class ServeProcess:
    """A `remi-serve` running in a subprocess (see `remi_serve`)."""

    proc: subprocess.Popen
    port: int
    log_path: Path
    pids: set[int]  # its workers' pids, each having answered GET /readyz

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()


@contextlib.contextmanager
def remi_serve(
    args: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    workers: int = 1,
    cwd: Path | None = None,
) -> Iterator[ServeProcess]:
    """A real `remi-serve` (as docker runs it) on a free port, its output in `log_path`; yields
    once each of its `workers` is ready, and stops it on exit (a test may stop it first).
    `env`: the child's environment (default: `child_env()`)."""
    port = free_port()
    command = serve_command("--host", "127.0.0.1", "--port", str(port), *args)
    if workers != 1:
        command += ["--workers", str(workers)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            command, env=env or child_env(), stdout=log, stderr=subprocess.STDOUT, cwd=cwd
        )
    try:
        base = f"http://127.0.0.1:{port}"
        pids = answering_workers(base, workers, proc, log_path.read_text)
        yield ServeProcess(proc, port, log_path, pids)
    finally:
        stop_process(proc, 30)


def stop_process(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM, and SIGKILL if it has not exited within timeout_s (nothing if it already has)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def answering_workers(
    base: str, count: int, proc: subprocess.Popen, log: Callable[[], str], timeout_s: float = 120
) -> set[int]:
    """The pids of a real `remi-serve`'s workers once `count` of them have answered /readyz
    ready, a new connection per request so that the kernel may hand it to any of them. `log`
    gives the server's output for the failure message."""
    pids: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(pids) < count:
        assert proc.poll() is None, f"remi-serve exited:\n{log()}"
        assert time.monotonic() < deadline, f"saw ready workers {pids}:\n{log()}"
        try:
            with httpx.Client(timeout=5) as client:
                response = client.get(f"{base}/readyz")
            if response.status_code == 200:
                pids.add(response.json()["worker_pid"])
                continue
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    return pids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on a fixed port that can be stopped and started again, so tests
    can simulate an outage and the recovery after it. Nothing is persisted."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0, *extra: str, loading: bool = False) -> None:
        """Start it (with `extra` arguments); return once it answers PING, or once it answers
        at all when `loading` (a Redis still loading its dataset answers -LOADING)."""
        if self.running:
            return
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                *extra,
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        ready = (b"+PONG", b"-LOADING") if loading else (b"+PONG",)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(ready):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, 5)
        self.proc = None

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True)


# --- events ---------------------------------------------------------------------------------------

NEW_ITEM = "brand-new-item-1"


def new_item_events(users: int = 8, start: float | None = None) -> list[dict]:
    """Events that introduce NEW_ITEM: 2 clicks on it by each of `users` new users, so it passes
    the min_count (5) rule with room to spare, as do the users (6 events each)."""
    start = start or time.time()
    pattern = ["books-0001", "books-0002", NEW_ITEM, "books-0003", NEW_ITEM, "books-0004"]
    return [
        {"user_id": f"event-user-{u}", "item_id": item, "timestamp": start + u * 10 + k}
        for u in range(users)
        for k, item in enumerate(pattern)
    ]


# --- the compose stack ---------------------------------------------------------------------------

COMPOSE = REPO / "docker-compose.yml"
ENTRYPOINT = REPO / "docker" / "scheduler-entrypoint.sh"

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_]\w*)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, default = match.group(2), match.group(3) or ""
        if op in (":-", ":?"):
            if env.get(name):
                return env[name]
            if op == ":?":
                raise ValueError(f"required variable {name} is unset")
            return default
        if op in ("-", "?"):
            if name in env:
                return env[name]
            if op == "?":
                raise ValueError(f"required variable {name} is unset")
            return default
        return env.get(name, "")

    return _VAR.sub(substitute, value)


def load_compose(path: Path = COMPOSE, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file as compose would see it with `env` (default: no variables set)."""
    return interpolate(yaml.safe_load(path.read_text()), env or {})


def command_list(command: Any) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def render_crontab(env: dict[str, str]) -> str:
    """What the scheduler's entrypoint writes to /etc/cron.d (its --print mode)."""
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), "--print"],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def parse_crontab(text: str) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """(environment lines, [(schedule, user, command)]) of a /etc/cron.d file."""
    env, jobs = {}, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*\s*=", line):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
            continue
        if line.startswith("@"):
            schedule, user, command = line.split(None, 2)
        else:
            parts = line.split(None, 6)
            assert len(parts) == 7, f"cron line needs 5 fields, a user and a command: {line!r}"
            schedule, user, command = " ".join(parts[:5]), parts[5], parts[6]
        jobs.append((schedule, user, command))
    return env, jobs
