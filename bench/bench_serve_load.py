"""Load-test the real `remi-serve` over HTTP at 100k items (exact) and 1M items (ANN index).

    python bench/bench_serve_load.py --data-root ../shared/data            # ~12 minutes, 2 cores
    python bench/bench_serve_load.py --data-root ../shared/data --quick    # mechanics, ~3 min
    python bench/bench_serve_load.py --data-root ../shared/data --sizes 100000,1000000,10000000
                                        # and 10M items too: 40-80 min, 12 GB of memory

What it does, in one run:
1. Trains a quick REMI model on Amazon Sports with `remi-train train` (cached in --work-dir, so
   reruns skip it) and exports it with `remi-train export`.
2. Grows the trained item table into catalogues of 100k and 1M items (and a third size when
   --sizes names one; see `grow_table`):
   the 18,357 real items stay, every synthetic item is a random mix of two real items plus
   Gaussian noise, so the catalogue keeps the trained table's clusters.
3. Writes a bundle for each with `write_bundle` and no index named: the index is chosen from
   the catalogue size (exact below remi_core.index.EXACT_MAX_ITEMS, IVF above) and its nprobe
   tuned to recall@50 >= 0.95 on the trained run's validation users, as `remi-train export`
   does. Times the
   export and a load with checksums (a server start or reload).
4. Measures the in-process bound (recommend_batch at batch 256: encode + search + merge,
   users/s), for the exact bundle the same in the batches 16 clients form over 2 workers (no
   HTTP), and for the ANN bundle recall@50 against exact Eq. 7 on 2,000 of the run's test
   users (never trained or tuned on, as live traffic mostly is).
5. Starts `remi-serve` per variant and drives POST /recommend with `wrk` (Debian package; a
   Python load generator only if wrk is missing) at concurrency 1, 16 and 64, with those test
   users' histories (each request one user, n=50); a cell with failed or timed-out requests
   stops the run before the docs are written. Variants: micro-batching on and off, the fast lane
   off, the balance window off, dense and Faiss exact search, threads and workers.
6. Prints the tables and writes them into docs/benchmarks.md between the bench_serve_load
   markers, with the machine they ran on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._args import positive_float, positive_int, positive_ints  # noqa: E402
from remi_core.bundle import (  # noqa: E402
    TUNE_USERS,
    Bundle,
    encode_histories,
    load_bundle,
    write_bundle,
)
from remi_core.index import EXACT_MAX_ITEMS, mean_and_error, recall_per_user  # noqa: E402
from remi_core.models import EncoderConfig, build_encoder, cpu_state_dict  # noqa: E402
from remi_core.threads import available_cpus  # noqa: E402
from service.recommender import SCREENS, load_model, recommend_batch  # noqa: E402
from training.data import SequenceDataset  # noqa: E402

START, END = "<!-- bench_serve_load:start -->", "<!-- bench_serve_load:end -->"
SPORTS = "amazon_sports/Sports_and_Outdoors.txt.gz"
# The concurrency the 100k target is set at; its batches are this over the workers or threads.
SERVED_CLIENTS = 16


# --- data: a trained table, grown to a large catalogue ------------------------------------------


def script(name: str) -> str:
    """A console script of this environment (remi-train, remi-serve)."""
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        sys.exit(f"error: {name} not found; install the project (pip install -e '.[dev]')")
    return found


def trained_bundle(args: argparse.Namespace) -> Path:
    """Train (once, cached) and export a quick REMI model on Sports; returns the bundle root."""
    run_dir, bundles = args.work_dir / "sports-run", args.work_dir / "sports-bundle"
    cli = [script("remi-train")]
    if not (run_dir / "result.json").is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"training REMI on Sports for {args.train_iters} steps (cached in {run_dir})")
        subprocess.run(
            [*cli, "train", "--run-dir", str(run_dir), "--data", str(args.data_root / SPORTS),
             "--max-iters", str(args.train_iters), "--eval-every", "1000", "--device", "cpu",
             "--no-progress"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    if not (bundles / "current").exists():
        subprocess.run(
            [*cli, "export", "--run-dir", str(run_dir), "--bundle-root", str(bundles),
             "--index-factory", "Flat", "--search-params", ""],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return bundles


def split_histories(run_dir: Path) -> tuple[list[list[str]], list[list[str]]]:
    """(validation users' histories, test users' histories) of the trained run's own split,
    item ids in time order: export tunes on the first; the second were never trained or tuned
    on (the run's training users score about 0.02 higher recall@50 at 1M items)."""
    dataset = SequenceDataset.load(run_dir / "dataset")

    def ids(split: str) -> list[list[str]]:
        users = np.random.default_rng(1).permutation(dataset.users(split))
        return [[dataset.item_ids[r] for r in dataset.sequences[u]] for u in users]

    return ids("valid"), ids("test")


def grow_table(table: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """A catalogue of `size` items (plus padding row 0) with the trained table's geometry.

    Rows 1..R of `table` (the real items) are kept as they are. Each synthetic row is
    (1 - a) * e_i + a * e_j + noise: e_i, e_j two real items drawn uniformly, a ~ U(0, 0.3) and
    noise ~ N(0, (0.25 * s)^2) per dimension, s the real table's per-dimension standard
    deviation. Synthetic items so sit near real ones, in their clusters; a mix of two items is
    shorter than either, so their norms are about 9% below the real items' on average (the
    real items are over-represented in exact top-50s, 4.9% of them against 1.8% of the 1M
    catalogue).
    """
    rng = np.random.default_rng(seed)
    real = table[1:]
    extra = size - len(real)
    out = np.empty((size + 1, table.shape[1]), dtype=np.float32)
    out[: len(table)] = table
    spread = real.std(axis=0, keepdims=True)
    for start in range(0, extra, 1 << 18):
        m = min(1 << 18, extra - start)
        a = rng.uniform(0, 0.3, (m, 1)).astype(np.float32)
        i, j = rng.integers(0, len(real), m), rng.integers(0, len(real), m)
        noise = rng.standard_normal((m, table.shape[1]), dtype=np.float32) * (0.25 * spread)
        out[len(table) + start : len(table) + start + m] = (1 - a) * real[i] + a * real[j] + noise
    return out


def catalogue_rows(bundle: Bundle, histories: list[list[str]]) -> list[np.ndarray]:
    """Each history's catalogue rows, ids the bundle does not know dropped (as serving drops
    them)."""
    row_of = bundle.row_of()
    return [np.array([row_of[i] for i in h if i in row_of], dtype=np.int64) for h in histories]


def write_catalogue(
    base: Path, root: Path, size: int, tune: list[list[str]], exact_max_items: int
) -> Path:
    """A bundle of `size` items grown from the trained bundle at `base`, index auto-chosen and
    tuned on the `tune` histories."""
    bundle = load_bundle(base, verify=False)
    if size < len(bundle.item_ids) - 1:
        sys.exit(f"error: --sizes: {size} is smaller than the trained catalogue")
    table = grow_table(bundle.item_embeddings, size)
    cfg = EncoderConfig.from_dict({**bundle.config.to_dict(), "num_items": size + 1})
    encoder = build_encoder(cfg)
    state = cpu_state_dict(bundle.encoder)
    state["item_embedding.weight"] = torch.from_numpy(table)
    encoder.load_state_dict(state)
    real = len(bundle.item_ids)
    ids = bundle.item_ids + [f"synthetic-{r}" for r in range(real, size + 1)]
    return write_bundle(
        root,
        encoder=encoder,
        item_ids=ids,
        popularity=bundle.popularity,
        metadata={"dataset": {"name": f"sports-grown-{size}", "base": bundle.version}},
        tune_histories=catalogue_rows(bundle, tune),
        exact_max_items=exact_max_items,
    )


# --- in-process measurements --------------------------------------------------------------------


def in_process_bound(
    path: Path,
    histories: list[list[str]],
    exact: str,
    rounds: int,
    side_by_side: int = 1,
    batch: int = 256,
) -> float:
    """Users/s of recommend_batch (encode + search + merge), 256 users per thread in batches of
    `batch`, best of `rounds`; with `side_by_side` > 1, that many Python threads each run their
    own users (one torch thread each), as the service's compute threads do."""
    model = load_model(path, verify=False, exact_search=exact)
    users = [histories[256 * i : 256 * (i + 1)] for i in range(side_by_side)]
    recommend_batch(model, users[0][:32], n=50)  # warm-up

    def run(own: list[list[str]]) -> None:
        for start in range(0, len(own), batch):
            recommend_batch(model, own[start : start + batch], n=50)

    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        if side_by_side == 1:
            run(users[0])
        else:
            threads = [threading.Thread(target=run, args=(own,)) for own in users]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        best = min(best, time.perf_counter() - start)
    return sum(len(own) for own in users) / best


def recall_at_50(path: Path, histories: list[list[str]]) -> tuple[float, float]:
    """Recall@50 of the served index against exact Eq. 7, on histories not used for tuning, and
    its standard error."""
    bundle = load_bundle(path, verify=False)
    interests, exclude = encode_histories(bundle.encoder, catalogue_rows(bundle, histories))
    table = torch.from_numpy(bundle.item_embeddings)
    return mean_and_error(recall_per_user(bundle.index, interests, table, 50, exclude))


# --- the server and the load generator ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`remi-serve` in a subprocess, configured through REMI_* variables."""

    def __init__(self, bundle_root: Path, env: dict[str, str], log: Path, workers: int = 1) -> None:
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "REMI_BUNDLE_ROOT": str(bundle_root),
            "REMI_VERIFY_CHECKSUMS": "false",
            "REMI_RELOAD_INTERVAL_S": "0",
            "REMI_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # not needed: histories in body
            **env,
        }
        cmd = [script("remi-serve"), "--port", str(self.port), "--no-check", "--log-level",
               "warning", "--workers", str(workers)]  # fmt: skip
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self.log, stderr=self.log)

    def __enter__(self) -> Server:
        deadline = time.time() + 180
        ready: set[int] = set()  # worker pids that answered ready: all of them before any load
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"remi-serve exited; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        ready.add(json.loads(r.read())["worker_pid"])
                        if len(ready) >= self.workers:
                            return self
                        continue
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"remi-serve did not become ready; see {self.log.name}")

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def request_bodies(histories: list[list[str]], count: int = 2000) -> list[str]:
    return [json.dumps({"history": h[-20:], "n": 50}) for h in histories[:count]]


def run_wrk(url: str, bodies: list[str], connections: int, seconds: float, work: Path) -> Load:
    script = work / "recommend.lua"
    lines = ",\n".join(f"[==[{b}]==]" for b in bodies)
    script.write_text(
        f"local bodies = {{\n{lines}\n}}\n"
        "local i = 0\n"
        'local headers = {["Content-Type"] = "application/json"}\n'
        "request = function()\n"
        "  i = i % #bodies + 1\n"
        '  return wrk.format("POST", "/recommend", headers, bodies[i])\n'
        "end\n"
    )
    out = subprocess.run(
        # wrk leaves requests past its timeout (2 s by default) out of the latencies: with
        # one longer than the run, none is left out, and the socket errors say what failed.
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", f"--timeout={seconds + 10:g}s",
         "--latency", "-s", str(script), url],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = dict(re.findall(r"^\s+(50|99)(?:\.000)?%\s+(\S+)", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    failed = int(errors.group(1)) if errors else 0
    socket_errors = re.search(r"Socket errors: (.*)", out)  # connect, read, write, timeout
    if socket_errors:
        print(f"    wrk: socket errors: {socket_errors.group(1)}")
        failed += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))
    return Load(rps, _ms(pct["50"]), _ms(pct["99"]), failed)


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_python_load(url: str, bodies: list[str], connections: int, seconds: float) -> Load:
    """Fallback when wrk is missing: keep-alive clients in threads (slower than wrk; its own
    CPU use is counted against the server's on a 2-core machine)."""
    import http.client

    latencies: list[float] = []
    errors = [0]
    stop = time.perf_counter() + seconds
    host, port = url.removeprefix("http://").split(":")

    def client(offset: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=seconds + 10)
        i = offset
        while time.perf_counter() < stop:
            body = bodies[i % len(bodies)]
            i += connections
            start = time.perf_counter()
            try:
                conn.request("POST", "/recommend", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):  # a failed request, not a dead client
                errors[0] += 1
                conn.close()  # reconnects at the next request
                continue
            latencies.append(time.perf_counter() - start)
            errors[0] += response.status != 200

    threads = [threading.Thread(target=client, args=(c,)) for c in range(connections)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ms = np.array(latencies or [np.nan]) * 1e3
    return Load(len(ms) / elapsed, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)),
                errors[0])  # fmt: skip


def drive(
    server: Server, bodies: list[str], c: int, seconds: float, work: Path, repeats: int
) -> Load:
    """`repeats` runs after a warm-up; the run with the median req/s. Single runs of the same
    server at concurrency 16 spread by up to 20% (how batches and, with several workers, how
    connections happen to split), enough to reorder variants."""

    def run(duration: float) -> Load:
        if shutil.which("wrk"):
            return run_wrk(server.url, bodies, c, duration, work)
        return run_python_load(server.url, bodies, c, duration)

    runs = []
    for _ in range(repeats):
        run(1)  # warm-up: connections, caches, batches
        runs.append(run(seconds))
    return sorted(runs, key=lambda load: load.rps)[(len(runs) - 1) // 2]  # the lower of two


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Variant:
    catalogue: str  # "100k" or "1M"
    label: str
    env: dict[str, str]
    concurrency: tuple[int, ...]
    workers: int = 1  # remi-serve --workers: processes, each with its own GIL and batcher


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()[0]
    return (
        f"{cpu}, {os.cpu_count()} cores visible ({available_cpus()} usable by this process), "
        f"{platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"faiss {faiss.__version__}; "
        f"load average {load:.2f} at the start; {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "artifacts" / "bench-serve-load")
    parser.add_argument("--train-iters", type=positive_int, default=2000)
    parser.add_argument(
        "--sizes",
        type=positive_ints,
        default="100000,1000000",
        help="Catalogue sizes: the exact one, the ANN one, and optionally a larger third (e.g. "
        "10000000) served with the defaults and with workers, besides the two.",
    )
    parser.add_argument("--exact-max-items", type=positive_int, default=EXACT_MAX_ITEMS,
                        help="Largest catalogue searched exactly (default: export's).")  # fmt: skip
    parser.add_argument("--duration", type=positive_float, default=6.0, help="Seconds a run.")
    parser.add_argument("--repeats", type=positive_int, default=3, help="Runs a cell (median).")
    parser.add_argument("--threads", type=positive_int, default=available_cpus(),
                        help="Torch threads of the wide variant (the default is 1).")  # fmt: skip
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Short runs; c=16 only in the main table (variants keep c=1).",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="Print only.")
    args = parser.parse_args()
    if len(args.sizes) not in (2, 3):
        parser.error(f"--sizes: 2 or 3 catalogue sizes, not {len(args.sizes)}")
    if not (args.data_root / SPORTS).is_file():
        sys.exit(f"error: --data-root: {args.data_root / SPORTS} not found")
    if args.quick:
        args.duration, args.repeats = min(args.duration, 3.0), 1
    args.work_dir.mkdir(parents=True, exist_ok=True)
    header = machine()
    started = time.perf_counter()

    base = trained_bundle(args)
    # Export tunes nprobe on up to TUNE_USERS validation users (half choose it, half confirm
    # it); recall, the bound and the load use 2,000 test users.
    valid, test = split_histories(args.work_dir / "sports-run")
    tune, held_out = valid[:TUNE_USERS], test[:2000]
    bodies = request_bodies(held_out)
    sizes = args.sizes
    labels = {size: _size_label(size) for size in sizes}

    rows = {}
    thread_counts = sorted({1, args.threads})
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        for size in sizes:
            t0 = time.perf_counter()
            path = write_catalogue(base, work / f"b{size}", size, tune, args.exact_max_items)
            index = json.loads((path / "manifest.json").read_text())["index"]
            exact = index["factory"] == "Flat"
            build_s = time.perf_counter() - t0
            torch.set_num_threads(1)  # as a server with REMI_TORCH_THREADS=1 (its default) loads
            load_s, backend = _timed_load(path)
            info = {
                "path": path,
                "factory": index["factory"],
                "params": index["search_params"] or "-",
                "tuning": index["recall"],
                "build_s": build_s,
                "load_s": load_s,
                "bound": {},
                # What REMI_EXACT_SEARCH=auto (the server's default) picks here, timed as it loads.
                "auto": backend if exact else "faiss",
            }
            for threads in thread_counts:
                torch.set_num_threads(threads)
                faiss.omp_set_num_threads(threads)
                for backend in (*SCREENS, "faiss") if exact else ("faiss",):
                    key = f"{backend}, {threads} thread{'s' if threads > 1 else ''}"
                    info["bound"][key] = in_process_bound(path, held_out, backend, 3)
            if exact and args.threads > 1:
                # The compiled exact search runs without the GIL, so Python threads side by
                # side (one torch thread each) are a bound of their own.
                torch.set_num_threads(1)
                key = f"{info['auto']}, {args.threads} compute threads"
                bound = in_process_bound(path, held_out, info["auto"], 3, args.threads)
                info["bound"][key] = bound
                # The same with no HTTP at all, in the batches 16 clients make over that many
                # workers or compute threads: how far batch size alone keeps the server from
                # the bound.
                info["served_batch"] = SERVED_CLIENTS // args.threads
                info["no_http"] = in_process_bound(
                    path, held_out, info["auto"], 5, args.threads, info["served_batch"]
                )
            info["recall"] = (1.0, 0.0) if exact else recall_at_50(path, held_out)
            rows[size] = info
            bounds = ", ".join(f"{k}: {v:.0f}" for k, v in info["bound"].items())
            if "no_http" in info:
                bounds += f"; batches of {info['served_batch']}: {info['no_http']:.0f}"
            built = (
                f"{info['factory']} {info['params']} built in {info['build_s']:.0f}s, "
                f"loaded in {info['load_s']:.1f}s"
            )
            print(f"{labels[size]}: {built}; users/s {bounds}; recall@50 {_recall(info)}")

        small, large = labels[sizes[0]], labels[sizes[1]]
        conc = (16,) if args.quick else (1, 16, 64)
        off = {"REMI_BATCH_MAX_USERS": "1"}
        variants = [
            Variant(small, "defaults", {}, conc),
            Variant(small, f"{args.threads} workers", {}, (16, 64), workers=args.threads),
            Variant(small, f"{args.threads} workers, loop batches off",
                    {"REMI_BATCH_INLINE_MS": "0"}, (16, 64), workers=args.threads),
            Variant(small, "batching off", off, (16,)),
            Variant(small, "fast lane off", {"REMI_FAST_LANE": "false"}, (1, 16)),
            Variant(small, "balance window off", {"REMI_BATCH_BALANCE_MS": "0"}, (16,)),
            Variant(small, "bfloat16 screen", {"REMI_EXACT_SEARCH": "screened"}, (1, 16)),
            Variant(small, "dense exact (float32)", {"REMI_EXACT_SEARCH": "dense"}, (1, 16)),
            Variant(small, "Faiss exact", {"REMI_EXACT_SEARCH": "faiss"}, (16,)),
            Variant(small, f"torch threads {args.threads}",
                    {"REMI_TORCH_THREADS": str(args.threads)}, (16,)),
            Variant(small, "1 compute thread", {"REMI_COMPUTE_THREADS": "1"}, (16, 64)),
            Variant(small, "batch wait 2 ms", {"REMI_BATCH_WAIT_MS": "2"}, (16,)),
            Variant(small, "batch wait 5 ms", {"REMI_BATCH_WAIT_MS": "5"}, (16,)),
            Variant(large, "defaults", {}, conc),
            Variant(large, f"{args.threads} workers", {}, (16, 64), workers=args.threads),
            Variant(large, "batching off", off, (16,)),
            Variant(large, f"{args.threads} compute threads",
                    {"REMI_COMPUTE_THREADS": str(args.threads)}, (16,)),
        ]  # fmt: skip
        for size in sizes[2:]:
            variants += [
                Variant(labels[size], "defaults", {}, conc),
                Variant(labels[size], f"{args.threads} workers", {}, (16,), workers=args.threads),
            ]
        if args.quick:
            variants = [
                v for v in variants if not any(w in v.label for w in ("wait", "thread", "worker"))
            ]
        results = []
        for variant in variants:
            size = next(s for s in sizes if labels[s] == variant.catalogue)
            root = rows[size]["path"].parent
            with Server(root, variant.env, work / "server.log", variant.workers) as server:
                for c in variant.concurrency:
                    load = drive(server, bodies, c, args.duration, work, args.repeats)
                    results.append((variant, size, c, load))
                    print(f"{variant.catalogue} {variant.label} c={c}: {load.rps:.0f} req/s, "
                          f"p50 {load.p50_ms:.1f} ms, p99 {load.p99_ms:.1f} ms, "
                          f"{load.errors} errors")  # fmt: skip

    table = markdown(header, rows, labels, results, args, time.perf_counter() - started)
    print(table)
    failed = [f"{v.catalogue} {v.label} c={c}" for v, _, c, load in results if load.errors]
    if failed:  # their req/s and latencies leave out what failed: no figures to publish
        sys.exit(f"error: requests failed in {', '.join(failed)}; {args.out} not written")
    if not args.no_write:
        write_section(args.out, table)
        print(f"wrote {args.out}")


def _timed_load(path: Path) -> tuple[float, str]:
    """What a server start or a reload takes to load this bundle (checksums verified, as
    `remi-serve` does by default; the benchmark's own servers skip them), in seconds, and the
    search backend it chose."""
    start = time.perf_counter()
    backend = load_model(path).search_backend
    return time.perf_counter() - start, backend


def _size_label(size: int) -> str:
    return f"{size // 1_000_000}M" if size % 1_000_000 == 0 else f"{size // 1000}k"


def markdown(header, rows, labels, results, args, seconds) -> str:
    lines = [
        f"Machine: {header}. Whole run {seconds / 60:.1f} min "
        f"(`--duration {args.duration:g} --repeats {args.repeats}`"
        f"{' --quick' if args.quick else ''}; each cell the median of the repeats by req/s).",
        "",
        "Catalogues (d=64, K=4, n=50; grown from a REMI model trained on Amazon Sports, see "
        "below):",
        "",
        "| catalogue | index (chosen by size) | search params (tuned; recall@50 of the users "
        "confirming them at export) | recall@50 vs exact (2,000 other users, ± its SE) "
        "| export, s | load, s | in-process bound, batch 256, users/s "
        f"| the same in the batches of {SERVED_CLIENTS} clients |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, info in rows.items():
        bound = "; ".join(f"{k}: {v:.0f}" for k, v in info["bound"].items())
        served = "-"
        if "no_http" in info:
            best = max(info["bound"].values())
            served = (
                f"batches of {info['served_batch']}, {args.threads} compute threads: "
                f"{info['no_http']:.0f} ({info['no_http'] / best:.2f} x the bound)"
            )
        lines.append(
            f"| {labels[size]} | {info['factory']} | {_tuned(info)} | {_recall(info)} "
            f"| {info['build_s']:.0f} | {info['load_s']:.1f} | {bound} | {served} |"
        )
    lines += [
        "",
        "HTTP load (`wrk`, POST /recommend, one real Sports history per request, n=50):",
        "",
        "| catalogue | variant | concurrency | req/s | p50 ms | p99 ms | req/s / bound | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, size, c, load in results:
        bound = max(rows[size]["bound"].values())
        lines.append(
            f"| {variant.catalogue} | {variant.label} | {c} | {load.rps:.0f} | "
            f"{load.p50_ms:.1f} | {load.p99_ms:.1f} | {load.rps / bound:.2f} | {load.errors} |"
        )
    lines += [
        "",
        "`export`: `write_bundle` choosing, building and tuning the index (and writing the "
        "files); `load`: `load_model` with checksums, as a server start or reload does. "
        "`req/s / bound`: HTTP throughput over the best in-process bound of that catalogue (any "
        "backend, any thread count). Server defaults: 1 worker, REMI_BATCH_WAIT_MS=0, "
        "REMI_BATCH_BALANCE_MS=2, REMI_BATCH_MAX_USERS=128, REMI_TORCH_THREADS=1, "
        f"REMI_EXACT_SEARCH=auto ({next(iter(rows.values()))['auto']} on this host for the "
        f"{next(iter(labels.values()))} catalogue), REMI_COMPUTE_THREADS=0 (batches side by "
        "side, one per CPU of the worker, for the exact search; one at a time for the index), "
        "REMI_BATCH_INLINE_MS=10 (a worker with one CPU, as each of 2 workers on 2 cores is, "
        "computes batches expected to take up to 10 ms on its event loop).",
    ]
    return "\n".join(lines)


def _tuned(info: dict) -> str:
    tuning = info["tuning"]
    if info["factory"] == "Flat" or not tuning:
        return info["params"]
    return f"{info['params']} ({tuning['recall']:.4f} on {tuning['queries']:,})"


def _recall(info: dict) -> str:
    mean, se = info["recall"]
    return f"{mean:.4f}" if se == 0 else f"{mean:.4f} ± {se:.4f}"


def write_section(path: Path, table: str) -> None:
    text = path.read_text() if path.is_file() else ""
    block = f"{START}\n{table}\n{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
