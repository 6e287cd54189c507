"""Eq. 7 of the REMI paper: K top-N searches merged by max score.

Every interest vector retrieves its own top-N; an item's score is its best inner product over
the K interests; the top-N of the merged candidates are returned. With exact per-interest search
this equals the top-N of max_k <v_k, e_i> over the whole catalogue: an item that some interest
under-scores because it missed that interest's list is beaten by at least N items that made it,
so it cannot enter the merged top-N. `dense_merged_topk` uses that identity for evaluation;
the serving paths are `exact_merged_topk` (the same identity, blocked for the cache, optionally
screened in bfloat16 or int8, see `ScreenTable`) and `faiss_merged_topk` (K searches of an
index). Both serving paths end in the same merge (`_merge`; `merge_candidates` for the index
path), which rescores candidates exactly, drops excluded rows and breaks ties by the smaller
row, so served lists are deterministic and identical whichever users share a batch (for an
index, up to which of several items with exactly equal scores it keeps at a list's cut); the dense
evaluation path leaves the order of exactly equal scores to `topk`, which does not promise one.
All of them skip padding row 0. The serving paths' tensor work runs compiled by TorchScript
(`compiled`), so a batch's search holds the GIL for two calls instead of a few dozen small ones.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retrieved:
    """One user's merged result, best first."""

    rows: np.ndarray  # (n,) int64 catalogue rows
    scores: np.ndarray  # (n,) float32 max_k <v_k, e_row>
    interests: np.ndarray  # (n,) int64 argmax_k, the interest that produced each item


@dataclass(frozen=True)
class RetrievedBatch:
    """Merged results of B users as arrays; user b's list is the first counts[b] entries.

    Indexing or iterating gives one `Retrieved` per user (views, no copies).
    """

    rows: np.ndarray  # (B, n) int64, 0 past counts[b]
    scores: np.ndarray  # (B, n) float32, -inf past counts[b]
    interests: np.ndarray  # (B, n) int64
    counts: np.ndarray  # (B,) int64

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, b: int) -> Retrieved:
        c = int(self.counts[b])
        return Retrieved(self.rows[b, :c], self.scores[b, :c], self.interests[b, :c])

    def __iter__(self) -> Iterator[Retrieved]:
        return (self[b] for b in range(len(self)))


def pad_rows(rows: Sequence[np.ndarray] | None, batch: int) -> np.ndarray:
    """Per-user row lists -> (B, L) int64, padded with row 0 (padding, never a result)."""
    width = max((len(r) for r in rows), default=0) if rows is not None else 0
    out = np.zeros((batch, width), dtype=np.int64)
    if rows is not None:
        for b, r in enumerate(rows):
            out[b, : len(r)] = r
    return out


def blocked_max_scores(
    interests: torch.Tensor, items: torch.Tensor, block: int | None = None
) -> torch.Tensor:
    """max_k <v_k, e_i> for every user and item: interests (B, K, d), items (N, d) -> (B, N)
    float32 (bfloat16 products are widened: torch's elementwise kernels are several times
    slower on bfloat16 than on float32 on the CPU).

    The (B, K, N) score tensor is never materialised: items are scored `block` at a time, so
    each (B*K, block) product stays in cache and is reduced over K before the next block.
    """
    batch, k, dim = interests.shape
    size = items.shape[0]
    if block is None:
        # ~2 MB of float32 products on a CPU (cache); 256 MB on a GPU, where each block is a
        # few kernel launches and small ones leave its cores idle.
        budget = 1 << 26 if interests.device.type == "cuda" else 1 << 19
        block = max(256, budget // max(1, batch * k))
    queries = interests.reshape(batch * k, dim)
    out = torch.empty(batch, size, dtype=torch.float32, device=interests.device)
    for start in range(0, size, block):
        stop = min(start + block, size)
        part = (queries @ items[start:stop].T).float()  # (B*K, block)
        out[:, start:stop] = part.view(batch, k, stop - start).amax(dim=1)
    return out


def dense_merged_topk(
    interests: torch.Tensor,
    items: torch.Tensor,
    n: int,
    exclude: torch.Tensor | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Eq. 7 by brute force: top-n rows of max_k scores, on whatever device the inputs use.

    interests (B, K, d), items (N, d) with row 0 padding, exclude (B, N) bool or None
    -> scores (B, n), rows (B, n). `chunk` users are scored at a time (default: sized to the
    device, see `_chunk_users`).
    """
    n = min(n, items.shape[0] - 1)
    chunk = chunk or _chunk_users(interests.shape[1], items.shape[0], items.device)
    out_scores, out_rows = [], []
    for start in range(0, interests.shape[0], chunk):
        v = interests[start : start + chunk]
        scores = torch.einsum("bkd,nd->bkn", v, items).amax(dim=1)  # (b, N)
        scores[:, 0] = -torch.inf
        if exclude is not None:
            scores = scores.masked_fill(exclude[start : start + chunk], -torch.inf)
        top_scores, top_rows = scores.topk(n, dim=1)
        out_scores.append(top_scores)
        out_rows.append(top_rows)
    return torch.cat(out_scores), torch.cat(out_rows)


def _chunk_users(k: int, n_items: int, device: torch.device) -> int:
    # The (chunk, K, N) score block is the working set. On a CPU a block of a few MB stays in
    # cache and its pages are reused; a 100 MB block per chunk made Beauty's validation 2.5x
    # slower. A GPU wants big blocks to fill its cores.
    budget = 2**26 if device.type == "cuda" else 2**21  # float32 elements: 256 MB / 8 MB
    return max(1, budget // (k * n_items))


# How far a bfloat16 score can be from the float32 score `merge_candidates` computes, relative
# to |v| |e| (Cauchy-Schwarz): rounding v and e to bfloat16 (unit roundoff u = 2^-8) moves each
# product by at most (2u + u^2) |v_j e_j|, rounding the float32-accumulated sum back to bfloat16
# adds u, and float32 accumulation on either side adds d * 2^-24 -- under 0.0118 in all for
# d <= 1024. 2^-6 leaves a third on top of that.
SCREEN_ERROR = 2.0**-6
# The screen looks for its rows block by block (`_pool`): blocks of this many catalogue rows, when
# the catalogue has at least SCREEN_BLOCK_DEPTH * n blocks (100k items: n up to 195).
SCREEN_BLOCK = 32
SCREEN_BLOCK_DEPTH = 16
# Above this many candidates per user the screen has failed to prune (e.g. a catalogue of
# near-identical items) and gathering them all would cost more than scoring in float32.
SCREEN_MAX_CANDIDATES = 4096
# Catalogue rows per int8 matmul. Of 2048-16384, 4096 was the fastest or within 1% at 8 to 64
# users in the whole search (100k items, d=64, K=4); larger blocks help a lone user (16384:
# 0.53 against 0.59 ms) and cost at 64 users (0.35 against 0.28 ms per user).
SCREEN_INT8_ROWS = 4096
# The int8 table's measured errors are rounded up by this factor, so the bound holds for the
# float64 values they were computed from too.
_UP = 1 + 2.0**-20


@dataclass(frozen=True)
class ScreenTable:
    """A low-precision copy of the catalogue for screening exact search (see
    `exact_merged_topk`): bfloat16, or int8 codes q_i with one scale for the table,
    e_i ~ scale * q_i, and the rounding's largest error measured on the table itself."""

    table: torch.Tensor  # (N, d) bfloat16, or int8 (N, d') with d' = d rounded up to 8
    max_norm: float  # max_i |e_i| over the float32 rows
    scale: float = 1.0  # int8: the codes' step
    residual: float = 0.0  # int8: max_i |e_i - scale * q_i|
    code_norm: float = 0.0  # int8: max_i |scale * q_i|

    @classmethod
    def of(cls, items: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> ScreenTable:
        """Screen table of items (N, d) float32, in bfloat16 or int8."""
        if dtype not in (torch.bfloat16, torch.int8):
            raise ValueError(f"a screen table is bfloat16 or int8, not {dtype}")
        items = items.float()
        # In float64 (`max_row_norm`, as the residuals below): float32 squares underflow for
        # tiny rows, and a zero norm a zero slack.
        max_norm = max_row_norm(items)
        if dtype == torch.bfloat16:
            return cls(items.to(torch.bfloat16).contiguous(), max_norm)
        wide = items.double()
        # One step for the whole table: the screen's slack is one number per user, set by the
        # rows with the largest rounding error, so a step per row would not make it smaller.
        scale = float(items.abs().max()) / 127 or 1.0
        codes = torch.round(items / scale).clamp(-127, 127).to(torch.int8)
        decoded = codes.double() * scale
        residual = torch.linalg.vector_norm(wide - decoded, dim=1).max()
        code_norm = torch.linalg.vector_norm(decoded, dim=1).max()
        # Zero columns up to a multiple of 8 change no dot product, and spare `torch._int_mm`
        # odd inner sizes (with 1 it returns garbage on the CPU, torch 2.13).
        codes = torch.nn.functional.pad(codes, (0, -codes.shape[1] % 8)).contiguous()
        return cls(codes, max_norm, scale, float(residual) * _UP, float(code_norm) * _UP)

    def spec(self) -> Screen:
        """What the compiled search needs, with the module's current settings."""
        return Screen(
            self.table,
            2 * SCREEN_ERROR * self.max_norm,
            SCREEN_BLOCK,
            SCREEN_BLOCK_DEPTH,
            SCREEN_MAX_CANDIDATES,
            SCREEN_INT8_ROWS,
            self.scale,
            self.residual,
            self.code_norm,
            max(self.max_norm, self.code_norm),
        )


class Screen(NamedTuple):
    """A ScreenTable as the compiled functions take it (TorchScript reads neither dataclasses
    nor module constants)."""

    table: torch.Tensor  # (N, d) bfloat16 or int8
    slack_per_norm: float  # bfloat16: 2 * SCREEN_ERROR * max_i |e_i|, per unit of max_k |v_k|
    block: int  # SCREEN_BLOCK
    depth: int  # SCREEN_BLOCK_DEPTH
    max_candidates: int  # SCREEN_MAX_CANDIDATES
    int8_rows: int  # SCREEN_INT8_ROWS
    scale: float  # int8: ScreenTable.scale
    residual: float  # int8: ScreenTable.residual
    code_norm: float  # int8: ScreenTable.code_norm
    row_norm: float  # int8: max(max_i |e_i|, code_norm)


def compiled(fn: F) -> F:
    """fn compiled by TorchScript, or fn itself where TorchScript cannot compile it.

    Why: a compiled call runs all of fn's tensor operations without taking Python's GIL, so the
    service's compute threads (and its event loop) run side by side; run eagerly, every small
    torch call takes the GIL back, and a second compute thread barely adds throughput. The
    interpreter's lower per-operation overhead also helps small batches. TorchScript is
    deprecated in torch 2.x but still ships; should a torch drop it, the eager function gives
    the same answers (tests/core/test_retrieval_fast.py runs both).
    """
    if fn not in _COMPILED:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                _COMPILED[fn] = torch.jit.script(fn)
        except Exception as exc:  # noqa: BLE001 -- any failure means: run it eagerly
            log.warning("TorchScript cannot compile %s, running it eagerly: %s", fn.__name__, exc)
            _COMPILED[fn] = fn
    return _COMPILED[fn]


_COMPILED: dict[Callable[..., Any], Callable[..., Any]] = {}


def exact_merged_topk(
    interests: np.ndarray,
    items: torch.Tensor,
    n: int,
    exclude: Sequence[np.ndarray] | None = None,
    users_per_chunk: int | None = None,
    screen: ScreenTable | None = None,
    eager: bool = False,
    max_norm: float | None = None,
) -> RetrievedBatch:
    """Serving path for exact search without an index: dense Eq. 7 in torch, then the merge.

    interests (B, K, d), items (N, d) the catalogue (row 0 padding) as a tensor on the device
    that searches: the CPU, or a GPU for the dense search (the screens' int8 and bfloat16
    products are tuned for, and tested on, CPUs). Users go `users_per_chunk` at a time
    (default: up to 64 on a CPU, fewer for huge catalogues, so the (chunk, N) max-score matrix
    stays at most 32 MB; on a GPU up to 256 MB); within a chunk `blocked_max_scores` keeps the
    products in cache. The chunks' top-n rows then go through one merge for the batch, so
    scores, interests and tie order match the index path.

    With `screen`, the catalogue is scored in bfloat16 (half the memory traffic, and twice the
    multiply rate on CPUs with bfloat16 dot products) or int8 (a quarter of the traffic, and
    integer dot products) and only the rows whose score could reach the user's n-th under the
    rounding's bound go to the merge, which rescores them in float32: the same answer, ties
    included (see `_screened`).

    Unscreened, the rows kept for the merge are those within float32's rounding of the n-th
    best ((d + 2) 2^-22 max_k |v_k| max_i |e_i|, twice over, `_near_the_cut`): the merge's own
    products round differently, and only rows it might rank in the top n must reach it.
    `max_norm` is max_i |e_i| (from `screen`, or computed here when neither is given: a pass
    over the table, 20 ms at 100k items, so callers searching one table again and again pass
    it, as the service does).

    The search runs compiled (`compiled`) unless `eager`.
    """
    batch = interests.shape[0]
    if max_norm is None:
        max_norm = screen.max_norm if screen is not None else max_row_norm(items)
    excluded = pad_rows(exclude, batch)
    where = items.device
    if users_per_chunk is None:  # (chunk, N) float32 scores of at most 32 MB, or 256 MB
        size = items.shape[0]
        cuda = where.type == "cuda"
        users_per_chunk = max(1, 2**26 // size) if cuda else max(1, min(64, 2**23 // size))
    v = torch.from_numpy(np.ascontiguousarray(interests, dtype=np.float32)).to(where)
    spec = screen.spec() if screen is not None else None
    search = _exact_search if eager else compiled(_exact_search)
    with torch.inference_mode():
        found = search(
            v, items, spec, torch.from_numpy(excluded).to(where), n, users_per_chunk, max_norm
        )
    return RetrievedBatch(*(t.cpu().numpy() for t in found))


def max_row_norm(items: torch.Tensor) -> float:
    """max_i |e_i| over a table's rows, in float64 (float32 squares overflow for huge rows and
    underflow for tiny ones)."""
    most = 0.0
    for start in range(0, items.shape[0], 1 << 16):  # a float64 copy of 65,536 rows at a time
        part = items[start : start + (1 << 16)].double()
        most = max(most, float(torch.linalg.vector_norm(part, dim=1).max()))
    return most


def _exact_search(
    interests: torch.Tensor,
    items: torch.Tensor,
    screen: Screen | None,
    excluded: torch.Tensor,
    n: int,
    users_per_chunk: int,
    max_norm: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`exact_merged_topk` on tensors: interests (B, K, d), excluded (B, L) -> rows, scores,
    interests (B, n'), counts (B,), n' = min(n, the most candidates any user had)."""
    batch = interests.shape[0]
    n = min(n, items.shape[0] - 1)
    if n <= 0:  # nothing asked for, or a catalogue of padding only
        empty = torch.zeros(batch, 0, dtype=torch.int64, device=items.device)
        return _merge(interests, empty, items, 0, excluded)
    chunks: list[torch.Tensor] = []
    for start in range(0, batch, users_per_chunk):
        v = interests[start : start + users_per_chunk]
        ex = excluded[start : start + users_per_chunk]
        rows: torch.Tensor | None = None
        if screen is not None:
            rows = _screened(v, screen, ex, n)
        if rows is None:
            scores = _max_scores(blocked_max_scores(v, items), ex)
            rows = _near_the_cut(scores, n, _rounding_slack(v, max_norm))
        chunks.append(rows)
    # One merge for the batch; row 0 pads the chunks' candidate lists to one width.
    width = max([c.shape[1] for c in chunks] + [0])
    candidates = torch.zeros(batch, width, dtype=torch.int64, device=items.device)
    for i, rows in enumerate(chunks):
        start = i * users_per_chunk
        candidates[start : start + rows.shape[0], : rows.shape[1]] = rows
    return _merge(interests, candidates, items, n, excluded)


def _max_scores(scores: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """scores (b, N) with padding row 0 and each user's excluded rows (b, L) set to -inf."""
    scores[:, 0] = float("-inf")
    if excluded.shape[1] > 0:
        # Rows outside the catalogue exclude nothing (as in the merge); as indices they crashed.
        inside = (excluded > 0) & (excluded < scores.shape[1])
        excluded = torch.where(inside, excluded, torch.zeros_like(excluded))
        scores.scatter_(1, excluded, float("-inf"))  # padding 0 is row 0 anyway
    return scores


def _screened(
    interests: torch.Tensor, screen: Screen, excluded: torch.Tensor, n: int
) -> torch.Tensor | None:
    """Candidate rows (b, M) holding every row of each user's exact top-n, ties included, in
    ascending row order; None when the screen keeps more than screen.max_candidates rows for
    some user.

    With s the float32 score and t the screen's (bfloat16, or int8 in its own units, see
    `_int8_max_scores`), |s - t| <= err: for bfloat16 err = SCREEN_ERROR * max_k |v_k| *
    max_i |e_i|. The user's n best rows by t all have s >= kth - err (kth: their n-th t), so
    the n-th best s is at least that, and any row scoring at least the n-th best s has
    t >= kth - 2 err: keeping those rows keeps the top n and every row tied with its last.
    kth and the kept rows are found among the rows of `_pool` (all rows, or the blocks that can
    hold them), which holds every row with t >= kth - 2 err, so they are the same either way.
    """
    scores, slack = _screen_scores(interests, screen)  # (b, N), (b,)
    if not bool(torch.isfinite(slack).all()):
        return None  # non-finite interests, or magnitudes past the bound's float range
    scores = _max_scores(scores, excluded)
    pool, pool_rows = _pool(scores, n, slack, screen.block, screen.depth)  # (b, P), (b, P)/None
    kth = pool.topk(n, dim=1).values[:, -1]  # (b,)
    floor = kth - slack  # (b,), -inf with < n rows left
    keep = (pool >= floor.unsqueeze(1)) & (pool > float("-inf"))  # (b, P)
    users, cols = keep.nonzero().unbind(1)  # grouped by user, in pool (= row) order
    rows = cols if pool_rows is None else pool_rows[users, cols]
    slot, counts = _slots(users, keep.shape[0])
    most = int(counts.max())
    if most > screen.max_candidates:
        return None
    out = torch.zeros(keep.shape[0], most, dtype=torch.int64, device=rows.device)
    out[users, slot] = rows
    return out


def _screen_scores(interests: torch.Tensor, screen: Screen) -> tuple[torch.Tensor, torch.Tensor]:
    """The screen's max_k scores (b, N) for interests (b, K, d), and 2 err (b,) in their units:
    bfloat16 scores, or int8 ones in units of their own (`_int8_max_scores`)."""
    if screen.table.dtype == torch.int8:
        return _int8_max_scores(interests, screen)
    scores = blocked_max_scores(interests.to(torch.bfloat16), screen.table)
    norms = torch.linalg.vector_norm(interests.double(), dim=2).amax(dim=1)  # (b,)
    # Products below float32's smallest normal number (2^-126) may be flushed to zero, on each
    # side: an error of up to d of them per score that no relative bound covers.
    flushed = 2 * (interests.shape[2] + 2) * 2.0**-126
    return scores, (screen.slack_per_norm * norms + flushed).float()


def _int8_max_scores(interests: torch.Tensor, screen: Screen) -> tuple[torch.Tensor, torch.Tensor]:
    """max_k <p_k, q_i> for every user and row -> (b, N) float32 (integers), and 2 err (b,),
    in units of step_b * scale, the user's int8 codes p_k ~ v_k / step_b.

    With r_i = e_i - scale q_i and rho_k = v_k - step_b p_k, v_k.e_i - step_b scale p_k.q_i =
    v_k.r_i + scale q_i.rho_k, at most |v_k| |r_i| + |scale q_i| |rho_k| (Cauchy-Schwarz), and
    the maximum over K moves by no more than its terms do. The float32 score the merge computes
    is within d 2^-24 |v_k| |e_i| of the exact one, and so is this rho's rounding; (d + 2)
    2^-22 covers both twice over. The integer sums are exact (|p.q| <= 127^2 d fits int32 and,
    for d <= 1040, float32).
    """
    batch, k, dim = interests.shape
    step = interests.abs().amax(dim=2).amax(dim=1) / 127  # (b,)
    step = torch.where(step > 0, step, torch.ones_like(step))  # all-zero interests: any step
    # The bound in units of step_b (|v_k| = step_b |v_k / step_b|, and so on), where every
    # entry is at most 127: norms of tiny interests, squared in float32, underflowed to a zero
    # slack, and step_b cancels from the slack below.
    units = interests / step.view(batch, 1, 1)  # (b, K, d)
    codes = torch.round(units).clamp(-127, 127)  # (b, K, d)
    rounding = torch.linalg.vector_norm(units - codes, dim=2).amax(dim=1)  # (b,) |rho| / step_b
    norms = torch.linalg.vector_norm(units, dim=2).amax(dim=1)  # (b,) |v| / step_b
    err = norms * screen.residual + rounding * screen.code_norm
    err = err + (dim + 2) * 2.0**-22 * (norms + rounding) * screen.row_norm
    queries = codes.to(torch.int8).reshape(batch * k, dim)
    width = screen.table.shape[1]  # d rounded up to 8 (`ScreenTable.of`)
    if width != dim:
        queries = torch.nn.functional.pad(queries, (0, width - dim))
    size = screen.table.shape[0]
    out = torch.empty(batch, size, dtype=torch.float32, device=interests.device)
    for start in range(0, size, screen.int8_rows):
        stop = min(start + screen.int8_rows, size)
        part = torch._int_mm(queries, screen.table[start:stop].T)  # (b*K, rows) int32
        out[:, start:stop] = part.view(batch, k, stop - start).amax(dim=1)
    return out, 2 * err / screen.scale


def _pool(
    scores: torch.Tensor, n: int, slack: torch.Tensor, block: int, depth: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Where `_screened` looks for its rows: scores (b, N) in blocks of `block` rows, only the
    blocks whose best score is within `slack` (b,) of the n-th best block maximum ->
    pool (b, P) scores (-inf pads), rows (b, P) their rows, in ascending order. Or (scores,
    None) when blocks cannot help: fewer than `depth` * n blocks (n too deep for the
    catalogue), or a user with fewer than n blocks left.

    Each of the n best blocks holds a row scoring at least their lowest maximum `low`, so the
    n-th best score is >= low, and a block without a row >= low - slack cannot hold a kept row.
    Passing over (b, N) once for block maxima instead of three times (top n, compare, nonzero)
    made the screen ~25% faster at n=50 and 100k items; a deep n keeps most blocks and is
    slower, hence SCREEN_BLOCK_DEPTH.
    """
    batch, size = scores.shape
    full = size // block
    if full < depth * n:
        return scores, None
    maxima = scores[:, : full * block].reshape(batch, full, block).amax(dim=2)
    if full * block < size:  # the last, shorter block
        maxima = torch.cat([maxima, scores[:, full * block :].amax(1, keepdim=True)], 1)
    low = maxima.topk(n, dim=1).values[:, -1]  # (b,)
    if not bool(torch.isfinite(low).all()):
        return scores, None
    users, blocks = (maxima >= (low - slack).unsqueeze(1)).nonzero().unbind(1)  # (S,)
    slot, per_user = _slots(users, batch)
    rows = (blocks * block).unsqueeze(1) + torch.arange(block, device=scores.device)  # (S, block)
    past_end = rows >= size
    rows = rows.clamp(max=size - 1)
    values = scores[users.unsqueeze(1), rows].masked_fill(past_end, float("-inf"))
    width = int(per_user.max())
    pool = torch.full((batch, width, block), float("-inf"), device=scores.device)
    pool[users, slot] = values
    pool_rows = torch.zeros((batch, width, block), dtype=torch.int64, device=scores.device)
    pool_rows[users, slot] = rows
    return pool.view(batch, -1), pool_rows.view(batch, -1)


def _slots(users: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """users (S,) sorted, as nonzero returns them -> each entry's place among its user's
    entries (S,), and the entries per user (batch,): where to put them in a padded (batch, M)."""
    counts = torch.bincount(users, minlength=batch)
    slot = torch.arange(users.shape[0], device=users.device) - (counts.cumsum(0) - counts)[users]
    return slot, counts


def _rounding_slack(interests: torch.Tensor, max_norm: float) -> torch.Tensor:
    """(b,) twice the most that float32 products of interests (b, K, d) with rows of norm up to
    max_norm can differ from each other: (d + 2) 2^-22 max_k |v_k| max_i |e_i|, doubled; 0
    where that is not a finite float32 (then only exact ties are kept)."""
    dim = interests.shape[2]
    norms = torch.linalg.vector_norm(interests.double(), dim=2).amax(dim=1)  # (b,)
    slack = (2 * (dim + 2) * 2.0**-22 * max_norm * norms).float()
    return torch.where(torch.isfinite(slack), slack, torch.zeros_like(slack))


def _near_the_cut(scores: torch.Tensor, n: int, slack: torch.Tensor) -> torch.Tensor:
    """Top-n rows of scores (b, N), and for a user whose n-th score is within slack (b,) of a
    row left out, every row scoring at least the n-th minus slack (ascending): the rows the
    merge's own float32 products might rank in the top n, ties included (topk picks among
    equal scores in no promised order; the merge gives a tie to the smaller row)."""
    # One row more than asked: a row left out comes within slack of the n-th exactly when the
    # (n+1)-th does, which spares a full pass over the (b, N) scores for nearly every user.
    top = scores.topk(min(n + 1, scores.shape[1]), dim=1)
    rows = top.indices[:, :n]
    if top.values.shape[1] == n:  # nothing left out
        return rows
    floor = top.values[:, n - 1] - slack  # (b,)
    # At +inf (scores past float32's range) the floor is +inf: ties only; at -inf nothing is left.
    near = ((floor > float("-inf")) & (top.values[:, n] >= floor)).nonzero()[:, 0]  # (t,)
    if near.shape[0] == 0:
        return rows
    users, wide = (scores[near] >= floor[near].unsqueeze(1)).nonzero().unbind(1)  # ascending rows
    slot, counts = _slots(users, near.shape[0])
    out = torch.zeros(
        scores.shape[0], max(n, int(counts.max())), dtype=torch.int64, device=scores.device
    )
    out[:, :n] = rows
    out[near] = 0
    out[near[users], slot] = wide
    return out


def merge_candidates(
    interests: np.ndarray,
    candidates: np.ndarray,
    item_embeddings: np.ndarray | torch.Tensor,
    n: int,
    exclude: Sequence[np.ndarray] | np.ndarray | None = None,
) -> RetrievedBatch:
    """Merge per-interest candidate rows by max score and keep the best n per user, for the whole
    batch at once.

    interests (B, K, d), candidates (B, M) catalogue rows (row <= 0 marks an empty slot),
    item_embeddings (N, d) (a tensor on a GPU merges there), exclude per-user rows (or a
    (B, L) array padded with 0). Each candidate is rescored exactly against all K interests, so
    the returned score is max_k <v_k, e> even when the index that proposed it is approximate.
    Ties go to the smaller row. Runs compiled (`compiled`).
    """
    batch = candidates.shape[0]
    excluded = exclude if isinstance(exclude, np.ndarray) else pad_rows(exclude, batch)
    table = torch.as_tensor(item_embeddings)  # a tensor stays as is: no copy, no warning
    where = table.device
    with torch.inference_mode():
        found = compiled(_merge)(
            torch.from_numpy(np.ascontiguousarray(interests, dtype=np.float32)).to(where),
            torch.from_numpy(np.ascontiguousarray(candidates, dtype=np.int64)).to(where),
            table,
            n,
            torch.from_numpy(np.ascontiguousarray(excluded, dtype=np.int64)).to(where),
        )
    return RetrievedBatch(*(t.cpu().numpy() for t in found))


def _merge(
    interests: torch.Tensor,
    candidates: torch.Tensor,
    table: torch.Tensor,
    n: int,
    excluded: torch.Tensor,
    gathered: int = 1 << 22,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`merge_candidates` on tensors -> rows, scores, interests (B, n'), counts (B,),
    n' = min(n, M). Users are merged in chunks that keep the gathered (chunk, M, d) embeddings
    to about `gathered` floats (16 MB)."""
    batch, width = candidates.shape
    n = max(0, min(n, width))
    where = candidates.device
    rows = torch.zeros((batch, n), dtype=torch.int64, device=where)
    scores = torch.full((batch, n), float("-inf"), device=where)
    best = torch.zeros((batch, n), dtype=torch.int64, device=where)
    counts = torch.zeros(batch, dtype=torch.int64, device=where)
    if batch == 0 or n == 0:
        return rows, scores, best, counts
    step = max(1, gathered // max(1, width * table.shape[1]))
    for start in range(0, batch, step):
        stop = min(start + step, batch)
        merged = _merge_block(
            interests[start:stop], candidates[start:stop], table, n, excluded[start:stop]
        )
        rows[start:stop], scores[start:stop], best[start:stop], counts[start:stop] = merged
    return rows, scores, best, counts


def _merge_block(
    interests: torch.Tensor,
    candidates: torch.Tensor,
    table: torch.Tensor,
    n: int,
    excluded: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """interests (b, K, d), candidates (b, M), excluded (b, L) -> rows, scores, interests (b, n),
    counts (b,)."""
    rows = candidates.clamp(min=0).sort(dim=1).values  # ascending: duplicates adjacent
    valid = rows > 0
    # Written out: TorchScript would apply `&=` on a slice to a copy.
    valid[:, 1:] = valid[:, 1:] & (rows[:, 1:] != rows[:, :-1])
    if excluded.shape[1] > 0:
        # Membership per user in one isin: shift every user's rows into its own range.
        span = max(int(table.shape[0]), int(excluded.max()) + 1, int(rows.max()) + 1)
        offset = torch.arange(rows.shape[0], dtype=torch.int64, device=rows.device)
        offset = offset.unsqueeze(1) * span
        valid = valid & ~torch.isin(rows + offset, excluded + offset)
    # float32 products summed in an order that does not depend on the block's shape: torch's
    # bmm picks its kernel by the shapes, and some sum in another order, so a score could
    # differ in its last bit alone and in a batch (549 of 1,803 users in a seeded test, rows
    # reordered at near-ties), and two copies of one item could score a bit apart (odd d).
    # With zeros padding the candidates (row 0) to at least 16 and a multiple of 8, d to a
    # multiple of 8 and the interests to one of 4, none did in any test. (float64 sums were
    # 13x slower for the largest batches; docs/serving.md.)
    width, k, dim = rows.shape[1], interests.shape[1], interests.shape[2]
    more_rows = max(16 - width, (8 - width % 8) % 8)
    more_dims = (8 - dim % 8) % 8
    gathered = table[torch.nn.functional.pad(rows, [0, more_rows]) if more_rows else rows]
    columns = interests
    if more_dims or k % 4:
        columns = torch.nn.functional.pad(interests, [0, more_dims, 0, (4 - k % 4) % 4])
    if more_dims:
        gathered = torch.nn.functional.pad(gathered, [0, more_dims])  # (b, M', d')
    per_interest = torch.bmm(gathered, columns.transpose(1, 2))[:, :width, :k]  # (b, M, K)
    scores = per_interest.amax(dim=2)  # (b, M)
    # The interest credited with an item: the first whose score is within float32's rounding
    # ((d + 2) 2^-22 |v| |e|, as for the screen) of the best. Interests that are one vector up
    # to rounding (a window of one repeated item) were told apart by rounding noise, which
    # depends on the batch's shape: the credit, and lists diversified by it, changed with
    # whoever shared the batch.
    norms = torch.linalg.vector_norm(interests, dim=2).amax(dim=1)  # (b,)
    slack = (dim + 2) * 2.0**-22 * torch.linalg.vector_norm(gathered[:, :width], dim=2)
    slack = slack * norms.unsqueeze(1)  # (b, M)
    best = (per_interest >= (scores - slack).unsqueeze(2)).int().argmax(dim=2)  # (b, M)
    scores = scores.masked_fill(~valid, float("-inf"))
    # A stable sort keeps equal scores in ascending row order: ties go to the smaller row.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n]
    count = valid.sum(dim=1).clamp(max=n)
    keep = torch.arange(order.shape[1], device=order.device).unsqueeze(0) < count.unsqueeze(1)
    top_rows = rows.gather(1, order).masked_fill(~keep, 0)
    top_scores = scores.gather(1, order)
    top_best = best.gather(1, order).masked_fill(~keep, 0)
    return top_rows, top_scores, top_best, count


def faiss_merged_topk(
    index,
    interests: np.ndarray,
    item_embeddings: np.ndarray | torch.Tensor,
    n: int | Sequence[int],
    exclude: Sequence[np.ndarray] | None = None,
    row_offset: int = 1,
    wide_index=None,
    max_norm: float | None = None,
) -> RetrievedBatch:
    """Serving path over an index: one batched search for all B*K interest vectors, then the
    merge.

    The index holds catalogue rows row_offset.. (padding row 0 is not indexed). Each interest is
    searched deep enough that its user's n items survive the exclusion of the user's history.
    `n` may differ per user: the search runs once at the deepest user's depth and every user
    keeps only the candidates its own depth would have found, because with an approximate
    index a deeper search can surface items that outrank the shallower search's; so a user's
    list never depends on who shares the batch. Each row holds max(n) slots.

    An approximate index may hold fewer candidates than that depth where the search looked
    (IVF: the probed lists; HNSW: the beam), leaving a user short of its n items although the
    catalogue has them. Such a user is searched again alone, wider each time (`_wider`), until
    its list is full or the search was exhaustive; on `wide_index` if given (the CPU copy of a
    GPU index: per-call parameters are a CPU feature). A user still short after the widest
    search gets exact Eq. 7 over the table: a graph index can leave items that no beam reaches,
    and an index wrapped in a transform or a refinement (PCA16,IVF64,Flat; IVF64,Flat,RFlat)
    is not searched wider here (that needs the wrapper's own parameter types). `max_norm`,
    max_i |e_i| for that exact search (`exact_merged_topk`), is taken once per call if not
    given.
    """
    batch, k, dim = interests.shape
    ns = np.broadcast_to(np.asarray(n, dtype=np.int64), (batch,))
    extra = np.zeros(batch, dtype=np.int64)
    if exclude is not None:
        extra[:] = [len(np.unique(e)) for e in exclude]
    depths = np.minimum(ns + extra, index.ntotal)  # (B,)
    depth = int(depths.max(initial=0))
    queries = np.ascontiguousarray(interests.reshape(batch * k, dim), dtype=np.float32)
    if _refines(index):
        # A refinement re-ranks a base search k_factor times as deep, so the first d labels of
        # a deeper search are not a d-deep search's (better ones, 7 of 20 kept for
        # PCA16,IVF64,Flat,RFlat): each depth in the batch gets its own search.
        labels = np.full((batch * k, depth), -1, dtype=np.int64)
        for each in np.unique(depths[depths > 0]):
            at = (np.flatnonzero(depths == each)[:, None] * k + np.arange(k)).ravel()
            labels[at, :each] = index.search(queries[at], int(each))[1]
    else:
        _, labels = index.search(queries, depth)  # (B*K, depth), -1 where the index ran short
    labels = labels.reshape(batch, k, depth)
    own = np.arange(depth) < depths[:, None, None]  # (B, 1, depth): within the user's own depth
    rows = np.where(own & (labels >= 0), labels + row_offset, 0).reshape(batch, k * depth)
    found = merge_candidates(interests, rows, item_embeddings, int(ns.max(initial=0)), exclude)
    # What each user can have: its n, or every indexed item its history leaves.
    want = np.minimum(ns, index.ntotal - extra)  # (B,)
    short = np.flatnonzero(found.counts < want)
    if len(short):
        wide_index = index if wide_index is None else wide_index
        for b in short:
            user_exclude = None if exclude is None else [exclude[b]]
            for params in _wider(wide_index):
                _, labels = wide_index.search(
                    queries[b * k : (b + 1) * k], int(depths[b]), params=params
                )
                rows = np.where(labels >= 0, labels + row_offset, 0).reshape(1, -1)
                alone = merge_candidates(
                    interests[b : b + 1], rows, item_embeddings, int(ns[b]), user_exclude
                )
                _keep_longer(found, b, alone)
                if found.counts[b] >= want[b]:
                    break
            if found.counts[b] < want[b] and not _is_flat(wide_index):
                # The widest search still ran short (see above): the exhaustive answer comes
                # from the table. Not for Flat: an exhaustive index that finds too little is
                # broken (NaN vectors, say), and the smoke test at load must see that, not a
                # fallback (it also asks any index for an item's own vector).
                table = torch.as_tensor(item_embeddings)
                if max_norm is None:  # a pass over the table: once, not per user
                    max_norm = max_row_norm(table)
                alone = exact_merged_topk(
                    interests[b : b + 1], table, int(ns[b]), user_exclude, max_norm=max_norm
                )
                _keep_longer(found, b, alone)
    return found


def _keep_longer(found: RetrievedBatch, b: int, alone: RetrievedBatch) -> None:
    """Put user b's list from `alone` (one user) into `found` if it holds more items."""
    count = int(alone.counts[0])
    if count > found.counts[b]:
        found.rows[b], found.scores[b], found.interests[b] = 0, -np.inf, 0
        found.rows[b, :count] = alone.rows[0, :count]
        found.scores[b, :count] = alone.scores[0, :count]
        found.interests[b, :count] = alone.interests[0, :count]
        found.counts[b] = count


def warm_exact_fallback(index, items: torch.Tensor) -> None:
    """Compile, for an index that is not Flat, the exact search `faiss_merged_topk` falls back
    to for users it leaves short, so that its first use is not a live request's: TorchScript
    compiles on a function's first call and optimises on its second (about 130 and 40 ms over
    100k items, against 6 ms after). items (N, d) is the catalogue table; a slice of it is
    enough, the compiled code does not depend on the catalogue's size."""
    if _is_flat(index):
        return
    query = items[1:2, None, :].numpy()  # (1, 1, d): the first item's own vector
    for _ in range(2):
        exact_merged_topk(query, items[:65], 1, [np.array([1], dtype=np.int64)])


def _refines(index) -> bool:
    """Whether a refinement (IndexRefine: RFlat, Refine(...)) is somewhere in index's chain."""
    import faiss

    from remi_core.index import wrapper_chain  # here: remi_core.index imports this module

    return any(isinstance(part, faiss.IndexRefine) for part in wrapper_chain(index))


def _is_flat(index) -> bool:
    import faiss

    return isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def _wider(index) -> Iterator[Any]:
    """Per-call search parameters for `index`, each 4x wider than the last (starting from the
    index's own), up to an exhaustive search: IVF nprobe up to every list, HNSW efSearch up to
    every item. Nothing for an index that has no such parameter (Flat finds every item)."""
    import faiss  # here, not at the top: the exact paths never need it

    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexIVF):
        nprobe = max(1, base.nprobe)  # from 0, 4x would never grow
        while nprobe < base.nlist:
            nprobe = min(base.nlist, 4 * nprobe)
            yield faiss.SearchParametersIVF(nprobe=nprobe)
    elif isinstance(base, faiss.IndexHNSW):
        ef = max(1, base.hnsw.efSearch)
        while ef < base.ntotal:
            ef = min(base.ntotal, 4 * ef)
            yield faiss.SearchParametersHNSW(efSearch=ef)
