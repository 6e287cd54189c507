"""How long a compute thread keeps the event loop's thread waiting for the GIL (in process).

    python bench/bench_loop_lag.py                 # ~1 minute, idle cores
    python bench/bench_loop_lag.py --seconds 8 --items 20000
    python bench/bench_loop_lag.py --items 20000 --index-factory IVF128,Flat \
         --search-params nprobe=8

One thread runs the service's heaviest legal batch back to back: 256 users with histories of
1,000 ids and n=1000 through `recommend_batch` and `batch_json`, as a compute thread does. The
main thread, standing in for the event loop, sleeps 1 ms again and again and records how late
it wakes: the time it waited for the GIL. Variants, alternated in every round so a busy
machine slows all alike:

- `served`: the service's own path, at the switch intervals given (`--intervals`);
- `search, ...`: the batch's search, then each user's ids as the service makes them (a map
  over the id tuple), against numpy's gather of object ids per user, as the service did
  before (`id_array[rows].tolist()`), which lets go of the GIL for a moment and takes it
  back: a waiting thread then starts its switch interval over (docs/serving.md, "Large
  request bodies").

The garbage collector is set as the service sets it (GC_GEN0_THRESHOLD, the model frozen).
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from _args import positive_float, positive_floats, positive_int

from remi_core.threads import describe, prepare_environment, setup_threads

prepare_environment("spin")  # before torch and faiss load their OpenMP runtimes

import numpy as np
import torch

from remi_core.bundle import write_bundle
from remi_core.models import EncoderConfig, build_encoder, pad_histories
from service.app import GC_GEN0_THRESHOLD
from service.recommender import LoadedModel, _ids, load_model, recommend_batch
from service.responses import batch_json
from service.schemas import RecommendRequest

BATCH, HISTORY, N = 256, 1000, 1000  # REMI_MAX_BATCH, REMI_MAX_HISTORY, REMI_MAX_N


def lateness(work: Callable[[], object], seconds: float) -> np.ndarray:
    """ms by which each 1 ms sleep of this thread overran while `work` ran in another."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            work()

    worker = threading.Thread(target=loop)
    worker.start()
    late = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        time.sleep(0.001)
        late.append(time.perf_counter() - start - 0.001)
    stop.set()
    worker.join()
    return np.asarray(late) * 1e3


def search_then_ids(model: LoadedModel, interests: np.ndarray, exclude: list, gather: bool) -> None:
    """The batch's search, then each user's ids, scores and interests as lists: with the
    service's `_ids` (a map over the id tuple), or with numpy's gather of object ids."""
    found = model.search(interests, [N] * len(exclude), exclude)
    id_array = np.array(model.item_ids, dtype=object) if gather else None
    for hit in found:
        ids = id_array[hit.rows].tolist() if id_array is not None else _ids(model, hit.rows)
        ids, hit.scores.tolist(), hit.interests.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=positive_int, default=5000)
    parser.add_argument("--seconds", type=positive_float, default=4.0, help="per variant, round")
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument(
        "--intervals", type=positive_floats, default="0.5,1,5", help="switch intervals in ms"
    )
    parser.add_argument(
        "--index-factory", default="Flat", help="the bundle's Faiss index, e.g. IVF128,Flat"
    )
    parser.add_argument("--search-params", help="for an ANN index, e.g. nprobe=8")
    args = parser.parse_args()
    print("threads: " + describe(setup_threads(None, 1)))

    cfg = EncoderConfig(num_items=args.items + 1, dim=32, num_interests=4, seq_len=20)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ids = [None] + [f"catalogue-item-{i:012d}" for i in range(1, args.items + 1)]
    histories = [[ids[i] for i in rng.integers(1, args.items + 1, HISTORY)] for _ in range(BATCH)]
    entries = [RecommendRequest(history=h, n=N) for h in histories]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_bundle(Path(tmp), encoder=build_encoder(cfg), item_ids=ids,
                            popularity=np.arange(1, 101), metadata={}, publish=False,
                            index_factory=args.index_factory,
                            search_params=args.search_params)  # fmt: skip
        model = load_model(path)
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_GEN0_THRESHOLD), gen1, gen2)  # as the service's lifespan does
    gc.collect()
    gc.freeze()

    rows = [np.asarray([model.row_of[i] for i in h], np.int64) for h in histories]
    windows = [r[-model.seq_len :] for r in rows]
    items, mask = pad_histories(windows, model.seq_len)
    with torch.inference_mode():
        interests = model.encoder(items, mask)[0].float().numpy()

    def served() -> None:
        batch_json(model, entries, recommend_batch(model, histories, n=N))

    variants: dict[str, tuple[Callable[[], object], float]] = {
        f"served, interval {ms:g} ms": (served, ms) for ms in args.intervals
    }
    for gather, name in ((False, "search, ids as served"), (True, "search, numpy gather per user")):
        work = functools.partial(search_then_ids, model, interests, rows, gather)
        variants[f"{name}, 0.5 ms"] = (work, 0.5)
    print(f"catalogue {args.items} items, {args.index_factory} ({model.search_backend}), d=32, "
          f"K=4, {BATCH} users x {HISTORY} ids, n={N}; "
          f"{args.rounds} rounds of {args.seconds:g} s per variant")  # fmt: skip
    late: dict[str, list[np.ndarray]] = {name: [] for name in variants}
    default_interval = sys.getswitchinterval()
    try:
        for _ in range(args.rounds):
            for name, (work, ms) in variants.items():
                sys.setswitchinterval(ms / 1000)
                late[name].append(lateness(work, args.seconds))
    finally:
        sys.setswitchinterval(default_interval)
    print(f"{'variant':38s} {'p50':>6s} {'p99':>6s} {'p99.9':>6s} {'max':>6s}  (ms late)")
    for name, runs in late.items():
        all_late = np.concatenate(runs)
        p50, p99, p999 = np.percentile(all_late, [50, 99, 99.9])
        print(f"{name:38s} {p50:6.2f} {p99:6.2f} {p999:6.2f} {all_late.max():6.2f}")


if __name__ == "__main__":
    main()
