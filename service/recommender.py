"""The retrieval step as a plain function over a batch of users: ids -> rows, encode, search, merge.

Nothing here knows about HTTP, so the same code serves requests, batches concurrent requests
together and runs in benchmarks (bench/bench_service.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar, get_args

import faiss
import numpy as np
import torch

from remi_core.bundle import Bundle, BundleError, load_bundle
from remi_core.diversity import pool_size, rerank
from remi_core.index import GPU_MAX_K, ROW_OFFSET, to_best_device
from remi_core.models import MultiInterestEncoder, pad_histories
from remi_core.retrieval import (
    Retrieved,
    RetrievedBatch,
    ScreenTable,
    exact_merged_topk,
    faiss_merged_topk,
    max_row_norm,
    warm_exact_fallback,
)
from service.settings import ExactSearch

T = TypeVar("T")
# How exact (Flat) bundles are searched on the CPU: REMI_EXACT_SEARCH's choices, described with
# the setting (service/settings.py); bench/bench_serve_load.py compares them.
EXACT_SEARCH: tuple[str, ...] = get_args(ExactSearch)
log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One bundle ready to serve. Never mutated after loading, so a request that grabbed a
    reference keeps a consistent model even while the registry swaps in a newer one."""

    version: str
    path: Path
    manifest: Mapping[str, Any]
    encoder: MultiInterestEncoder
    device: torch.device
    item_embeddings: np.ndarray  # (N, d) float32, read-only
    item_table: torch.Tensor  # (N, d) the same memory as item_embeddings, never written
    item_ids: tuple[str | None, ...]  # row -> external id
    row_of: Mapping[str, int]  # external id -> row
    popularity: np.ndarray  # rows, most popular first, read-only
    index: faiss.Index
    index_device: str  # "cpu" or "gpu"
    loaded_at: float
    search_backend: str  # what answers searches: "screened-int8", "screened", "dense", "faiss"
    screen: ScreenTable | None = None  # the int8 or bfloat16 copy of the table when screened
    # max_i |e_i| (`max_row_norm`), taken once at load, for the exact searches' rounding bound
    # (and that of the exact search users an index leaves short fall back to)
    max_item_norm: float | None = None
    categories: np.ndarray | None = None  # (N,) int32 category per row (-1: none), read-only
    # The table the dense search runs on when it runs on the GPU (the encoder's own copy there);
    # None: it runs on the CPU, on item_table.
    gpu_table: torch.Tensor | None = field(default=None, repr=False)
    # The CPU index a GPU one was copied from: it answers searches deeper than a GPU selects
    # (GPU_MAX_K), e.g. diverse lists (4 x n candidates) or long histories to exclude.
    host_index: faiss.Index | None = field(default=None, repr=False)
    # GPU indexes are not safe to search from several threads at once; CPU ones are.
    _search_lock: threading.Lock | None = field(default=None, repr=False)

    @property
    def seq_len(self) -> int:
        return self.encoder.cfg.seq_len

    @property
    def num_interests(self) -> int:
        return self.encoder.num_interests

    @property
    def search_device(self) -> str:
        """Where searches run: "cpu", "gpu" (a faiss GPU index) or the dense search's CUDA
        device ("cuda:0")."""
        if self.search_backend == "faiss":
            return self.index_device
        return "cpu" if self.gpu_table is None else str(self.gpu_table.device)

    @property
    def batches_side_by_side(self) -> bool:
        """Whether batches gain from running side by side, one torch thread each: torch's exact
        search on the CPU runs compiled, without the GIL. An index search spreads each batch
        over the cores itself (faiss's OpenMP), and a GPU takes one batch at a time anyway."""
        return self.search_backend != "faiss" and self.device.type == "cpu"

    @property
    def num_items(self) -> int:
        """Real catalogue items, padding row excluded."""
        return len(self.item_ids) - ROW_OFFSET

    def search(
        self, interests: np.ndarray, n: Sequence[int], exclude: Sequence[np.ndarray] | None
    ) -> RetrievedBatch:
        """The merged top n[b] of each user (rows hold max(n) slots; exact search ranks the
        same way at any depth, so it searches once at the deepest)."""
        if self.search_backend != "faiss":
            return exact_merged_topk(
                interests,
                self.item_table if self.gpu_table is None else self.gpu_table,
                max(n),
                exclude,
                screen=self.screen,
                max_norm=self.max_item_norm,
            )
        index, lock = self.index, self._search_lock
        if self.host_index is not None:
            # The deepest a user's search can go: its n plus its history to exclude.
            deepest = max(n) + max((len(rows) for rows in exclude or ()), default=0)
            if deepest > GPU_MAX_K:
                index, lock = self.host_index, None
        with lock or nullcontext():
            return faiss_merged_topk(
                index,
                interests,
                self.item_table,
                n,
                exclude,
                wide_index=self.host_index,
                max_norm=self.max_item_norm,
            )


# The torch searches of an exact bundle, and the screen table each needs (None: float32 only).
SCREENS: dict[str, torch.dtype | None] = {
    "screened-int8": torch.int8,
    "screened": torch.bfloat16,
    "dense": None,
}


def choose_exact_search(
    items: torch.Tensor, screens: Mapping[str, ScreenTable | None], k: int, max_norm: float
) -> str:
    """The fastest of `screens` (name -> its screen table) on this host, for a batch of 16
    users (best of 5 runs each, taken in turns so a busy moment hits them all); one that fails
    to run is left out. All give the same answers, so only the speed depends on the choice.
    `max_norm`: the table's max_i |e_i| (`max_row_norm`), as the searches are given it."""
    if items.shape[0] < 2:  # nothing to time; smoke_test rejects an empty catalogue
        return "dense"
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(1, items.shape[0], (16, k), generator=gen)
    interests = items[rows].numpy()  # (16, K, d): interests that look like the catalogue
    timings = dict.fromkeys(screens, float("inf"))
    for turn in range(8):  # TorchScript optimises on its second call: three to warm up
        for name, table in screens.items():
            if name not in timings:
                continue
            start = time.perf_counter()
            try:
                exact_merged_topk(interests, items, 50, screen=table, max_norm=max_norm)
            except RuntimeError as exc:  # e.g. a torch build without this CPU's int8 matmul
                log.warning("exact search %s cannot run on this host: %s", name, exc)
                del timings[name]
                continue
            if turn >= 3:
                timings[name] = min(timings[name], time.perf_counter() - start)
    choice = min(timings, key=timings.__getitem__)
    spent = ", ".join(f"{name} {1e3 * t:.1f} ms" for name, t in timings.items())
    log.info("exact search: %s (per 16 users: %s)", choice, spent)
    return choice


def gpu_search(device: torch.device, exact_search: str) -> bool:
    """Whether searches run on the encoder's GPU: the dense search ("auto" or "dense"), in
    plain float32, for every bundle. An approximate (IVF, HNSW) bundle's index then goes
    unused: exact Eq. 7 on the GPU, over the table the encoder already keeps there, gives exact
    answers, at 1M items as fast as an IVF index on the host's CPU for one client and 3-5x
    faster under load (docs/benchmarks.md); "faiss" keeps the index.

    The rounding bound (`exact_merged_topk`) assumes float32 products; TF32 ones
    (torch.set_float32_matmul_precision("high")) are far coarser, so with those allowed it
    stays on the CPU. The screens' int8 and bfloat16 kernels are the CPU's."""
    if device.type != "cuda" or exact_search not in ("auto", "dense"):
        return False
    if _tf32_matmuls():
        log.warning("float32 matmuls may use TF32 in this process: no search on the GPU")
        return False
    return True


def _tf32_matmuls() -> bool:
    """Whether float32 matmuls on CUDA may round to TF32 in this process, by either of torch's
    APIs (set_float32_matmul_precision, which raises once the per-backend one was used; or
    torch.backends.cuda.matmul.fp32_precision, "none" deferring to torch.backends') or
    cuBLAS's own override."""
    if os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "0") not in ("", "0"):
        return True
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if matmul is None:  # a torch before the per-backend API
        return torch.get_float32_matmul_precision() != "highest"
    if matmul == "none":
        matmul = getattr(torch.backends, "fp32_precision", "none")
    return matmul == "tf32"


def _search_backend(
    index: faiss.Index, items: torch.Tensor, exact_search: str, k: int, max_norm: float
) -> tuple[str, ScreenTable | None]:
    """(what answers searches, the screen table it needs): torch for an exact (Flat) CPU index
    unless told "faiss", the index itself otherwise."""
    if not isinstance(index, faiss.IndexFlat) or exact_search == "faiss":
        return "faiss", None
    names = list(SCREENS) if exact_search == "auto" else [exact_search]
    screens = {
        name: None if SCREENS[name] is None else ScreenTable.of(items, SCREENS[name])
        for name in names
    }
    if exact_search == "auto":
        exact_search = choose_exact_search(items, screens, k, max_norm)
    return exact_search, screens[exact_search]


def model_from_bundle(
    bundle: Bundle, device: str | torch.device = "cpu", exact_search: str = "auto"
) -> LoadedModel:
    """Wrap a loaded bundle for serving: index on the best device, arrays frozen, and for an
    exact index the torch search chosen (`EXACT_SEARCH`)."""
    if exact_search not in EXACT_SEARCH:
        raise ValueError(f"exact_search must be one of {EXACT_SEARCH}, not {exact_search!r}")
    device = torch.device(device)
    on_gpu = gpu_search(device, exact_search)
    # Searched on the encoder's GPU, the bundle's index is not searched at all: moved to a GPU
    # too (faiss GPU builds), it would only take memory there.
    index, index_device = (bundle.index, "cpu") if on_gpu else to_best_device(bundle.index)
    embeddings = bundle.item_embeddings
    item_table = torch.from_numpy(embeddings)  # shares memory; made before the array is frozen
    k = bundle.encoder.num_interests
    max_norm = max_row_norm(item_table)  # once: every search's rounding bound needs it
    if on_gpu:
        backend, screen = "dense", None
    else:
        backend, screen = _search_backend(index, item_table, exact_search, k, max_norm)
    embeddings.setflags(write=False)
    popularity = bundle.popularity
    popularity.setflags(write=False)
    if bundle.categories is not None:
        bundle.categories.setflags(write=False)
    encoder = bundle.encoder.eval()
    for param in encoder.parameters():
        param.requires_grad_(False)
    weights = encoder.item_table()
    if weights.device.type == "cpu" and weights.dtype == item_table.dtype:
        # The encoder's input table is already the retrieval table's memory (load_bundle);
        # one tensor serves both.
        weights.data = item_table
    if encoder.cfg.model_type in PER_USER_PRODUCTS and weights.device.type == "cpu":
        _in_float64_after_the_table(encoder)
    gpu_table = None
    if on_gpu:
        # load_bundle checked the encoder's table equals the catalogue's: the copy already on
        # the GPU serves the search too.
        gpu_table = weights if weights.dtype == item_table.dtype else item_table.to(device)
    return LoadedModel(
        version=bundle.version,
        path=bundle.path,
        manifest=MappingProxyType(bundle.manifest),
        encoder=encoder,
        device=device,
        item_embeddings=embeddings,
        item_table=item_table,
        item_ids=tuple(bundle.item_ids),
        row_of=MappingProxyType(bundle.row_of()),
        popularity=popularity,
        index=index,
        index_device=index_device,
        loaded_at=time.time(),
        search_backend=backend,
        screen=screen,
        max_item_norm=max_norm,
        categories=bundle.categories,
        gpu_table=gpu_table,
        host_index=bundle.index if index_device == "gpu" else None,
        _search_lock=threading.Lock() if index_device == "gpu" else None,
    )


# Encoders whose matrix products have one row per user (youtube-dnn's linear layer, gru4rec's GRU
# and dense layer, comirec-dr's per-position maps): torch's CPU GEMM picks its summation order by
# the row count, so a user's interests changed in their last bits with the batch's size, and at
# near-ties the order of its items. ComiRec-SA and MIND have a row per history position: the
# same, but only while a batch has few rows (MIN_ENCODE_ROWS).
PER_USER_PRODUCTS = ("youtube-dnn", "gru4rec", "comirec-dr")
# Fewer rows than this (users x seq_len) are padded with copies of the first user: at up to 12
# (a lone user at seq_len 10) the GEMM summed in another order than for a batch of 64, and 63
# of 64 users' scores changed in their last bits alone (4 in their order at near-ties). From 16
# rows on, every window length 1-100 and d 16-256 tried gave the same bits as batches of 256.
MIN_ENCODE_ROWS = 32


def _encode(
    model: LoadedModel, items: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The encoder's interests (B, K, d) and routing (B, K, n) or None, on the model's device;
    a batch of fewer than MIN_ENCODE_ROWS rows is padded for the sums' order (see there)."""
    users = items.shape[0]
    short = -(-MIN_ENCODE_ROWS // model.seq_len) - users  # users to add
    if short > 0 and model.encoder.cfg.model_type not in PER_USER_PRODUCTS:
        items = torch.cat([items, items[:1].expand(short, -1)])
        mask = torch.cat([mask, mask[:1].expand(short, -1)])
    interests, routing = model.encoder(items.to(model.device), mask.to(model.device))
    return interests[:users], None if routing is None else routing[:users]


def _in_float64_after_the_table(encoder: MultiInterestEncoder) -> None:
    """Run everything after the item-table lookup in float64, so that whatever order a batch's
    shape gives the sums, they round to the same float32 interests (the service reads them as
    float32). The table stays float32, shared with the search; the rest is small."""
    table = encoder.item_embedding
    for child in encoder.children():
        if child is not table:
            child.double()
    for param in list(encoder.parameters(recurse=False)):
        param.data = param.data.double()
    table.register_forward_hook(lambda module, args, out: out.double())


def load_model(
    path: Path, device: str = "cpu", verify: bool = True, exact_search: str = "auto"
) -> LoadedModel:
    """Load, verify and smoke-test a bundle (a version directory or a root's `current`).

    Raises BundleError with a readable message for anything that would make it unservable.
    """
    try:
        bundle = load_bundle(path, device=device, verify=verify)
    except BundleError:
        raise
    except Exception as exc:
        # Whatever else a loader raises (e.g. safetensors on an unparseable weights file when
        # checksums are off) means the same thing: this bundle cannot serve.
        raise BundleError(f"cannot load bundle {path}: {type(exc).__name__}: {exc}") from exc
    model = model_from_bundle(bundle, device, exact_search)
    smoke_test(model)
    return model


def smoke_test(model: LoadedModel) -> None:
    """Run one real query end to end, so a bundle that loads but cannot serve is rejected.

    It runs twice: TorchScript optimises a compiled search on its second call (tens of ms at
    100k items), which should not land on the first request."""
    if model.num_items < 1:
        raise BundleError(f"{model.path}: the catalogue is empty")
    try:
        for _ in range(2):
            [result] = recommend_batch(
                model, [[model.item_ids[ROW_OFFSET]]], n=1, exclude_history=False
            )
    except Exception as exc:  # any failure here means the bundle cannot serve
        raise BundleError(f"{model.path}: test query failed: {exc}") from exc
    if result.fallback or len(result.item_ids) != 1 or not np.isfinite(result.scores[0]):
        raise BundleError(f"{model.path}: test query returned no finite score")
    if model.search_backend == "faiss":
        # The search fills a short list from the table for an index that is not Flat
        # (faiss_merged_topk), which would hide one that finds nothing (NaN vectors): asked
        # for an item's own vector, it must find something.
        query = np.ascontiguousarray(model.item_embeddings[ROW_OFFSET : ROW_OFFSET + 1])
        if int(model.index.search(query, 1)[1][0, 0]) < 0:
            raise BundleError(f"{model.path}: the index finds nothing for an item's own vector")
        wide_index = model.index if model.host_index is None else model.host_index
        warm_exact_fallback(wide_index, model.item_table)


@dataclass(frozen=True)
class RecommendedItem:
    item_id: str
    score: float | None  # max_k <v_k, e_item>; None for popularity fallback items
    interest: int | None  # argmax_k; None for popularity fallback items


@dataclass(frozen=True)
class Explanation:
    """What formed each interest: the K vectors and their routing over the encoded window."""

    window: list[str]  # the encoded items, oldest first
    interests: np.ndarray  # (K, d)
    # (K, len(window)), each row sums to 1; None for models without routing (K = 1 models)
    routing: np.ndarray | None


@dataclass(frozen=True)
class Result:
    """One user's answer as columns (cheap to build and to turn into JSON)."""

    item_ids: list[str]  # best first
    scores: list[float] | None  # max_k <v_k, e_item>; None for the popularity fallback
    interests: list[int] | None  # argmax_k; None for the popularity fallback
    unknown_ids: list[str]  # history ids not in this model's catalogue, first occurrence order
    known_count: int  # known history items (all of them, not just the encoded window)
    fallback: bool  # True when no known item was left and popularity answered
    explanation: Explanation | None = None
    # For the interest signals (service/signals.py): the rows returned, and the mean over
    # interests of the largest routing weight (None for a fallback, a model without routing, or
    # a one-item window).
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    routing_peak: float | None = None

    @property
    def items(self) -> list[RecommendedItem]:
        """The same answer as one object per item (for callers that prefer rows)."""
        if self.scores is None or self.interests is None:
            return [RecommendedItem(item, None, None) for item in self.item_ids]
        columns = zip(self.item_ids, self.scores, self.interests, strict=True)
        return [RecommendedItem(item, score, k) for item, score, k in columns]


def _per_entry(value: T | Sequence[T], size: int, name: str) -> list[T]:
    if isinstance(value, np.ndarray | Sequence) and not isinstance(value, str | bytes):
        if len(value) != size:
            raise ValueError(f"{name} has {len(value)} entries for {size} histories")
        return list(value)
    return [value] * size  # type: ignore[list-item]


def recommend_batch(
    model: LoadedModel,
    histories: Sequence[Sequence[str]],
    n: int | Sequence[int] = 50,
    exclude_history: bool | Sequence[bool] = True,
    explain: bool | Sequence[bool] = False,
    diversity: float | Sequence[float] = 0.0,
) -> list[Result]:
    """Top-n items for each history (external ids, oldest first), in one encode and one search.

    `n`, `exclude_history`, `explain` and `diversity` are either one value for all users or one
    per user, so unrelated requests can share a batch. Unknown ids are dropped and reported; the
    last seq_len known items are encoded; with no known item left, the most popular items answer
    instead. A user with diversity (lambda) > 0 gets ComiRec's greedy list, chosen from its own
    pool_size(n, lambda) best merged candidates (remi_core/diversity.py).
    """
    size = len(histories)
    ns = _per_entry(n, size, "n")
    excludes = _per_entry(exclude_history, size, "exclude_history")
    explains = _per_entry(explain, size, "explain")
    lambdas = _per_entry(diversity, size, "diversity")
    if any(k < 1 for k in ns):
        raise ValueError("n must be at least 1")
    if any(not lam >= 0 for lam in lambdas):
        raise ValueError("diversity must be at least 0")

    row_of = model.row_of
    known_rows: list[np.ndarray] = []
    unknown: list[list[str]] = []
    for history in histories:
        rows = [row_of.get(item, 0) for item in history]
        known_rows.append(np.asarray([r for r in rows if r > 0], dtype=np.int64))
        missing = (item for item, r in zip(history, rows, strict=True) if r == 0)
        unknown.append(list(dict.fromkeys(missing)))

    encoded = [b for b in range(size) if len(known_rows[b])]
    retrieved: dict[int, Retrieved] = {}
    peaks: dict[int, float | None] = {}
    explanations: dict[int, Explanation] = {}
    if encoded:
        windows = [known_rows[b][-model.seq_len :] for b in encoded]
        items, mask = pad_histories(windows, model.seq_len)
        with torch.inference_mode():
            interests_t, routing_t = _encode(model, items, mask)
        interests = interests_t.float().cpu().numpy()
        routing = routing_t.float().cpu().numpy() if routing_t is not None else None
        exclude = [known_rows[b] if excludes[b] else known_rows[b][:0] for b in encoded]
        depths = [pool_size(ns[b], lambdas[b]) for b in encoded]
        found = model.search(interests, depths, exclude)
        found = _diversify(found, [ns[b] for b in encoded], [lambdas[b] for b in encoded],
                           model.categories)  # fmt: skip
        peaks = dict(zip(encoded, _routing_peaks(routing, [len(w) for w in windows]), strict=True))
        for i, b in enumerate(encoded):
            retrieved[b] = found[i]
            if explains[b]:
                width = len(windows[i])
                explanations[b] = Explanation(
                    window=[model.item_ids[r] for r in windows[i]],  # type: ignore[misc]
                    interests=interests[i],
                    routing=routing[i, :, :width] if routing is not None else None,
                )

    results = []
    for b in range(size):
        if b in retrieved:
            hit, top = retrieved[b], ns[b]
            rows = hit.rows[:top]
            results.append(
                Result(
                    _ids(model, rows),
                    hit.scores[:top].tolist(),
                    hit.interests[:top].tolist(),
                    unknown[b],
                    len(known_rows[b]),
                    False,
                    explanations.get(b),
                    rows,
                    peaks[b],
                )
            )
        else:
            # Nothing known to exclude, so the popularity list answers as is.
            top_rows = model.popularity[: ns[b]]
            results.append(
                Result(_ids(model, top_rows), None, None, unknown[b], 0, True, None, top_rows)
            )
    return results


def _ids(model: LoadedModel, rows: np.ndarray) -> list[str]:
    """The external ids of catalogue rows, with calls that keep the GIL (tolist, a map over the
    id tuple): numpy's gather of object ids lets go of the GIL for a moment and takes it back,
    and a run of such short releases, one per user of a batch, kept the event loop waiting for
    the GIL for tens of ms (a waiting thread starts its switch interval over at each release it
    does not win)."""
    return list(map(model.item_ids.__getitem__, rows.tolist()))


def _diversify(
    found: RetrievedBatch, ns: list[int], lambdas: list[float], categories: np.ndarray | None
) -> RetrievedBatch:
    """The batch with the merged lists of users asking for diversity > 0 replaced by their
    greedy lists (the others' are untouched, so lambda 0 stays exactly Eq. 7)."""
    users = np.flatnonzero(np.asarray(lambdas) > 0)
    if not len(users):
        return found
    n, lam = np.asarray(ns)[users], np.asarray(lambdas)[users]
    rows, scores, interests, counts = rerank(
        found.rows[users], found.scores[users], found.interests[users], n, lam, categories
    )
    out = RetrievedBatch(
        found.rows.copy(), found.scores.copy(), found.interests.copy(), found.counts.copy()
    )
    width = rows.shape[1]
    out.rows[users], out.scores[users], out.interests[users] = 0, -np.inf, 0
    out.rows[users, :width], out.scores[users, :width] = rows, scores
    out.interests[users, :width], out.counts[users] = interests, counts
    return out


def _routing_peaks(routing: np.ndarray | None, lengths: list[int]) -> list[float | None]:
    """Per user, the mean over interests of the largest routing weight; None where it says
    nothing (no routing matrix, or one item, whose weight is 1 whatever the model)."""
    if routing is None:
        return [None] * len(lengths)
    peaks = routing.max(axis=2).mean(axis=1)  # (B,); padded positions carry no weight
    return [float(p) if length > 1 else None for p, length in zip(peaks, lengths, strict=True)]
