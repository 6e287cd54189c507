"""Faiss inner-product indexes over a catalogue's item embeddings: build, choose, tune.

`choose_factory` picks exact search for catalogues up to `EXACT_MAX_ITEMS` and an IVF index
above; `tune_search_params` raises the index's search parameter (nprobe, efSearch) until the
recall@n of the merged Eq. 7 list against exact Eq. 7 reaches a target on real user histories
(with a margin of three standard errors, and confirmed on users that took no part in choosing
the value, so it holds for users not measured).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import faiss
import numpy as np
import torch

from remi_core.retrieval import RetrievedBatch, exact_merged_topk, faiss_merged_topk

log = logging.getLogger(__name__)

# Index position p holds catalogue row p + ROW_OFFSET: padding row 0 is never indexed, so it can
# never be recommended.
ROW_OFFSET = 1

# Largest catalogue served by exact search when no index is named. Exact Eq. 7 costs time linear
# in the catalogue: bench/bench_serve_load.py measured about 900 users/s per core at 100k items
# (d=64, K=4, compute-bound: 51 MFLOP per user), so about 600 at 150k, twice a 300 req/s target
# on one core; IVF at recall@50 0.95 held 700-1,000 users/s per core at 1M items. Above this
# size the ANN index is the faster choice, below it exact search is fast enough and exact.
EXACT_MAX_ITEMS = 150_000
# Recall@n of the served list against exact Eq. 7 that tuning aims for by default, and the margin
# in standard errors of the measured mean that tuning keeps above it (see `assess`).
RECALL_TARGET = 0.95
RECALL_MARGIN_SE = 3.0
# Fewest users whose spread of recall tuning trusts for that margin.
MIN_TUNING_USERS = 30
# k-means for IVF trains on at most this many points per list (Faiss warns below 39): enough for
# stable centroids, and it keeps a 1M-item export to seconds instead of minutes.
IVF_TRAIN_POINTS_PER_LIST = 64
# Faiss's GPU indexes select at most this many results per query, and probe at most this many
# IVF lists (GPU_MAX_SELECTION_K in faiss/gpu/utils/DeviceDefs.cuh); past it a search raises.
GPU_MAX_K = 2048
# Most IVF lists `choose_factory` picks: k-means costs grow with the square of the lists (8,192 took
# 3 minutes on 2 cores for a 1M-item catalogue), and 8,192 already serve 10M items.
IVF_MAX_LISTS = 8192
# Values tried for each search parameter, cheapest first.
SEARCH_GRID = {
    "nprobe": (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048),
    "efSearch": (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048),
}


def choose_factory(num_items: int, exact_max_items: int = EXACT_MAX_ITEMS) -> str:
    """Index for a catalogue of num_items real items: "Flat" (exact) up to exact_max_items, else
    IVF with about 4 sqrt(N) lists (a power of two, at most IVF_MAX_LISTS), so a list holds about
    sqrt(N)/4 items.

    The lists hold 8-bit scalar-quantised vectors (SQ8): a quarter of the memory to scan, and the
    scan is memory-bound. The quantisation costs no accuracy in the served scores, because the
    merge rescores every candidate exactly, and no measurable recall: on the 1M-item benchmark
    catalogue IVF2048,SQ8 and IVF2048,Flat reached the same recall@50 at the same nprobe, SQ8
    about 1.5-2x faster. More, shorter lists scan less for the same recall: there, tuned to
    recall@50 0.95, 4,096 lists (nprobe=64) answered 1.18-1.38x the users/s of 2,048 (nprobe=48)
    and more than 8,192 (nprobe=96), whose build took 3-4x as long (bench/bench_ivf_lists.py)."""
    if num_items <= exact_max_items:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(num_items)))
    nlist = min(nlist, IVF_MAX_LISTS, 2 ** int(math.log2(num_items)))  # k-means: a point per list
    return f"IVF{nlist},SQ8"


def build_index(item_embeddings: np.ndarray, factory: str = "Flat") -> faiss.Index:
    """Inner-product index over rows 1.. of item_embeddings (N, d).

    `factory` is a Faiss index-factory string: "Flat" (exact, the default), or for large
    catalogues e.g. "IVF1024,Flat", "HNSW32" or "IVF1024,PQ16".
    """
    vectors = np.ascontiguousarray(item_embeddings[ROW_OFFSET:], dtype=np.float32)
    index = _new_index(vectors.shape[1], factory)
    try:
        if not index.is_trained:
            _train_ivf_centroids(index, vectors)
            # The lists' encoder trains on every vector: SQ8's value ranges from the k-means
            # sample clipped the items outside it, often the large-norm (popular) ones, which
            # then scored too low in the scan.
            index.train(vectors)
        index.add(vectors)
    except RuntimeError as exc:  # e.g. fewer training points than IVF lists
        raise ValueError(f"cannot build Faiss index {factory!r}: {exc}") from None
    return index


def _train_ivf_centroids(index: faiss.Index, vectors: np.ndarray) -> None:
    """k-means for an IVF index on IVF_TRAIN_POINTS_PER_LIST points per list: a seeded sample
    of ours for a plain IVF index with a flat quantizer (so that `train` then finds its
    centroids in place and only trains the lists' encoder, on every vector), Faiss's own sample
    otherwise (inside a wrapper; an HNSW quantizer, which Faiss trains on a flat one)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return
    ivf.cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_LIST
    wanted = IVF_TRAIN_POINTS_PER_LIST * ivf.nlist
    plain = isinstance(faiss.downcast_index(index), faiss.IndexIVF)
    flat = isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexFlat)
    if plain and flat and len(vectors) > wanted:
        picked = np.random.default_rng(0).choice(len(vectors), wanted, replace=False)
        sample = np.ascontiguousarray(vectors[np.sort(picked)])
        faiss.Clustering(ivf.d, ivf.nlist, ivf.cp).train(sample, ivf.quantizer)


def _new_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product index from a factory string; ValueError for one Faiss refuses."""
    if "NSG" in factory.upper():
        # Faiss's NSG build can spin for ever with inner products (NSG8 over 3,000 items).
        raise ValueError(f"index factory {factory!r}: NSG indexes are not supported, use HNSW")
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"invalid Faiss index factory string {factory!r}: {exc}") from None
    if any(isinstance(part, faiss.IndexIDMap) for part in wrapper_chain(index)):
        # An id map takes only add_with_ids; a bundle's index positions are its catalogue rows.
        raise ValueError(
            f"index factory {factory!r}: IDMap is not supported, the bundle maps index "
            "positions to item ids itself (drop the IDMap part)"
        )
    return index


def check_index_settings(
    dim: int, factory: str | None, search_params: str | None, recall_target: float
) -> None:
    """Raise ValueError for settings that building, tuning or applying an index would refuse,
    without any data: a nightly run checks them before it trains for hours."""
    if not 0 < recall_target <= 1:
        raise ValueError(f"recall target must be in (0, 1], not {recall_target}")
    if factory:
        index = _new_index(dim, factory)
        if search_params:
            apply_search_params(index, search_params)


def search_param_name(index: faiss.Index) -> str | None:
    """The parameter that trades speed for recall: nprobe (IVF), efSearch (HNSW), or None;
    also inside a wrapper (PCA32,HNSW4 was left at its default efSearch, recall 0.48)."""
    if faiss.try_extract_index_ivf(index) is not None:
        return "nprobe"
    if isinstance(wrapper_chain(index)[-1], faiss.IndexHNSW):
        return "efSearch"
    return None


def wrapper_chain(index: Any) -> list[faiss.Index]:
    """An index and the ones inside Faiss's wrappers (a transform in front, a refinement
    behind, an id map), outermost first, each downcast; [] for what is no Faiss index (a
    Python stand-in in tests)."""
    chain: list[faiss.Index] = []
    while isinstance(index, faiss.Index):
        chain.append(index := faiss.downcast_index(index))
        if isinstance(index, faiss.IndexRefine):
            index = index.base_index
        elif isinstance(index, faiss.IndexPreTransform | faiss.IndexIDMap):
            index = index.index
        else:
            break
    return chain


def apply_search_params(index: faiss.Index, params: str) -> None:
    """Set search-time parameters such as "nprobe=16" or "efSearch=128" (comma separated)."""
    if params:
        _check_search_widths(params)
        try:
            faiss.ParameterSpace().set_index_parameters(index, params)
        except RuntimeError as exc:
            raise ValueError(f"invalid Faiss search parameters {params!r}: {exc}") from None


def _check_search_widths(params: str) -> None:
    """nprobe and efSearch must be whole numbers of at least 1: Faiss takes 0 (efSearch=0 made
    the widening of short users loop for ever), wraps negatives and huge values to 2^64 - 1,
    and truncates 2.5 to 2."""
    for part in params.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name in SEARCH_GRID:
            value = value.strip()
            if not (value.isascii() and value.isdigit() and 1 <= int(value) < 2**31):
                raise ValueError(
                    f"invalid Faiss search parameters {params!r}: {name} must be a whole "
                    f"number from 1 to {2**31 - 1}, not {value!r}"
                )


def gpu_available() -> bool:
    """True when the installed faiss was built with GPU support and a GPU is visible."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def to_best_device(index: faiss.Index) -> tuple[faiss.Index, str]:
    """Move an index to GPU 0 when possible; returns the index and where it lives.

    An IVF index tuned to probe more lists than a GPU can (`GPU_MAX_K`) stays on the CPU: on
    the GPU every one of its searches would fail."""
    if not gpu_available():
        return index, "cpu"
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and ivf.nprobe > GPU_MAX_K:
        log.warning(
            "keeping the Faiss index on the CPU: nprobe=%d is more than a GPU probes (%d)",
            ivf.nprobe,
            GPU_MAX_K,
        )
        return index, "cpu"
    try:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
        gpu_index.referenced_resources = resources  # keep the resources alive with the index
        return gpu_index, "gpu"
    except RuntimeError as exc:  # e.g. an index type without a GPU implementation
        log.warning("keeping the Faiss index on the CPU: %s", exc)
        return index, "cpu"


@dataclass(frozen=True)
class Tuning:
    """Outcome of tuning an index on user histories (written into the bundle manifest)."""

    search_params: str  # what the service applies at load, e.g. "nprobe=32"; "" for exact
    recall: float  # mean over users of recall@n of the served list against exact Eq. 7
    recall_lower: float  # recall minus three standard errors: what tuning holds to the target
    n: int
    target: float
    queries: int  # users measured
    reached: bool  # recall_lower >= target (False: even the largest value tried fell short)

    def to_manifest(self) -> dict:
        return asdict(self)


def recall_per_user(
    index: faiss.Index,
    interests: np.ndarray,
    items: torch.Tensor,
    n: int,
    exclude: Sequence[np.ndarray] | None = None,
    exact: RetrievedBatch | None = None,
) -> np.ndarray:
    """(U,) recall@n per user of the served list against exact Eq. 7 (max over K): the share
    of the exact top n it holds, where an item scoring as high as the exact n-th counts as one
    of them (among items with equal scores either is a right answer).

    interests (U, K, d), items (N, d) the catalogue (row 0 padding); `exact` (the exact top n)
    may be passed when already computed (tuning measures many settings against one reference).
    A user with nothing left to recommend counts as 1.
    """
    if exact is None:
        exact = exact_merged_topk(interests, items, n, exclude)
    served = faiss_merged_topk(index, interests, items, n, exclude)
    recalls = np.ones(len(exact))
    for u, (truth, got) in enumerate(zip(exact, served, strict=True)):
        if not len(truth.rows):
            continue
        # The exact and served scores come from different matmuls: equal up to rounding.
        cut = truth.scores[-1] - 1e-6 * max(1.0, abs(float(truth.scores[-1])))
        found = np.isin(got.rows, truth.rows) | (got.scores >= cut)
        recalls[u] = min(int(found.sum()), len(truth.rows)) / len(truth.rows)
    return recalls


def measure_recall(
    index: faiss.Index,
    interests: np.ndarray,
    items: torch.Tensor,
    n: int,
    exclude: Sequence[np.ndarray] | None = None,
) -> float:
    """Mean recall@n of the index's merged list against exact Eq. 7 (see recall_per_user)."""
    return float(recall_per_user(index, interests, items, n, exclude).mean())


def mean_and_error(recalls: np.ndarray) -> tuple[float, float]:
    """Mean of per-user recalls and its standard error (0 for a single user)."""
    mean = float(recalls.mean())
    spread = float(recalls.std(ddof=1)) if len(recalls) > 1 else 0.0
    return mean, spread / math.sqrt(len(recalls))


def assess(
    index: faiss.Index,
    params: str,
    interests: np.ndarray,
    items: torch.Tensor,
    n: int = 50,
    target: float = RECALL_TARGET,
    exclude: Sequence[np.ndarray] | None = None,
    exact: RetrievedBatch | None = None,
) -> Tuning:
    """Apply `params` to the index and measure its recall@n against the target.

    "Reached" means the mean minus three standard errors reaches the target, so that the users
    the service will see get it too, not just the ones measured. Samples differ more than one
    would like: on the benchmark's 1M catalogue at nprobe=48, four disjoint sets of 1,000 Sports
    users gave 0.963, 0.950, 0.950 and 0.954 (per-user standard deviation 0.1). Under
    `MIN_TUNING_USERS` users the spread says nothing (one user has none) and the target is
    never counted as reached.
    """
    if not 0 < target <= 1:
        raise ValueError(f"recall target must be in (0, 1], not {target}")
    apply_search_params(index, params)
    recalls = recall_per_user(index, interests, items, n, exclude, exact)
    mean, error = mean_and_error(recalls)
    lower = mean - RECALL_MARGIN_SE * error
    reached = len(recalls) >= MIN_TUNING_USERS and (lower >= target or mean == 1.0)
    return Tuning(params, mean, lower, n, target, len(recalls), reached)


def tune_search_params(
    index: faiss.Index,
    interests: np.ndarray,
    items: torch.Tensor,
    n: int = 50,
    target: float = RECALL_TARGET,
    exclude: Sequence[np.ndarray] | None = None,
) -> Tuning:
    """Smallest value of the index's search parameter whose recall@n reaches `target` (see
    `assess`) on one half of the users (a seeded split) and then on the other.

    Stopping at the first value whose measured recall clears the bar favours values measured
    high by chance: on the benchmark's 1M catalogue the 2,000 users that chose nprobe=24 read
    0.960 there, 8,000 other users 0.951. The half that confirms a value took no part in
    choosing it, so its measurement, which is what the returned `Tuning` reports, is a fair
    estimate for users not measured. Exact indexes are measured once, on all users. The chosen
    parameter is left applied to `index`. If no value is confirmed, the largest one tried is
    kept and `reached` is False.
    """
    if not 0 < target <= 1:
        raise ValueError(f"recall target must be in (0, 1], not {target}")
    name = search_param_name(index)
    grid = SEARCH_GRID.get(name or "", ())
    if not grid:  # exact (or a type without a known parameter): nothing to choose
        return assess(index, "", interests, items, n, target, exclude)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        grid = tuple(v for v in grid if v < ivf.nlist) + (ivf.nlist,)  # nlist: every list
    if len(interests) < 2 * MIN_TUNING_USERS:
        widest = assess(index, f"{name}={grid[-1]}", interests, items, n, target, exclude)
        log.warning("recall@%d measured on %d users, too few to choose a setting and confirm it "
                    "(at least %d in each half): keeping the widest, %s", n, widest.queries,
                    MIN_TUNING_USERS, widest.search_params)  # fmt: skip
        return replace(widest, reached=False)
    choose, confirm = (
        _users(interests, items, n, exclude, half) for half in halves(len(interests))
    )
    tuning = None
    for value in grid:
        params = f"{name}={value}"
        chosen = assess(index, params, n=n, target=target, **choose)
        log.info("index tuning: %s recall@%d = %.4f (>= %.4f) on %d users", params, n,
                 chosen.recall, chosen.recall_lower, chosen.queries)  # fmt: skip
        if not chosen.reached and value != grid[-1]:
            continue
        tuning = assess(index, params, n=n, target=target, **confirm)
        log.info("index tuning: %s confirmed on %d other users: recall@%d = %.4f (>= %.4f)",
                 params, tuning.queries, n, tuning.recall, tuning.recall_lower)  # fmt: skip
        if tuning.reached:
            break
    assert tuning is not None  # the grid's last value is always measured on the second half
    if not tuning.reached:
        log.warning("recall@%d %.4f is below the target %.2f at %s", n, tuning.recall, target,
                    tuning.search_params)  # fmt: skip
    return tuning


def halves(users: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the users that choose a search parameter and of those that confirm it: a
    seeded split in two, so the same users give the same choice."""
    choose, confirm = np.array_split(np.random.default_rng(0).permutation(users), 2)
    return choose, confirm


def _users(
    interests: np.ndarray,
    items: torch.Tensor,
    n: int,
    exclude: Sequence[np.ndarray] | None,
    picked: np.ndarray,
) -> dict[str, Any]:
    """`assess`'s arguments for the users `picked`: their interests and exclusions, the
    catalogue, and their exact top n (computed once, shared by every value tried)."""
    own = interests[picked]
    own_exclude = None if exclude is None else [exclude[u] for u in picked]
    exact = exact_merged_topk(own, items, n, own_exclude)
    return {"interests": own, "items": items, "exclude": own_exclude, "exact": exact}
