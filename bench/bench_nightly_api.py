"""API latency while a nightly run trains beside it, with the compose stack's CPU budget.

    python bench/bench_nightly_api.py                  # about 3 minutes on 2 cores

The compose stack, natively: a real redis-server, a real `remi-serve` (all CPUs, as in
docker-compose.yml), and a real `remi-train nightly --force` (configs/demo.yaml) beside it. The
API gets a steady open-loop load (`--rate` requests/s of POST /recommend, latency counted from
each request's scheduled send time, so a stalled server cannot hide its queue) for `--seconds`
per phase:

- "idle": nothing trains;
- "budget": the nightly job confined to `--nightly-cpus` CPUs by CPU affinity, which stands for
  the compose file's `cpus:` quota (the job sizes its threads to either; Docker cannot run
  here), with the default thread set-up;
- "no budget": the nightly job on every CPU, default set-up (OpenMP's spinning wait, the pool
  resized to the CPUs the API leaves free, nice 10);
- "old": the nightly job on every CPU with the old default (spinning OpenMP waits, torch
  threads = cores, normal priority) - what the stack did before.

Each nightly run is started, left to reach its training phase, measured, then stopped with
SIGTERM (it releases its lock). Prints p50/p99/max per phase and p99 against idle.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml
from _args import existing_file, positive_float, positive_int

from remi_core.threads import busy_cpus, prepare_environment

# This process loads torch only to read item ids: the service's set-up anyway.
prepare_environment("passive")

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(sys.executable).parent
PHASES = ("idle", "budget", "no budget", "old")


def script(name: str) -> list[str]:
    path = SCRIPTS / name
    module = {"remi-train": "training.cli", "remi-serve": "service.cli"}[name]
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except (OSError, httpx.HTTPError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def redis_answers(port: int) -> bool:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
        conn.sendall(b"PING\r\n")
        return conn.recv(16).startswith(b"+PONG")


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REMI_", "OMP_", "GOMP_", "MKL_NUM", "OPENBLAS_NUM"))
    }
    return {**env, **extra}


def load(url: str, histories: list[list[str]], rate: float, seconds: float) -> dict:
    """Open-loop load: one request every 1/rate s; latency from the scheduled send time."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    client = httpx.Client(base_url=url, timeout=30)

    def one(scheduled: float, history: list[str]) -> None:
        nonlocal errors
        try:
            ok = client.post("/recommend", json={"history": history, "n": 50}).status_code == 200
        except httpx.HTTPError:
            ok = False
        with lock:
            latencies.append(time.perf_counter() - scheduled)
            errors += not ok

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        for i in range(int(rate * seconds)):
            scheduled = start + i / rate
            time.sleep(max(0.0, scheduled - time.perf_counter()))
            pool.submit(one, scheduled, histories[i % len(histories)])
    client.close()
    latencies.sort()

    def pct(p: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))]

    return {"n": len(latencies), "errors": errors, "p50": pct(0.5), "p99": pct(0.99),
            "max": 1000 * latencies[-1]}  # fmt: skip


def start_nightly(phase: str, args, redis_url: str, bundles: Path, tmp: Path):
    env = clean_env(REMI_REDIS_URL=redis_url)
    config = args.config
    if phase == "old":
        # As before issue 16: libgomp's default wait (spin, then sleep), a fixed count of
        # threads, the cores (which also keeps the load follower off), and no lower priority.
        env.update(REMI_THREADS=str(os.cpu_count()))
        settings = yaml.safe_load(args.config.read_text())
        settings.setdefault("nightly", {})["nice"] = 0
        config = tmp / "old-config.yaml"
        config.write_text(yaml.safe_dump(settings))
    cpus = sorted(os.sched_getaffinity(0))
    affinity = set(cpus[-args.nightly_cpus :]) if phase == "budget" else None
    log = (tmp / f"nightly-{phase.replace(' ', '-')}.log").open("w")
    argv = script("remi-train") + ["nightly", "--config", str(config), "--force"]
    argv += ["--bundle-root", str(bundles), "--state-dir", str(tmp / "state")]
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=(lambda: os.sched_setaffinity(0, affinity)) if affinity else None,
    )
    wait_until(lambda: "nightly: train" in Path(log.name).read_text(), f"{phase}: training", 300)
    time.sleep(2.0)  # into the steady state of training
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=existing_file, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--seconds", type=positive_float, default=30.0, help="load per phase")
    parser.add_argument("--rate", type=positive_float, default=20.0, help="requests per second")
    parser.add_argument("--nightly-cpus", type=positive_int, default=1, help="the compose budget")
    parser.add_argument("--phases", default=",".join(PHASES))
    args = parser.parse_args()
    phases = args.phases.split(",")
    if any(p not in PHASES for p in phases):
        parser.error(f"--phases: choose from {', '.join(PHASES)}")

    busy = busy_cpus(1.0)
    print(f"machine: {os.cpu_count()} CPUs; nightly budget {args.nightly_cpus} CPU(s)")
    if busy is not None and busy > 0.3:
        print(f"WARNING: the cores are not idle ({busy:.1f} CPUs busy before the run)")
    redis_server = os.environ.get("REMI_TEST_REDIS_SERVER") or "redis-server"
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        try:
            redis_port = free_port()
            procs.append(subprocess.Popen(
                [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(tmp)],
                stdout=subprocess.DEVNULL,
            ))  # fmt: skip
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            wait_until(lambda: redis_answers(redis_port), "redis-server", 30)
            # The API's bundle: the same model shape, briefly trained (its quality is moot).
            config = yaml.safe_load(args.config.read_text())
            config["train"].update(max_iters=200, eval_every=200)
            short = tmp / "bootstrap.yaml"
            short.write_text(yaml.safe_dump(config))
            bundles = tmp / "bundles"
            done = subprocess.run(
                script("remi-train") + ["bootstrap", "--config", str(short), "--bundle-root",
                                        str(bundles), "--state-dir", str(tmp / "state")],
                env=clean_env(REMI_REDIS_URL=redis_url), cwd=REPO, capture_output=True,
                text=True,
            )  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(f"bootstrap failed:\n{done.stderr[-3000:]}")
            from remi_core.bundle import load_bundle

            items = [i for i in load_bundle(bundles / "current").item_ids if i is not None]
            rng = random.Random(0)
            histories = [rng.sample(items, 20) for _ in range(256)]

            port = free_port()
            procs.append(subprocess.Popen(
                script("remi-serve") + ["--port", str(port), "--bundle-root", str(bundles),
                                        "--log-level", "warning"],
                env=clean_env(REMI_REDIS_URL=redis_url, REMI_RELOAD_INTERVAL_S="0"),
                stdout=subprocess.DEVNULL, stderr=(tmp / "api.log").open("w"),
            ))  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, "the API", 120)
            load(url, histories, args.rate, 3.0)  # warm-up

            results = {}
            for phase in phases:
                nightly = None if phase == "idle" else start_nightly(
                    phase, args, redis_url, bundles, tmp
                )  # fmt: skip
                results[phase] = load(url, histories, args.rate, args.seconds)
                if nightly is not None:
                    nightly.send_signal(signal.SIGTERM)  # a clean stop; it releases its lock
                    nightly.wait(120)
                rounded = {k: round(v, 1) for k, v in results[phase].items()}
                print(f"  {phase}: {json.dumps(rounded)}", flush=True)
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(30)

    idle = results.get("idle")
    print(f"API latency under {args.rate:.0f} requests/s (ms; from the scheduled send time):")
    print(f"  {'phase':10s} {'requests':>8s} {'errors':>6s} {'p50':>8s} {'p99':>8s} {'max':>8s}")
    for phase, r in results.items():
        ratio = f"  p99 {r['p99'] / idle['p99']:.1f}x idle" if idle and phase != "idle" else ""
        print(
            f"  {phase:10s} {r['n']:8d} {r['errors']:6d} {r['p50']:8.1f} {r['p99']:8.1f}"
            f" {r['max']:8.1f}{ratio}"
        )


if __name__ == "__main__":
    main()
