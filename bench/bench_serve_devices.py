"""Load-test the real `remi-serve` over HTTP with the encoder and its search on each device.

    python bench/bench_serve_devices.py --items 1000000 --devices cpu,cuda   # a GPU host
    python bench/bench_serve_devices.py --items 1000000 --index IVF2048,SQ8 \
        --search-params nprobe=32                                            # an IVF bundle
    python bench/bench_serve_devices.py --items 20000 --seconds 2            # mechanics, no GPU

Writes one bundle from a random encoder (weights do not change the cost; exact, Flat, unless
--index names a faiss factory, searched with --search-params), starts
`remi-serve` once per REMI_DEVICE value and drives POST /recommend with `wrk` (a Python load
generator where wrk is missing) at each concurrency, with random histories of 20 known items
and n=50. Prints req/s, p50 and p99 per device and concurrency, each device's req/s as a ratio
of the first's, and GET /v1/model's search_backend and search_device for each. Every other
setting is the service's default. bench/bench_serve_load.py is the 2-core CPU benchmark (a
trained table, ANN indexes, variants); this one answers what moving to a GPU host buys.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._args import devices, positive_float, positive_int, positive_ints  # noqa: E402
from bench.bench_serve_load import Load, Server, drive, machine, request_bodies  # noqa: E402
from remi_core.bundle import write_bundle  # noqa: E402
from remi_core.index import RECALL_TARGET, check_index_settings  # noqa: E402
from remi_core.models import EncoderConfig, build_encoder  # noqa: E402


def random_bundle(
    root: Path, items: int, dim: int, k: int, factory: str = "Flat", search_params: str = ""
) -> None:
    """A published bundle of `items` items from a seeded random encoder."""
    torch.manual_seed(0)
    cfg = EncoderConfig(num_items=items + 1, dim=dim, num_interests=k, seq_len=20)
    write_bundle(
        root,
        encoder=build_encoder(cfg),
        item_ids=[None] + [f"item-{i}" for i in range(1, items + 1)],
        popularity=np.arange(1, min(items, 1000) + 1),
        metadata={"dataset": "synthetic"},
        index_factory=factory,
        search_params=search_params,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=positive_int, default=1_000_000)
    parser.add_argument("--dim", type=positive_int, default=64)
    parser.add_argument("--interests", type=positive_int, default=4)
    parser.add_argument("--devices", type=devices, default="cpu,cuda",
                        help="REMI_DEVICE values, comma-separated")  # fmt: skip
    parser.add_argument("--index", default="Flat", help="The bundle's faiss index factory.")
    parser.add_argument("--search-params", default="",
                        help="Its search parameters, e.g. nprobe=32 (none for Flat).")  # fmt: skip
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 16, 64])
    parser.add_argument("--seconds", type=positive_float, default=6.0, help="Seconds a run.")
    parser.add_argument("--repeats", type=positive_int, default=1, help="Runs a cell (median).")
    args = parser.parse_args()
    try:  # a misspelt factory fails here, not after the catalogue is drawn
        check_index_settings(args.dim, args.index, args.search_params, RECALL_TARGET)
    except ValueError as exc:
        parser.error(f"--index/--search-params: {exc}")

    print(machine())
    rng = np.random.default_rng(0)
    histories = [
        [f"item-{i}" for i in rng.integers(1, args.items + 1, size=20)] for _ in range(2000)
    ]
    bodies = request_bodies(histories)
    results: dict[str, dict[int, Load]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = work / "bundles"
        random_bundle(root, args.items, args.dim, args.interests, args.index, args.search_params)
        for device in args.devices:
            log = work / f"serve-{device}.log"
            server = Server(root, {"REMI_DEVICE": device}, log)
            try:
                server.__enter__()
            except RuntimeError as exc:  # the log goes with the temporary directory: show it
                server.__exit__()
                tail = "".join(log.read_text(errors="replace").splitlines(True)[-20:])
                sys.exit(f"error: {exc}\n{tail}")
            try:
                results[device] = served(server, device, bodies, args, work)
            finally:
                server.__exit__()
    first = args.devices[0]
    for device in args.devices[1:]:
        ratios = ", ".join(
            f"c={c} {results[device][c].rps / results[first][c].rps:.2f}x" for c in args.concurrency
        )
        print(f"{device} vs {first}: {ratios}")


def served(
    server: Server, device: str, bodies: list[str], args: argparse.Namespace, work: Path
) -> dict[int, Load]:
    """The running server's search, then its load at each concurrency, printed as they come."""
    with urllib.request.urlopen(server.url + "/v1/model", timeout=10) as r:
        info = json.loads(r.read())
    print(f"{device}: {info['search_backend']} search on {info['search_device']}")
    loads = {}
    for c in args.concurrency:
        load = loads[c] = drive(server, bodies, c, args.seconds, work, args.repeats)
        print(
            f"  {device:<6} c={c:<3} {load.rps:9.1f} req/s  p50 {load.p50_ms:7.2f} ms"
            f"  p99 {load.p99_ms:7.2f} ms  errors {load.errors}"
        )
    return loads


if __name__ == "__main__":
    main()
