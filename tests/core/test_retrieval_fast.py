"""The vectorised serving paths (merge over the batch, blocked dense exact search, the same
screened in bfloat16 or int8) against a brute-force reference on seeded data: exclusion, n
beyond what remains, ties, K = 1, scores closer than bfloat16 or int8 can tell apart."""

import faiss
import numpy as np
import pytest
import torch

from remi_core import retrieval
from remi_core.index import build_index
from remi_core.retrieval import (
    SCREEN_BLOCK,
    SCREEN_BLOCK_DEPTH,
    SCREEN_ERROR,
    RetrievedBatch,
    ScreenTable,
    blocked_max_scores,
    exact_merged_topk,
    faiss_merged_topk,
    merge_candidates,
)


def reference(interests, items, n, exclude=None, candidates=None):
    """Per user, in plain Python: max_k scores over the allowed rows, best first, ties to the
    smaller row; padding row 0 and excluded rows never appear."""
    out = []
    for b, v in enumerate(interests):
        allowed = set(range(1, len(items))) if candidates is None else set(candidates[b].tolist())
        allowed -= {0, -1}
        if exclude is not None:
            allowed -= set(exclude[b].tolist())
        scored = []
        for row in allowed:
            per_interest = v @ items[row]  # (K,)
            scored.append((-float(per_interest.max()), row, int(per_interest.argmax())))
        out.append(sorted(scored)[:n])
    return out


# The screens' number formats: each screened test runs for both.
SCREEN_TYPES = [torch.bfloat16, torch.int8]


def screen_scores(interests: torch.Tensor, screen: ScreenTable) -> torch.Tensor:
    """The screen's own max_k scores (B, N), in its units (see `retrieval._screened`)."""
    return retrieval._screen_scores(interests, screen.spec())[0]


def assert_matches(result: RetrievedBatch, expected) -> None:
    assert len(result) == len(expected)
    for got, want in zip(result, expected, strict=True):
        assert got.rows.tolist() == [row for _, row, _ in want]
        np.testing.assert_allclose(got.scores, [-s for s, _, _ in want], rtol=1e-5, atol=1e-6)
        assert got.interests.tolist() == [k for _, _, k in want]


@pytest.fixture
def seeded():
    rng = np.random.default_rng(7)
    items = rng.standard_normal((300, 8)).astype(np.float32)
    interests = rng.standard_normal((5, 3, 8)).astype(np.float32)
    exclude = [rng.choice(np.arange(1, 300), size, replace=False) for size in (0, 3, 40, 1, 299)]
    return interests, items, exclude


@pytest.mark.parametrize("n", [1, 7, 50, 400])  # 400: more than any user has left
@pytest.mark.parametrize("use_exclude", [False, True])
def test_merge_equals_brute_force(seeded, n, use_exclude):
    interests, items, exclude = seeded
    rng = np.random.default_rng(n)
    # Candidates with repeats, empty slots (0, -1) and rows the user excluded.
    candidates = rng.integers(-1, 300, size=(5, 120))
    exclude_arg = exclude if use_exclude else None
    result = merge_candidates(interests, candidates, items, n, exclude_arg)
    assert_matches(result, reference(interests, items, n, exclude_arg, candidates))


@pytest.mark.parametrize("n", [1, 10, 299, 1000])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("chunk", [1, 2, 64])
@pytest.mark.parametrize("screen_type", [None, *SCREEN_TYPES])
@pytest.mark.parametrize("eager", [False, True])
def test_exact_equals_brute_force(seeded, n, k, chunk, screen_type, eager):
    interests, items, exclude = seeded
    v = np.ascontiguousarray(interests[:, :k])
    table = torch.from_numpy(items)
    screen = ScreenTable.of(table, screen_type) if screen_type is not None else None
    result = exact_merged_topk(v, table, n, exclude, chunk, screen=screen, eager=eager)
    assert_matches(result, reference(v, items, n, exclude))
    # The last user excluded every item: nothing is left, and nothing is invented.
    assert result.counts[-1] == 0 and len(result[4].rows) == 0


def test_merge_in_chunks_equals_one_chunk(seeded):
    """Compiled and eager, users merged a few at a time give what all at once gives."""
    interests, items, exclude = seeded
    candidates = np.random.default_rng(1).integers(-1, 300, size=(5, 120))
    args = (
        torch.from_numpy(interests),
        torch.from_numpy(candidates),
        torch.from_numpy(items),
        30,
        torch.from_numpy(retrieval.pad_rows(exclude, 5)),
    )
    whole = retrieval._merge(*args)
    for merge in (retrieval._merge, retrieval.compiled(retrieval._merge)):
        for gathered in (1, 2 * 120 * items.shape[1]):  # one user, two users per chunk
            for got, want in zip(merge(*args, gathered), whole, strict=True):
                torch.testing.assert_close(got, want)


def test_the_search_runs_compiled():
    """The serving search is compiled by TorchScript, which runs it without the GIL: an eager
    fallback would still answer correctly, so only this test notices losing it."""
    for fn in (retrieval._exact_search, retrieval._merge):
        assert isinstance(retrieval.compiled(fn), torch.jit.ScriptFunction)


def test_blocked_scores_equal_dense(seeded):
    interests, items, _ = seeded
    v, table = torch.from_numpy(interests), torch.from_numpy(items)
    dense = torch.einsum("bkd,nd->bkn", v, table).amax(dim=1)
    for block in (1, 7, 256, 10_000):
        torch.testing.assert_close(blocked_max_scores(v, table, block), dense)


@pytest.mark.parametrize("k", [1, 2])
def test_ties_go_to_the_smaller_row(k):
    """Rows 40..59 share one embedding, the best for every user: the exact path's top-5 must be
    rows 40..44 in that order, whatever topk returned first. An index cuts its own list at the
    user's depth and picks among exactly tied items there as it likes, so its answer matches in
    scores, in ascending row order among the tied rows it returned."""
    rng = np.random.default_rng(3)
    items = rng.standard_normal((200, 6)).astype(np.float32) * 0.1
    interests = rng.standard_normal((4, k, 6)).astype(np.float32)
    best = interests.mean(axis=(0, 1))
    items[40:60] = 10 * best / np.linalg.norm(best)
    exclude = [np.array([], dtype=np.int64), np.array([41]), np.array([40, 42]), np.arange(1, 45)]
    expected = reference(interests, items, 5, exclude)
    assert [row for _, row, _ in expected[0]] == [40, 41, 42, 43, 44]
    table = torch.from_numpy(items)
    for eager in (False, True):  # the tie path has its own code in each (`_near_the_cut`)
        assert_matches(exact_merged_topk(interests, table, 5, exclude, eager=eager), expected)
        for screen_type in SCREEN_TYPES:
            screen = ScreenTable.of(table, screen_type)
            found = exact_merged_topk(interests, table, 5, exclude, screen=screen, eager=eager)
            assert_matches(found, expected)
    found = faiss_merged_topk(build_index(items), interests, items, 5, exclude)
    for got, want in zip(found, expected, strict=True):
        np.testing.assert_allclose(got.scores, [-s for s, _, _ in want], rtol=1e-5, atol=1e-6)
        assert set(got.rows.tolist()) <= set(range(40, 60))
        assert got.rows.tolist() == sorted(got.rows.tolist())


def test_bfloat16_scores_stay_within_the_screen_bound():
    """The bound the screen relies on, on rows and interests of very different norms."""
    rng = np.random.default_rng(5)
    items = rng.standard_normal((4000, 64)) * rng.lognormal(0, 2, (4000, 1))
    interests = rng.standard_normal((16, 4, 64)) * rng.lognormal(0, 2, (16, 4, 1))
    v, table = (torch.from_numpy(a.astype(np.float32)) for a in (interests, items))
    exact = blocked_max_scores(v, table)  # (16, 4000)
    rounded = blocked_max_scores(v.to(torch.bfloat16), table.to(torch.bfloat16))
    user_norms = torch.linalg.vector_norm(v, dim=2).amax(dim=1, keepdim=True)  # (16, 1)
    scale = user_norms * torch.linalg.vector_norm(table, dim=1)  # (16, 4000)
    ratio = ((rounded - exact).abs() / scale).max().item()
    assert 0 < ratio < SCREEN_ERROR / 1.3  # the bound keeps its third of slack


def test_int8_scores_stay_within_the_screen_bound():
    """The int8 screen's slack on rows and interests of very different norms: never exceeded,
    and not so loose that it could not prune."""
    rng = np.random.default_rng(5)
    items = rng.standard_normal((4000, 64)) * rng.lognormal(0, 2, (4000, 1))
    interests = rng.standard_normal((16, 4, 64)) * rng.lognormal(0, 2, (16, 4, 1))
    v, table = (torch.from_numpy(a.astype(np.float32)) for a in (interests, items))
    exact = blocked_max_scores(v.double(), table.double())  # (16, 4000)
    spec = ScreenTable.of(table, torch.int8).spec()
    scores, slack = retrieval._int8_max_scores(v, spec)  # units of step_b * scale
    step = v.abs().amax(dim=(1, 2)) / 127  # (16,), as the screen takes it
    unit = (step * spec.scale).double().unsqueeze(1)  # (16, 1)
    err = (scores.double() * unit - exact).abs().max(dim=1).values  # (16,)
    allowed = (slack.double() / 2) * unit.squeeze(1)  # (16,)
    assert (err <= allowed).all()
    assert (err > allowed / 50).all()  # the bound is measured, not a blanket margin


@pytest.mark.parametrize("screen_type", SCREEN_TYPES)
def test_screen_orders_rows_it_cannot_tell_apart(screen_type):
    """Rows 1..300 differ by less than bfloat16's or int8's resolution, so the screen's scores
    alone rank them wrongly; the screened search must rank them by their float32 scores."""
    rng = np.random.default_rng(9)
    base = rng.standard_normal(16).astype(np.float32)
    items = np.tile(base, (2001, 1))
    # Scores about 20 apart by 2e-4 steps: far below bfloat16's 0.125 there, far above float32's
    # rounding (random perturbations gave pairs closer than float32 can order, which numpy and
    # torch then ordered differently on some CPUs).
    items[1:301] *= 1 + rng.permutation(300)[:, None].astype(np.float32) * 1e-5
    items[301:] = rng.standard_normal((1700, 16)).astype(np.float32) * 0.2
    interests = (base + rng.standard_normal((6, 2, 16)) * 0.05).astype(np.float32)
    exclude = [rng.choice(np.arange(1, 301), 20, replace=False) for _ in range(6)]
    table = torch.from_numpy(items)
    screen = ScreenTable.of(table, screen_type)
    expected = reference(interests, items, 40, exclude)
    rounded = screen_scores(torch.from_numpy(interests), screen)
    rounded[torch.arange(6).unsqueeze(1), torch.from_numpy(np.stack(exclude))] = -torch.inf
    rounded_top = rounded[:, 1:].topk(40, dim=1).indices + 1
    assert any(rounded_top[b].tolist() != [row for _, row, _ in expected[b]] for b in range(6)), (
        "the case does not exercise the screen's rounding"
    )
    assert_matches(exact_merged_topk(interests, table, 40, exclude, screen=screen), expected)


@pytest.mark.parametrize("screen_type", SCREEN_TYPES)
def test_screen_prunes_on_spread_scores(screen_type):
    rng = np.random.default_rng(2)
    table = torch.from_numpy(rng.standard_normal((20_000, 16)).astype(np.float32))
    v = torch.from_numpy(rng.standard_normal((4, 3, 16)).astype(np.float32))
    excluded = torch.zeros((4, 0), dtype=torch.int64)
    screen = ScreenTable.of(table, screen_type)
    candidates = retrieval._screened(v, screen.spec(), excluded, 50)
    assert 50 <= candidates.shape[1] < 500  # of 20,000 rows


def blocky_catalogue(seed: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """6,001 rows (the last block of 32 is short), near-duplicates of a few rows scattered
    over other blocks (ties and bands across blocks), users excluding up to most of it."""
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((6001, 16)).astype(np.float32)
    copies = rng.choice(np.arange(1, 6001), 120, replace=False)
    items[copies] = items[rng.choice(np.arange(1, 6001), 120)] + 1e-4
    items[5990:] = items[7]  # equal rows in the short last block
    interests = rng.standard_normal((6, 3, 16)).astype(np.float32)
    interests[5] = items[7] * 3  # user 5's best rows include the short block's
    sizes = (0, 10, 500, 3000, 1, 40)
    exclude = [rng.choice(np.arange(1, 6001), k, replace=False) for k in sizes]
    return items, interests, exclude


@pytest.mark.parametrize("n", [1, 5, 11])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("screen_type", SCREEN_TYPES)
def test_screen_by_blocks_keeps_the_same_candidates(n, seed, screen_type):
    items, interests, exclude = blocky_catalogue(seed)
    table, v = torch.from_numpy(items), torch.from_numpy(interests)
    screen = ScreenTable.of(table, screen_type)
    excluded = torch.from_numpy(retrieval.pad_rows(exclude, len(exclude)))
    scores = screen_scores(v, screen)
    spec = screen.spec()
    slack = 0.01 * scores.amax(dim=1)  # (6,): 1% of each user's best
    pool, pool_rows = retrieval._pool(scores, n, slack, spec.block, spec.depth)
    assert pool_rows is not None and pool.shape[1] < len(items) // 4  # the blocks pruned
    by_blocks = retrieval._screened(v, spec, excluded, n)
    whole = retrieval._screened(v, spec._replace(depth=10**9), excluded, n)  # every row pooled
    torch.testing.assert_close(by_blocks, whole)
    expected = reference(interests, items, n, exclude)
    assert_matches(exact_merged_topk(interests, table, n, exclude, screen=screen), expected)


def test_screen_by_blocks_steps_aside_with_fewer_blocks_than_n():
    """A user with rows left in fewer than n blocks: the whole rows are searched."""
    items, interests, _ = blocky_catalogue(3)
    keep = np.arange(64, 96)  # one block of 32 rows left
    exclude = [np.setdiff1d(np.arange(1, 6001), keep)] + [np.array([], dtype=np.int64)] * 5
    table = torch.from_numpy(items)
    scores = retrieval._max_scores(
        blocked_max_scores(torch.from_numpy(interests).to(torch.bfloat16), table.bfloat16()),
        torch.from_numpy(retrieval.pad_rows(exclude, 6)),
    )
    pool_rows = retrieval._pool(scores, 2, torch.zeros(6), SCREEN_BLOCK, SCREEN_BLOCK_DEPTH)[1]
    assert pool_rows is None
    expected = reference(interests, items, 2, exclude)
    result = exact_merged_topk(interests, table, 2, exclude, screen=ScreenTable.of(table))
    assert_matches(result, expected)


@pytest.mark.parametrize("screen_type", SCREEN_TYPES)
def test_screen_falls_back_to_float32_when_it_cannot_prune(monkeypatch, screen_type):
    """All rows equal: every row is a candidate, more than the screen gathers; the float32 path
    answers instead, ties to the smaller row."""
    monkeypatch.setattr(retrieval, "SCREEN_MAX_CANDIDATES", 100)
    items = np.ones((500, 4), dtype=np.float32)
    interests = np.ones((2, 2, 4), dtype=np.float32)
    table = torch.from_numpy(items)
    excluded = torch.zeros((2, 0), dtype=torch.int64)
    screen = ScreenTable.of(table, screen_type)
    assert retrieval._screened(torch.from_numpy(interests), screen.spec(), excluded, 5) is None
    result = exact_merged_topk(interests, table, 5, [np.array([1, 3])] * 2, screen=screen)
    assert result.rows.tolist() == [[2, 4, 5, 6, 7]] * 2


def test_batch_composition_does_not_change_answers(seeded):
    interests, items, exclude = seeded
    table = torch.from_numpy(items)
    together = exact_merged_topk(interests, table, 20, exclude)
    for b in range(len(interests)):
        alone = exact_merged_topk(interests[b : b + 1], table, 20, exclude[b : b + 1])
        assert alone[0].rows.tolist() == together[b].rows.tolist()
        np.testing.assert_allclose(alone[0].scores, together[b].scores, rtol=1e-6)


REFINED = ["IVF16,PQ4x4,RFlat", "PCA8,IVF16,Flat,RFlat", "IVF16,SQ4,Refine(Flat)"]


@pytest.mark.parametrize("factory", ["IVF16,Flat", *REFINED])
def test_an_approximate_index_answers_each_user_as_if_alone(factory: str) -> None:
    # With IVF at nprobe=1 a deeper search surfaces items a shallower one misses; a user sharing
    # a batch with a deeper user (larger n or longer history) must still get its own answer.
    # A refinement re-ranks a deeper base search, so there even the first items of a deeper
    # search differ from a shallower one's (only 7 of 20 kept for PCA16,IVF64,Flat,RFlat).
    rng = np.random.default_rng(11)
    items = rng.standard_normal((2001, 16)).astype(np.float32)
    index = build_index(items, factory)
    faiss.ParameterSpace().set_index_parameters(index, "nprobe=1")
    users = 40
    interests = rng.standard_normal((users, 4, 16)).astype(np.float32)
    exclude = [rng.integers(1, 2001, size=rng.integers(0, 30)) for _ in range(users)]
    ns = rng.integers(5, 200, size=users)
    batched = faiss_merged_topk(index, interests, items, ns.tolist(), exclude)
    deeper = 0
    for b in range(users):
        alone = faiss_merged_topk(index, interests[b : b + 1], items, int(ns[b]), [exclude[b]])
        np.testing.assert_array_equal(batched.rows[b, : ns[b]], alone.rows[0])
        np.testing.assert_array_equal(batched.scores[b, : ns[b]], alone.scores[0])
        # The same user searched at the batch's depth would have answered differently.
        wide = faiss_merged_topk(index, interests[b : b + 1], items, int(ns.max()), [exclude[b]])
        deeper += not np.array_equal(wide.rows[0, : ns[b]], alone.rows[0])
    assert deeper > 0, "the case does not exercise the depth difference"


@pytest.mark.parametrize(
    "factory", ["IVF64,SQ8", "HNSW16", "HNSW4", "PCA8,IVF64,Flat", "IVF64,Flat,RFlat"]
)
def test_an_approximate_index_fills_every_list_the_catalogue_can(factory: str) -> None:
    """Users near one cluster probe lists (IVF) or a beam (HNSW) holding fewer items than a deep
    n: each such user is searched again, wider, until its list is full; a list is still the
    user's own whoever shares its batch. HNSW4's sparse graph leaves items that even a beam as
    wide as the catalogue never reaches, and a wrapped index is not searched wider: those
    users' lists come from exact Eq. 7."""
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((40, 16)).astype(np.float32)
    items = centres[rng.integers(0, 40, 3001)] + 0.2 * rng.standard_normal((3001, 16))
    items = items.astype(np.float32)
    index = build_index(items, factory)
    faiss.ParameterSpace().set_index_parameters(
        index, "efSearch=16" if factory.startswith("HNSW") else "nprobe=1"
    )
    if factory == "HNSW4":
        every = faiss.SearchParametersHNSW(efSearch=index.ntotal)
        labels = index.search(items[:1], index.ntotal, params=every)[1]
        assert (labels >= 0).sum() < index.ntotal, "the case leaves no item unreachable"
    users = 12
    interests = (
        centres[rng.integers(0, 40, (users, 1))] + 0.05 * rng.standard_normal((users, 4, 16))
    ).astype(np.float32)
    exclude = [rng.integers(1, 3001, size=rng.integers(0, 40)) for _ in range(users)]
    # Deeper than the items HNSW4 can reach at all.
    ns = np.array([2900 if factory == "HNSW4" else 600, 50] * (users // 2))
    # One search at the index's own parameters leaves some deep user short:
    reachable = []
    for b in range(users):
        depth = int(ns[b]) + len(np.unique(exclude[b]))
        labels = index.search(interests[b], depth)[1] + 1  # catalogue rows; 0: nothing found
        reachable.append(len(np.setdiff1d(labels[labels > 0], exclude[b])))
    assert (np.array(reachable) < ns).any(), "the case does not leave anyone short"
    batched = faiss_merged_topk(index, interests, items, ns.tolist(), exclude)
    available = np.array([3000 - len(np.unique(e)) for e in exclude])
    assert (batched.counts >= np.minimum(ns, available)).all()  # max(n) slots: may hold more
    for b in range(users):
        alone = faiss_merged_topk(index, interests[b : b + 1], items, int(ns[b]), [exclude[b]])
        np.testing.assert_array_equal(batched.rows[b, : ns[b]], alone.rows[0])
        assert not set(alone.rows[0]) & set(exclude[b].tolist())
        # Real items, scored by Eq. 7 (max over K), best first.
        rescored = (items[alone.rows[0]] @ interests[b].T).max(axis=1)
        np.testing.assert_allclose(alone.scores[0], rescored, rtol=1e-5, atol=1e-5)
        assert (np.diff(alone.scores[0]) <= 0).all()


@pytest.mark.parametrize("screen_type", [None, *SCREEN_TYPES])
@pytest.mark.parametrize("dim", [5, 17, 33, 64])
@pytest.mark.parametrize("n", [1, 3, 50])
def test_an_exact_list_is_bit_for_bit_the_same_whoever_shares_its_batch(screen_type, dim, n):
    """With exactly tied (duplicated) items that users are drawn to. The merge's bmm summed in
    another order for other block shapes: at odd d most users' scores differed in the last bit
    alone and in a batch, and at any d with a few candidates (n = 1)."""
    rng = np.random.default_rng(dim)
    items = rng.standard_normal((5000, dim)).astype(np.float32)
    copies = rng.integers(1, 5000, 40)
    items[copies[20:]] = items[copies[:20]]  # exact ties
    items[0] = 0
    interests = rng.standard_normal((16, 4, dim)).astype(np.float32)
    interests[:, 0] = 3 * items[copies[:16]]  # users drawn to the tied items
    table = torch.from_numpy(items)
    screen = None if screen_type is None else ScreenTable.of(table, screen_type)
    together = exact_merged_topk(interests, table, n, screen=screen)
    for b in range(16):
        alone = exact_merged_topk(interests[b : b + 1], table, n, screen=screen)
        np.testing.assert_array_equal(together.rows[b], alone.rows[0])
        np.testing.assert_array_equal(together.scores[b], alone.scores[0])
        # Copies of one item score the same, so exact ties go to the smaller row at any d.
        scores_of: dict[bytes, set[float]] = {}
        for row, score in zip(alone[0].rows, alone[0].scores, strict=True):
            scores_of.setdefault(items[row].tobytes(), set()).add(float(score))
        assert all(len(scores) == 1 for scores in scores_of.values())


@pytest.mark.parametrize("screen_type", SCREEN_TYPES)
def test_screen_takes_all_zero_interests_and_tables(screen_type):
    """A user whose interests are all zero ties every row at 0 (the smallest rows win), and an
    all-zero catalogue does the same for everyone: no division by a zero step or scale."""
    rng = np.random.default_rng(4)
    items = rng.standard_normal((3000, 8)).astype(np.float32)
    interests = rng.standard_normal((3, 2, 8)).astype(np.float32)
    interests[1] = 0
    for table in (items, np.zeros_like(items)):
        screen = ScreenTable.of(torch.from_numpy(table), screen_type)
        result = exact_merged_topk(interests, torch.from_numpy(table), 6, screen=screen)
        assert_matches(result, reference(interests, table, 6))


@pytest.mark.parametrize("dim", [1, 3, 13])
@pytest.mark.parametrize("screen_type", SCREEN_TYPES)
def test_screen_takes_any_embedding_size(dim, screen_type):
    """Sizes that are not a multiple of 8, 1 included (`torch._int_mm` with an inner size of 1
    returns garbage on the CPU; the int8 table is padded with zero columns)."""
    rng = np.random.default_rng(dim)
    items = rng.standard_normal((5000, dim)).astype(np.float32)
    interests = rng.standard_normal((4, 2, dim)).astype(np.float32)
    table = torch.from_numpy(items)
    screen = ScreenTable.of(table, screen_type)
    for eager in (False, True):
        result = exact_merged_topk(interests, table, 8, screen=screen, eager=eager)
        assert_matches(result, reference(interests, items, 8))


# (interests, catalogue); the last three: products below float32's smallest normal number
@pytest.mark.parametrize(
    "scale", [(1e-30, 1.0), (1.0, 1e-30), (1e-19, 1e-19), (1e-30, 1e-8), (1e-21, 1e-17)]
)
@pytest.mark.parametrize("screen_type", SCREEN_TYPES)
def test_screen_bound_holds_for_tiny_magnitudes(scale, screen_type):
    """Norms of tiny vectors underflow to 0 when squared in float32, which made the screen's
    slack 0 and lost rows of the top n (the bfloat16 bound now takes norms in float64, the int8
    one works in units of the user's step). Products below 2^-126 are flushed to zero, an
    error no relative bound covers (bfloat16 dropped true top-n rows)."""
    rng = np.random.default_rng(11)
    items = (rng.standard_normal((20000, 16)) * scale[1]).astype(np.float32)
    interests = (rng.standard_normal((4, 2, 16)) * scale[0]).astype(np.float32)
    table = torch.from_numpy(items)
    result = exact_merged_topk(interests, table, 50, screen=ScreenTable.of(table, screen_type))
    want = exact_merged_topk(interests, table, 50)  # float32, no screen
    for got, expected in zip(result, want, strict=True):
        assert got.rows.tolist() == expected.rows.tolist()


@pytest.mark.parametrize("screen_type", [None, *SCREEN_TYPES])
def test_non_finite_interests_and_n_zero_do_not_crash(screen_type):
    """NaN interests (a broken model; bundles with NaN weights are refused) give every path the
    same answer instead of an exception in the screen; n = 0 gives empty lists."""
    rng = np.random.default_rng(2)
    items = rng.standard_normal((20000, 8)).astype(np.float32)
    table = torch.from_numpy(items)
    screen = None if screen_type is None else ScreenTable.of(table, screen_type)
    interests = rng.standard_normal((2, 2, 8)).astype(np.float32)
    interests[0, 0, 3] = np.nan
    result = exact_merged_topk(interests, table, 10, screen=screen)
    assert_matches([result[1]], reference(interests[1:], items, 10))
    assert result.rows[0].tolist() == exact_merged_topk(interests[:1], table, 10).rows[0].tolist()
    assert exact_merged_topk(interests, table, 0, screen=screen).counts.tolist() == [0, 0]


@pytest.mark.parametrize("screen_type", [None, *SCREEN_TYPES])
def test_interests_equal_up_to_rounding_credit_the_first(screen_type):
    """A window of one repeated item makes the K interests one vector up to rounding, which
    depends on the batch's shape; the credited interest (and a list diversified by it) must
    not: the first within float32's rounding of the best is credited."""
    rng = np.random.default_rng(3)
    items = rng.standard_normal((2000, 16)).astype(np.float32)
    v = rng.standard_normal(16).astype(np.float32)
    up, down = np.nextafter(v, np.float32(np.inf)), np.nextafter(v, np.float32(-np.inf))
    interests = np.stack([v, up, down, up])[None]  # (1, K, d): one vector, rounded four ways
    table = torch.from_numpy(items)
    screen = None if screen_type is None else ScreenTable.of(table, screen_type)
    found = exact_merged_topk(interests, table, 50, screen=screen)
    assert found.counts[0] == 50 and (found.interests[0] == 0).all()
    rows = np.arange(1, 2000)[None]
    assert (merge_candidates(interests, rows, items, 50).interests[0] == 0).all()


def test_every_exact_search_gives_the_same_list_on_near_duplicate_items():
    """Items a few ulps apart score within float32's rounding of each other: the dense search
    kept rows by its own blocked products and only exact ties at the cut, so the merge, whose
    products round differently, could not rank a near-duplicate it left out, and its lists
    differed from the screened searches' (568 of 960 here) by which backend `auto` picked.
    Every search must give the merge's own top n over the whole catalogue."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 64)).astype(np.float32)
    copies = np.repeat(base, 8, axis=0)  # eight near-copies of each item
    copies *= (1 + rng.integers(-3, 4, copies.shape) * 2.0**-23).astype(np.float32)
    table = torch.from_numpy(np.vstack([np.zeros((1, 64), np.float32), copies]))
    interests = rng.standard_normal((48, 4, 64)).astype(np.float32)
    every_row = np.broadcast_to(np.arange(1, table.shape[0]), (48, table.shape[0] - 1))
    want = merge_candidates(interests, every_row, table, 20)
    for screen_type in (None, *SCREEN_TYPES):
        screen = None if screen_type is None else ScreenTable.of(table, screen_type)
        for eager in (False, True):
            found = exact_merged_topk(interests, table, 20, screen=screen, eager=eager)
            assert found.rows.tolist() == want.rows.tolist(), (screen_type, eager)


@pytest.mark.parametrize("dim", [5, 8, 17, 64])
@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_merge_is_bit_for_bit_the_same_whoever_shares_its_block(dim, k):
    """Users with 1 to 300 candidates, merged alone and in a block as wide as the widest: the
    bmm's shape changes with both (549 of 1,803 users differed in a seeded run)."""
    rng = np.random.default_rng(dim * 10 + k)
    items = rng.standard_normal((3000, dim)).astype(np.float32)
    interests = rng.standard_normal((24, k, dim)).astype(np.float32)
    widths = rng.integers(1, 300, 24)
    candidates = np.zeros((24, widths.max()), dtype=np.int64)
    for b, width in enumerate(widths):
        candidates[b, :width] = rng.choice(np.arange(1, 3000), width, replace=False)
    together = merge_candidates(interests, candidates, items, 400)
    for b, width in enumerate(widths):
        alone = merge_candidates(interests[b : b + 1], candidates[b : b + 1, :width], items, 400)
        np.testing.assert_array_equal(together[b].rows, alone[0].rows)
        np.testing.assert_array_equal(together[b].scores, alone[0].scores)
        np.testing.assert_array_equal(together[b].interests, alone[0].interests)


@pytest.mark.parametrize("screen_type", [None, *SCREEN_TYPES])
def test_rows_to_exclude_outside_the_catalogue_exclude_nothing(seeded, screen_type):
    # The merge and the index path ignore them; the exact search indexed with them and crashed.
    interests, items, exclude = seeded
    table = torch.from_numpy(items)
    screen = ScreenTable.of(table, screen_type) if screen_type is not None else None
    odd = [np.concatenate([rows, [300, 10**6, -5]]) for rows in exclude]
    got = exact_merged_topk(interests, table, 20, odd, screen=screen)
    assert_matches(got, reference(interests, items, 20, exclude))
