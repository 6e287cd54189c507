"""Benchmark the plain retrieval function (encode + one Faiss search + Eq. 7 merge), no HTTP.

    python bench/bench_service.py                       # 100k items, d=64, K=4, Flat and HNSW32
    python bench/bench_service.py --items 20000 --indexes Flat --rounds 50
    python bench/bench_service.py --torch-threads 2     # see what OpenMP oversubscription costs
    python bench/bench_service.py --items 1000000 --indexes Flat --devices cpu,cuda \
        --batches 1,32,256 --torch-threads 16              # a GPU host: REMI_DEVICE=cpu vs cuda

Builds a synthetic bundle from a random encoder (weights do not change the cost), then times
recommend_batch for each batch size (default 1 and 32) and prints per-call and per-user
latency percentiles, users/s, and the batching speed-up. Each index is loaded once per device
(REMI_DEVICE: the encoder, and an exact bundle's dense search, on a CUDA device). The recall of
each against the first index on the first device is printed too, since a faster index that
returns other items is not a like-for-like win.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _args import devices, positive_int, positive_ints

from remi_core.threads import describe, prepare_environment, setup_threads

prepare_environment("passive")  # before torch and faiss load their OpenMP runtimes

import numpy as np
import torch

from remi_core.bundle import write_bundle
from remi_core.models import EncoderConfig, build_encoder
from service.recommender import LoadedModel, load_model, recommend_batch


def make_bundle(
    root: Path, items: int, dim: int, k: int, seq_len: int, factory: str, params: str
) -> Path:
    cfg = EncoderConfig(num_items=items + 1, dim=dim, num_interests=k, seq_len=seq_len)
    torch.manual_seed(0)
    encoder = build_encoder(cfg)
    ids = [None] + [f"item-{i}" for i in range(1, items + 1)]
    start = time.perf_counter()
    path = write_bundle(
        root,
        encoder=encoder,
        item_ids=ids,
        popularity=np.arange(1, min(items, 1000) + 1),
        metadata={"dataset": "synthetic"},
        index_factory=factory,
        search_params=params,
        publish=False,
    )
    print(f"  {factory:<8} built in {time.perf_counter() - start:.1f}s")
    return path


def time_calls(
    model: LoadedModel, histories: list[list[str]], batch: int, n: int, rounds: int
) -> np.ndarray:
    """Seconds per call of recommend_batch over consecutive slices of `batch` histories."""
    times = []
    for r in range(rounds):
        chunk = [histories[(r * batch + i) % len(histories)] for i in range(batch)]
        start = time.perf_counter()
        recommend_batch(model, chunk, n=n)
        times.append(time.perf_counter() - start)
    return np.asarray(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=positive_int, default=100_000)
    parser.add_argument("--dim", type=positive_int, default=64)
    parser.add_argument("--interests", type=positive_int, default=4)
    parser.add_argument("--seq-len", type=positive_int, default=20)
    parser.add_argument("--history", type=positive_int, default=30, help="history per user")
    parser.add_argument("--n", type=positive_int, default=50)
    parser.add_argument("--rounds", type=positive_int, default=100, help="timed calls per setting")
    parser.add_argument("--indexes", default="Flat,HNSW32", help="comma-separated factories")
    parser.add_argument("--hnsw-ef", type=positive_int, default=128)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (1, the service default: torch's and faiss's OpenMP "
        "thread pools otherwise fight over the cores)",
    )
    parser.add_argument("--faiss-threads", type=int, default=None, help="faiss OpenMP threads")
    parser.add_argument(
        "--devices", type=devices, default=["cpu"], help="REMI_DEVICE values, comma-separated"
    )
    parser.add_argument("--batches", type=positive_ints, default=[1, 32], help="users per call")
    args = parser.parse_args()

    import faiss  # loaded now so setup_threads sizes its pool too

    # As a service worker: faiss gets the thread count (--faiss-threads, else REMI_THREADS,
    # else the CPUs available), torch its own intra-op count.
    print("threads: " + describe(setup_threads(args.faiss_threads, args.torch_threads)))
    print(f"faiss threads: {faiss.omp_get_max_threads()}")
    rng = np.random.default_rng(0)
    histories = [
        [f"item-{i}" for i in rng.integers(1, args.items + 1, size=args.history)]
        for _ in range(1024)
    ]
    print(
        f"catalogue {args.items} items, d={args.dim}, K={args.interests}, seq_len={args.seq_len}, "
        f"history {args.history}, n={args.n}, torch threads {torch.get_num_threads()}, "
        f"cpus {os.cpu_count()}"
    )
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        for factory in args.indexes.split(","):
            params = f"efSearch={args.hnsw_ef}" if factory.startswith("HNSW") else ""
            path = make_bundle(
                Path(tmp), args.items, args.dim, args.interests, args.seq_len, factory, params
            )
            for device in args.devices:
                model = load_model(path, device=device)
                name = f"{factory} {device}"
                print(f"  {name}: {model.search_backend} search on {model.search_device}")
                recommend_batch(model, histories[:32], n=args.n)  # warm-up
                per_user = {}
                for batch in args.batches:
                    rounds = max(args.rounds * 32 // max(batch, 32), 5)
                    t = time_calls(model, histories, batch, args.n, rounds) * 1e3
                    p50, p95, p99 = np.percentile(t, [50, 95, 99])
                    per_user[batch] = np.median(t) / batch
                    print(
                        f"  {name:<12} batch {batch:>3}: per call p50 {p50:7.2f} ms"
                        f"  p95 {p95:7.2f} ms  p99 {p99:7.2f} ms"
                        f" | per user {per_user[batch]:6.3f} ms"
                        f"  ({1e3 / per_user[batch]:7.0f} users/s)"
                    )
                low, high = min(per_user), max(per_user)
                print(
                    f"  {name:<12} batching {high} users per call: "
                    f"{per_user[low] / per_user[high]:.1f}x the throughput of {low} per call"
                )
                results = recommend_batch(model, histories[:200], n=args.n)
                rows = [set(r.item_ids) for r in results]
                if reference is None:
                    reference, first = rows, name
                else:
                    pairs = zip(reference, rows, strict=True)
                    recall = np.mean([len(a & b) / len(a) for a, b in pairs])
                    print(f"  {name:<12} recall@{args.n} vs {first}: {recall:.3f}")
                del model


if __name__ == "__main__":
    main()
