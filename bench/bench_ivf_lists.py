"""How many IVF lists for a large catalogue: each list count tuned as export tunes it, then timed.

    python bench/bench_ivf_lists.py --data-root ../shared/data          # 1M items, ~12 min, 2 cores
    python bench/bench_ivf_lists.py --data-root ../shared/data --items 300000 --lists 512,1024,2048

On the trained Sports model of bench/bench_serve_load.py (trained on first use and cached in its
--work-dir), grown to --items items as that benchmark grows it (`grow_table`), it builds
`IVF<n>,SQ8` for each --lists value, tunes nprobe with `tune_search_params` on the run's validation
users (as `remi-train export` does), measures recall@50 against exact Eq. 7 on 2,000 of its test
users (their whole histories, or the last --history items), then times the served search
(`faiss_merged_topk`: the batched search and the exact merge, 256 users a call) on one thread, the
indexes alternated in every round so a drifting VM slows all alike.
`remi_core.index.choose_factory` takes its list count from this comparison.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._args import positive_int, positive_ints  # noqa: E402
from bench.bench_serve_load import (  # noqa: E402
    SPORTS,
    catalogue_rows,
    grow_table,
    machine,
    split_histories,
    trained_bundle,
)
from remi_core.bundle import TUNE_USERS, encode_histories, load_bundle  # noqa: E402
from remi_core.index import (  # noqa: E402
    build_index,
    mean_and_error,
    recall_per_user,
    tune_search_params,
)
from remi_core.retrieval import faiss_merged_topk  # noqa: E402

USERS_PER_CALL = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "artifacts" / "bench-serve-load")
    parser.add_argument("--train-iters", type=positive_int, default=2000)
    parser.add_argument("--items", type=positive_int, default=1_000_000, help="Catalogue size.")
    parser.add_argument("--lists", type=positive_ints, default="2048,4096,8192",
                        help="IVF list counts to compare.")  # fmt: skip
    parser.add_argument("--users", type=positive_int, default=2000, help="Test users measured.")
    parser.add_argument("--rounds", type=positive_int, default=3, help="Alternated timing rounds.")
    parser.add_argument(
        "--history",
        type=int,
        default=0,
        help="Last items of each test user's history sent (bench_serve_load's requests send 20); "
        "0: all of it (more to exclude, so deeper searches).",
    )
    args = parser.parse_args()
    if args.history < 0:
        parser.error(f"--history: a whole number >= 0, not {args.history}")
    if max(args.lists) > args.items:
        parser.error(f"--lists: {max(args.lists)} lists for {args.items} items")
    if not (args.data_root / SPORTS).is_file():
        sys.exit(f"error: --data-root: {args.data_root / SPORTS} not found")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(machine())

    bundle = load_bundle(trained_bundle(args), verify=False)
    if args.items < len(bundle.item_ids) - 1:
        sys.exit(f"error: --items: {args.items} is smaller than the trained catalogue")
    valid, test = split_histories(args.work_dir / "sports-run")
    # (U, K, d) interests and each user's history to exclude
    tune, tune_exclude = encode_histories(
        bundle.encoder, catalogue_rows(bundle, valid[:TUNE_USERS])
    )
    sent = [h[-args.history :] for h in test[: args.users]]
    users, exclude = encode_histories(bundle.encoder, catalogue_rows(bundle, sent))
    table = grow_table(bundle.item_embeddings, args.items)  # (N + 1, d)
    items = torch.from_numpy(table)

    rows = []
    faiss.omp_set_num_threads(torch.get_num_threads())  # the builds as export runs them
    for nlist in args.lists:
        factory = f"IVF{nlist},SQ8"
        start = time.perf_counter()
        index = build_index(table, factory)
        built = time.perf_counter() - start
        tuning = tune_search_params(index, tune, items, 50, exclude=tune_exclude)
        recall = mean_and_error(recall_per_user(index, users, items, 50, exclude))
        print(f"{factory}: built in {built:.0f} s, tuned {tuning.search_params}, "
              f"recall@50 {recall[0]:.4f} ± {recall[1]:.4f}", flush=True)  # fmt: skip
        rows.append({"factory": factory, "index": index, "built": built,
                     "params": tuning.search_params, "recall": recall, "rates": []})  # fmt: skip

    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    timed = len(users) - len(users) % USERS_PER_CALL or len(users)
    for _ in range(args.rounds):
        for row in rows:
            start = time.perf_counter()
            for at in range(0, timed, USERS_PER_CALL):
                end = at + USERS_PER_CALL
                faiss_merged_topk(row["index"], users[at:end], table, 50, exclude[at:end])
            row["rates"].append(timed / (time.perf_counter() - start))

    base = np.mean(rows[0]["rates"])
    sent = f"the last {args.history} items" if args.history else "whole histories"
    print(f"\n{args.items:,} items, d={table.shape[1]}, K={users.shape[1]}, n=50; users/s on "
          f"one thread, {args.rounds} alternated rounds of {timed} test users "
          f"({sent})\n")  # fmt: skip
    header = ("index", "tuned", "recall@50 (test users, ± SE)", "users/s per round", "mean",
              "vs first", "build, s")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        mean = np.mean(row["rates"])
        rates = ", ".join(f"{r:.0f}" for r in row["rates"])
        print(f"| {row['factory']} | {row['params']} | {row['recall'][0]:.4f} ± "
              f"{row['recall'][1]:.4f} | {rates} | {mean:.0f} | {mean / base:.2f}x | "
              f"{row['built']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
