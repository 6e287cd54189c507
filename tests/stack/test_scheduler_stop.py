"""`docker compose stop` on the scheduler while a nightly job runs (issue 12, point 13).

The real entrypoint (docker/scheduler-entrypoint.sh) runs as a process with the compose
scheduler's settings pointed at temporary directories and a real Redis; tests/stack/cron_standin.py
plays cron and starts the crontab's job line at once. SIGTERM to the entrypoint (what Docker
sends to PID 1) must stop the running job cleanly: the job exits, its Redis lock is released,
its report says it was stopped, and the entrypoint exits 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import RedisServer

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "docker" / "scheduler-entrypoint.sh"
SCRIPTS = Path(sys.executable).parent
LOCK_KEY = "remi:nightly:lock"

pytestmark = pytest.mark.integration


def long_config(tmp_path: Path) -> Path:
    """The tiny test config, training far longer than the test waits (it is stopped)."""
    config = yaml.safe_load((REPO / "configs" / "nightly-test.yaml").read_text())
    config["train"].update(max_iters=1_000_000, eval_every=1_000_000)
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_for(check, what: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert proc.poll() is None, f"entrypoint exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out: {what}\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_sigterm_stops_the_running_nightly_job_cleanly(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    state, bundles, cron_dir = tmp_path / "state", tmp_path / "bundles", tmp_path / "cron.d"
    cron_dir.mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        # The compose scheduler's settings, mapped onto this machine.
        "REMI_REDIS_URL": redis_server.url,
        "REMI_BUNDLE_ROOT": str(bundles),
        "REMI_STATE_DIR": str(state),
        "REMI_TRAIN_CONFIG": str(long_config(tmp_path)),
        "REMI_NIGHTLY_SCHEDULE": "* * * * *",
        "REMI_CRON_DIR": str(cron_dir),
        "REMI_STOP_TIMEOUT_S": "60",
    }
    cron = [sys.executable, str(REPO / "tests" / "stack" / "cron_standin.py")]
    cron += [str(cron_dir / "remi-nightly"), str(REPO), str(SCRIPTS)]
    log = tmp_path / "scheduler.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["sh", str(ENTRYPOINT), *cron], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    client = redis_server.client()
    job_pid = None
    try:
        # The job is running and holds the lock (it trains for far longer than this test).
        wait_for(lambda: client.get(LOCK_KEY) is not None, "the job's lock", 120, proc, log)
        [pid_file] = (state / "run").glob("nightly.*")
        job_pid = int(pid_file.name.split(".")[1])
        assert alive(job_pid)
        time.sleep(1.0)  # into training

        proc.send_signal(15)  # what `docker compose stop` sends to PID 1
        proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if job_pid is not None and alive(job_pid):  # never leave a training job behind
            os.kill(job_pid, 9)
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert "scheduler: stopped cleanly" in output
    assert not alive(job_pid), "the nightly job outlived the scheduler"
    assert client.get(LOCK_KEY) is None, "the lock was left held"
    [report] = [json.loads(p.read_text()) for p in (state / "reports").glob("*.json")]
    assert report["kind"] == "nightly" and report["status"] == "failed"
    assert report["error"] == "SystemExit: 143"  # stopped by SIGTERM, documented exit code
    assert not (bundles / "current").exists()  # nothing published by a stopped run
    assert list((state / "run").iterdir()) == []
