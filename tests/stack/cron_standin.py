"""A stand-in for `cron -f` in tests that run the scheduler entrypoint outside a container.

    python tests/stack/cron_standin.py CRON_FILE REPO SCRIPTS

Reads the /etc/cron.d-format file the entrypoint rendered, and runs its one job line at once, as
cron would at the scheduled minute: `sh -c LINE` with only the file's environment lines (plus
HOME and PYTHONPATH, so the checkout under test is imported). The image's paths are mapped onto
this machine: /app -> REPO, /opt/venv/bin -> SCRIPTS. Then it waits like cron does; SIGTERM ends
it (cron's default action when it is not PID 1) without touching the job.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    cron_file, repo, scripts = sys.argv[1:4]
    env: dict[str, str] = {}
    jobs: list[str] = []
    for line in Path(cron_file).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*\s*=", line):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip().replace("/opt/venv/bin", scripts)
        else:
            fields = 2 if line.startswith("@") else 6  # schedule fields and the user
            jobs.append(line.split(None, fields)[fields])
    [job] = jobs
    env["HOME"] = os.environ.get("HOME", "/tmp")
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    child = subprocess.Popen(["sh", "-c", job.replace("cd /app", f"cd {repo}")], env=env)
    child.wait()
    while True:  # cron keeps running after its job
        time.sleep(60)


if __name__ == "__main__":
    main()
