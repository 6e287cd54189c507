"""The compose stack without Docker: docker-compose.yml's own commands and environments, run
natively in dependency order.

Only what a container would change is rewritten: host names (redis -> 127.0.0.1:<free port>),
named volumes (-> temporary directories), the image's paths (/app -> this checkout, /opt/venv/bin
-> where remi-train is installed here) and the API's port. The training config is chosen the way
a user would, through the REMI_TRAIN_CONFIG compose variable (the tiny test config), and the
nightly job is the command line of the crontab the scheduler renders, run with the environment
cron would give it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import (
    NEW_ITEM,
    REDIS_SERVER,
    REPO,
    command_list,
    free_port,
    load_compose,
    new_item_events,
    parse_crontab,
    render_crontab,
    stop_process,
)

# The console scripts of the environment running the tests (e.g. .venv/bin, which CI does not
# put on PATH): the stand-in for the images' /opt/venv/bin.
SCRIPTS = Path(sys.executable).parent
if not (SCRIPTS / "remi-train").exists() and shutil.which("remi-train"):
    SCRIPTS = Path(shutil.which("remi-train")).parent
COMPOSE_VARIABLES = {
    "REMI_TRAIN_CONFIG": "configs/nightly-test.yaml",  # seconds instead of minutes
    "REMI_RELOAD_INTERVAL_S": "0.5",
}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed"),
    pytest.mark.skipif(
        not (SCRIPTS / "remi-train").exists(), reason="console scripts not installed"
    ),
]


class NativeStack:
    """Maps the compose file's container world onto this machine."""

    def __init__(self, tmp: Path) -> None:
        self.compose = load_compose(env=COMPOSE_VARIABLES)
        self.services = self.compose["services"]
        self.tmp = tmp
        self.redis_port = free_port()
        self.api_port = 0  # chosen when the api starts, not left free through the training
        self.volumes = {name: tmp / "volumes" / name for name in self.compose["volumes"]}
        for path in self.volumes.values():
            path.mkdir(parents=True)
        self.procs: list[subprocess.Popen] = []

    def mounts(self, service: str) -> dict[str, Path]:
        """Container path -> local directory for a service's named volumes."""
        out = {}
        for volume in self.services[service].get("volumes", []):
            name, target = volume.split(":")[:2]
            out[target] = self.volumes[name]
        return out

    def rewrite(self, service: str, text: str) -> str:
        text = text.replace("redis://redis:6379", f"redis://127.0.0.1:{self.redis_port}")
        for target, local in sorted(self.mounts(service).items(), key=lambda kv: -len(kv[0])):
            text = text.replace(target, str(local))
        text = text.replace("/opt/venv/bin", str(SCRIPTS))
        return text.replace("cd /app", f"cd {REPO}")

    def env(self, service: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        # The container environment: only what compose sets (plus PATH/HOME to find programs).
        base = {k: os.environ[k] for k in ("HOME",) if k in os.environ}
        base["PATH"] = f"{SCRIPTS}{os.pathsep}{os.environ.get('PATH', '')}"
        declared = self.services[service].get("environment", {})
        return {
            **base,
            **{k: self.rewrite(service, str(v)) for k, v in declared.items()},
            **(extra or {}),
        }

    def command(self, service: str) -> list[str]:
        argv = [self.rewrite(service, a) for a in command_list(self.services[service]["command"])]
        if "--port" in argv:
            argv[argv.index("--port") + 1] = str(self.api_port)
        if "--host" in argv:
            argv[argv.index("--host") + 1] = "127.0.0.1"  # never listen beyond loopback here
        return argv

    def start(self, argv: list[str], env: dict[str, str], log: str) -> subprocess.Popen:
        out = (self.tmp / f"{log}.log").open("w")
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc, 10)


def wait_for(check, what: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        try:
            if check():
                return
        except Exception:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def healthcheck(stack: NativeStack, service: str) -> bool:
    """Run the service's compose healthcheck, pointed at the native ports."""
    test = stack.services[service]["healthcheck"]["test"]
    if test[0] == "CMD-SHELL":  # as Docker runs it: sh -c, healthy on exit 0
        script = test[1].replace("redis-cli", f"redis-cli -p {stack.redis_port}")
        return subprocess.run(["sh", "-c", script], capture_output=True, timeout=10).returncode == 0
    assert test[0] == "CMD"
    argv = [a.replace("127.0.0.1:8000", f"127.0.0.1:{stack.api_port}") for a in test[1:]]
    if argv[0] == "redis-cli":
        argv[1:1] = ["-p", str(stack.redis_port)]
    if argv[0] == "python":
        argv[0] = sys.executable
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    return done.returncode == 0 and (argv[0] != "redis-cli" or "PONG" in done.stdout)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[NativeStack]:
    native = NativeStack(tmp_path)
    try:
        yield native
    finally:
        native.stop()


def test_compose_stack_natively(stack: NativeStack) -> None:
    started = time.monotonic()
    services = stack.services
    assert set(services) == {"redis", "bootstrap", "api", "scheduler"}

    # redis: its compose command, on a free loopback port, with its volume as the data dir.
    redis_argv = command_list(services["redis"]["command"])
    redis_argv[0] = REDIS_SERVER
    redis_argv += ["--port", str(stack.redis_port), "--bind", "127.0.0.1"]
    redis_argv += ["--dir", str(stack.mounts("redis")["/data"])]
    redis = stack.start(redis_argv, stack.env("redis"), "redis")
    wait_for(lambda: healthcheck(stack, "redis"), "redis healthcheck", 15, redis)

    # bootstrap (depends on redis healthy): trains the first bundle, and is idempotent.
    bundles = stack.mounts("bootstrap")["/bundles"]
    first = subprocess.run(
        stack.command("bootstrap"),
        env=stack.env("bootstrap"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout)["decision"] == "published"
    assert (bundles / "current").is_symlink()
    again = subprocess.run(
        stack.command("bootstrap"), env=stack.env("bootstrap"), cwd=REPO, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 0 and json.loads(again.stdout)["decision"] == "exists"

    # api (depends on redis healthy + bootstrap completed): up when its healthcheck passes.
    stack.api_port = free_port()
    api = stack.start(stack.command("api"), stack.env("api"), "api")
    wait_for(lambda: healthcheck(stack, "api"), "api healthcheck", 60, api)
    url = f"http://127.0.0.1:{stack.api_port}"
    with httpx.Client(base_url=url, timeout=30) as http:
        first_version = http.get("/v1/model").json()["version"]
        assert http.post("/recommend", json={"history": ["books-0001"]}).status_code == 200
        stored = http.post("/events", json={"events": new_item_events()})
        assert stored.status_code == 200, stored.text

        # scheduler: the crontab its entrypoint renders, run as cron would run the job line.
        scheduler_env = {k: str(v) for k, v in services["scheduler"]["environment"].items()}
        cron_env, [(_, user, job)] = parse_crontab(render_crontab(scheduler_env))
        assert user == "remi"
        state = stack.mounts("scheduler")["/state"]
        (state / "logs").mkdir(parents=True, exist_ok=True)  # the entrypoint creates it
        job_env = {k: stack.rewrite("scheduler", v) for k, v in cron_env.items()}
        job_env["HOME"] = os.environ.get("HOME", "/tmp")
        nightly = subprocess.run(
            ["sh", "-c", stack.rewrite("scheduler", job)],
            env=job_env,
            cwd=job_env["HOME"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        log = (state / "logs" / "nightly.log").read_text()
        assert nightly.returncode == 0, log[-3000:]
        reports = [json.loads(f.read_text()) for f in (state / "reports").glob("*.json")]
        assert sorted(r["kind"] for r in reports) == ["bootstrap", "nightly"]
        [report] = [r for r in reports if r["kind"] == "nightly"]
        assert report["status"] == "ok"
        # The job yields the CPU to the API (nightly.nice, default 10).
        assert report["nice"] == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
        assert report["decision"] == "published", report.get("reason")
        assert report["events"]["read"] == len(new_item_events())
        assert report["data"]["new_items"]["sample"] == [NEW_ITEM]
        new_version = report["published_version"]

        # The api hot-reloads the new bundle by itself; the new item is now recommendable.
        wait_for(
            lambda: http.get("/v1/model").json()["version"] == new_version,
            "the api to hot-reload the new bundle",
            30,
            api,
        )
        assert new_version != first_version
        response = http.post(
            "/recommend", json={"user_id": "event-user-0", "n": 1000, "exclude_history": False}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_version"] == new_version and body["unknown_ids"] == []
        assert NEW_ITEM in [item["item_id"] for item in body["items"]]
        assert http.get("/readyz").json()["redis"]["ok"]

    # Redis persisted with its compose settings (append-only file in the data volume).
    data_dir = stack.mounts("redis")["/data"]
    assert any(p.name.startswith("appendonly") for p in data_dir.iterdir())
    assert time.monotonic() - started < 240
