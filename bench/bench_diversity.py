"""What `diversity` costs a recommend call: Eq. 7 against ComiRec's greedy step, same batches.

    python bench/bench_diversity.py                    # 100k items, d=64, K=4, exact index
    python bench/bench_diversity.py --items 20000 --ns 50,200 --rounds 10
    python bench/bench_diversity.py --ns 1000 --categories 10000 --batch 256 --rounds 3

For each n, times recommend_batch on batches of 32 users with diversity 0 (plain Eq. 7) and
diversity 0.1 (a 4 x n deep search, then the greedy step), alternating the two in every round
so a busy machine slows both alike, and prints per-call medians and their ratio. The bundle
has item categories (20 by default, at random), as a bundle exported with --categories does.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _args import positive_int, positive_ints

from remi_core.threads import describe, prepare_environment, setup_threads

prepare_environment("spin")  # before torch and faiss load their OpenMP runtimes

import numpy as np
import torch

from remi_core.bundle import write_bundle
from remi_core.models import EncoderConfig, build_encoder
from service.recommender import load_model, recommend_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=positive_int, default=100_000)
    parser.add_argument("--ns", type=positive_ints, default="50,200", help="list lengths, a,b")
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--rounds", type=positive_int, default=20, help="timed calls per setting")
    parser.add_argument("--diversity", type=float, default=0.1)
    parser.add_argument(
        "--categories", type=positive_int, default=20, help="item categories, at random"
    )
    args = parser.parse_args()
    print("threads: " + describe(setup_threads(None, 1)))

    cfg = EncoderConfig(num_items=args.items + 1, dim=64, num_interests=4, seq_len=20)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ids = [None] + [f"item-{i}" for i in range(1, args.items + 1)]
    categories = rng.integers(0, args.categories, size=args.items + 1).astype(np.int32)
    categories[0] = -1
    histories = [[ids[i] for i in rng.integers(1, args.items + 1, size=30)] for _ in range(512)]
    names = [f"c{c}" for c in range(args.categories)]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_bundle(Path(tmp), encoder=build_encoder(cfg), item_ids=ids,
                            popularity=np.arange(1, 101), metadata={}, publish=False,
                            categories=(categories, names))  # fmt: skip
        model = load_model(path)
    print(f"catalogue {args.items} items, d=64, K=4, index {type(model.index).__name__}, "
          f"batch {args.batch}, lambda {args.diversity}, {args.categories} categories")  # fmt: skip
    for n in args.ns:
        times: dict[float, list[float]] = {0.0: [], args.diversity: []}
        for r in range(args.rounds + 1):
            chunk = [histories[(r * args.batch + i) % len(histories)] for i in range(args.batch)]
            for lam in times:
                start = time.perf_counter()
                recommend_batch(model, chunk, n=n, diversity=lam)
                if r:  # round 0 warms up
                    times[lam].append(time.perf_counter() - start)
        plain, diverse = (np.median(t) * 1e3 for t in times.values())
        print(f"  n={n:>4}: Eq. 7 {plain:7.2f} ms/call, diversity {diverse:7.2f} ms/call "
              f"({diverse / plain:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
