"""The vectorised serving paths (merge over the batch, blocked dense exact search) against a
brute-force reference on seeded data: exclusion, n beyond what remains, ties, K = 1."""

import numpy as np
import pytest
import torch

from remi_core.index import build_index
from remi_core.retrieval import (
    RetrievedBatch,
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
def test_exact_equals_brute_force(seeded, n, k, chunk):
    interests, items, exclude = seeded
    v = np.ascontiguousarray(interests[:, :k])
    result = exact_merged_topk(v, torch.from_numpy(items), n, exclude, users_per_chunk=chunk)
    assert_matches(result, reference(v, items, n, exclude))
    # The last user excluded every item: nothing is left, and nothing is invented.
    assert result.counts[-1] == 0 and len(result[4].rows) == 0


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
    assert_matches(exact_merged_topk(interests, table, 5, exclude), expected)
    found = faiss_merged_topk(build_index(items), interests, items, 5, exclude)
    for got, want in zip(found, expected, strict=True):
        np.testing.assert_allclose(got.scores, [-s for s, _, _ in want], rtol=1e-5, atol=1e-6)
        assert set(got.rows.tolist()) <= set(range(40, 60))
        assert got.rows.tolist() == sorted(got.rows.tolist())


def test_batch_composition_does_not_change_answers(seeded):
    interests, items, exclude = seeded
    table = torch.from_numpy(items)
    together = exact_merged_topk(interests, table, 20, exclude)
    for b in range(len(interests)):
        alone = exact_merged_topk(interests[b : b + 1], table, 20, exclude[b : b + 1])
        assert alone[0].rows.tolist() == together[b].rows.tolist()
        np.testing.assert_allclose(alone[0].scores, together[b].scores, rtol=1e-6)


def test_an_approximate_index_answers_each_user_as_if_alone() -> None:
    # With IVF at nprobe=1 a deeper search surfaces items a shallower one misses; a user sharing
    # a batch with a deeper user (larger n or longer history) must still get its own answer.
    rng = np.random.default_rng(11)
    items = rng.standard_normal((2001, 16)).astype(np.float32)
    index = build_index(items, "IVF16,Flat")
    index.nprobe = 1
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
