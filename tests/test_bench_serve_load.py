"""The serving load benchmark runs end to end on tiny settings (its figures are not checked)."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest

from remi_core.index import choose_factory

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "bench_serve_load.py"
DATA = Path(os.environ.get("REMI_DATA_ROOT", ROOT.parent / "shared" / "data"))
pytestmark = pytest.mark.integration


def bench(*args: str, timeout: int = 600, script: Path = BENCH) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_a_missing_data_root_is_named() -> None:
    run = bench("--data-root", "/nonexistent")
    assert run.returncode != 0
    assert "--data-root" in run.stderr and "Sports_and_Outdoors" in run.stderr


@pytest.mark.skipif(not (DATA / "amazon_sports").is_dir(), reason="needs REMI_DATA_ROOT")
def test_the_benchmark_runs_and_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nkept\n")
    args = [
        "--data-root", str(DATA), "--work-dir", str(tmp_path / "work"), "--train-iters", "30",
        "--sizes", "20000,40000,50000", "--exact-max-items", "30000", "--quick", "--duration", "1",
        "--out", str(out),
    ]  # fmt: skip
    run = bench(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n")
    section = text.split("<!-- bench_serve_load:start -->")[1].split("<!-- bench_serve_load:end")[0]
    # The ANN catalogues' indexes are chosen by size, as export chooses them.
    ann, third = (choose_factory(n, exact_max_items=30_000) for n in (40_000, 50_000))
    assert "| 20k | Flat |" in section and f"| 40k | {ann} |" in section
    exact_row = next(line for line in section.splitlines() if line.startswith("| 20k | Flat |"))
    assert re.search(
        r"batches of \d+, \d+ compute threads: \d+ \(\d\.\d\d x the bound\) \|$", exact_row
    )
    assert "| 40k | defaults | 16 |" in section
    assert f"| 50k | {third} |" in section and "| 50k | defaults | 16 |" in section


@pytest.fixture
def module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_serve_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look it up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def flaky_server() -> Iterator[str]:
    """Every 4th request takes 2.5 s, every 4th (another) has its connection cut unanswered."""
    count = [0]
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                count[0] += 1
                i = count[0]
            if i % 4 == 2:
                self.close_connection = True
                return
            if i % 4 == 1:
                time.sleep(2.5)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_python_load_counts_what_failed(module: ModuleType, flaky_server: str) -> None:
    # Cut connections killed its client threads: a dead server's rate before it died was
    # reported with no error at all.
    load = module.run_python_load(flaky_server, ['{"history": []}'], 4, 4.0)
    assert load.errors > 0 and load.p99_ms >= 2500


@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk")
def test_wrk_counts_what_failed_and_keeps_slow_requests(
    module: ModuleType, flaky_server: str, tmp_path: Path
) -> None:
    # wrk's default timeout (2 s) left the slow requests out of the latencies and the errors.
    load = module.run_wrk(flaky_server, ['{"history": []}'], 4, 4.0, tmp_path)
    assert load.errors > 0 and load.p99_ms >= 2500


def test_a_rerun_replaces_the_section_and_keeps_the_rest(
    tmp_path: Path, module: ModuleType
) -> None:
    out = tmp_path / "docs" / "benchmarks.md"
    module.write_section(out, "first")  # a missing file is created
    assert out.read_text() == f"{module.START}\nfirst\n{module.END}\n"
    out.write_text("# Benchmarks\n\nbefore\n\n" + out.read_text() + "\nafter\n")
    module.write_section(out, "| second |")
    assert out.read_text() == (
        f"# Benchmarks\n\nbefore\n\n{module.START}\n| second |\n{module.END}\n\nafter\n"
    )


@pytest.mark.skipif(not (DATA / "amazon_sports").is_dir(), reason="needs REMI_DATA_ROOT")
def test_the_ivf_list_benchmark_tunes_and_times_each_list_count(tmp_path: Path) -> None:
    run = bench(
        "--data-root", str(DATA), "--work-dir", str(tmp_path), "--train-iters", "30",
        "--items", "30000", "--lists", "64,128", "--users", "300", "--rounds", "1",
        script=ROOT / "bench" / "bench_ivf_lists.py",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| IVF")]
    assert [row.split(" | ")[0] for row in rows] == ["| IVF64,SQ8", "| IVF128,SQ8"]
    assert rows[0].split(" | ")[5] == "1.00x"  # the first list count is the reference
    for row in rows:  # each tuned to the target on validation users, recall measured on others
        assert row.split(" | ")[1].startswith("nprobe=")
        assert float(row.split(" | ")[2].split(" ")[0]) >= 0.9
