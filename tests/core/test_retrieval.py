"""Eq. 7 retrieval paths against a brute-force max over the K exact scores."""

import numpy as np
import pytest
import torch

from remi_core.index import apply_search_params, build_index
from remi_core.retrieval import dense_merged_topk, faiss_merged_topk


def brute_force(interests: np.ndarray, items: np.ndarray, exclude=None):
    """max_k scores (B, N) with padding row 0 and excluded rows at -inf."""
    scores = np.einsum("bkd,nd->bkn", interests, items).max(axis=1)
    scores[:, 0] = -np.inf
    if exclude is not None:
        for b, rows in enumerate(exclude):
            scores[b, rows] = -np.inf
    return scores


def assert_is_topn_of(scores_all: np.ndarray, rows: np.ndarray, scores: np.ndarray, n: int):
    """rows hold n distinct items whose scores are exact and that nothing outside beats."""
    assert len(rows) == n and len(set(rows.tolist())) == n
    np.testing.assert_allclose(scores, scores_all[rows], rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(scores) <= 1e-6), "results must be sorted best first"
    outside = np.setdiff1d(np.arange(len(scores_all)), rows)
    assert scores_all[outside].max() <= scores.min() + 1e-5


@pytest.fixture
def seeded():
    rng = np.random.default_rng(42)
    items = rng.standard_normal((500, 16)).astype(np.float32)
    interests = rng.standard_normal((6, 4, 16)).astype(np.float32)
    return interests, items


@pytest.mark.parametrize("n", [1, 10, 50])
@pytest.mark.parametrize("chunk", [None, 1, 4])  # None: sized to the device; 4 leaves a remainder
def test_dense_merge_equals_brute_force(seeded, n, chunk):
    interests, items = seeded
    scores, rows = dense_merged_topk(
        torch.from_numpy(interests), torch.from_numpy(items), n, chunk=chunk
    )
    reference = brute_force(interests, items)
    for b in range(len(interests)):
        assert_is_topn_of(reference[b], rows[b].numpy(), scores[b].numpy(), n)


@pytest.mark.parametrize("exclude_history", [False, True])
def test_faiss_merge_equals_brute_force(seeded, exclude_history):
    interests, items = seeded
    rng = np.random.default_rng(0)
    exclude = [rng.choice(np.arange(1, 500), 30, replace=False) for _ in interests]
    if exclude_history:
        # Exclude items the interests like most, so the search must go deeper than n.
        best = np.argsort(-brute_force(interests, items), axis=1)[:, :20]
        exclude = [np.concatenate([e, b]) for e, b in zip(exclude, best, strict=True)]
    exclude_arg = exclude if exclude_history else None
    results = faiss_merged_topk(build_index(items), interests, items, 25, exclude_arg)
    reference = brute_force(interests, items, exclude_arg)
    for b, result in enumerate(results):
        assert_is_topn_of(reference[b], result.rows, result.scores, 25)
        per_interest = items[result.rows] @ interests[b].T
        np.testing.assert_array_equal(result.interests, per_interest.argmax(axis=1))
        if exclude_history:
            assert not np.isin(result.rows, exclude[b]).any()


def test_ties_are_broken_by_row_in_both_paths():
    # Items 1..6 duplicate two vectors, so scores tie in groups of three.
    items = np.zeros((7, 2), dtype=np.float32)
    items[1:4] = [1.0, 0.0]
    items[4:7] = [0.0, 2.0]
    interests = np.array([[[1.0, 0.0], [0.0, 1.0]]], dtype=np.float32)  # (1, K=2, d=2)
    _, dense_rows = dense_merged_topk(torch.from_numpy(interests), torch.from_numpy(items), 4)
    faiss_result = faiss_merged_topk(build_index(items), interests, items, 4)[0]
    assert faiss_result.rows.tolist() == [4, 5, 6, 1]
    assert faiss_result.interests.tolist() == [1, 1, 1, 0]
    assert sorted(dense_rows[0, :3].tolist()) == [4, 5, 6]
    assert dense_rows[0, 3].item() in (1, 2, 3)


def test_padding_row_is_never_returned():
    items = np.zeros((4, 2), dtype=np.float32)
    items[0] = [100.0, 100.0]  # padding row with a huge score must still be skipped
    items[1:] = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    interests = np.ones((1, 1, 2), dtype=np.float32)
    assert 0 not in faiss_merged_topk(build_index(items), interests, items, 3)[0].rows
    _, rows = dense_merged_topk(torch.from_numpy(interests), torch.from_numpy(items), 3)
    assert 0 not in rows[0].tolist()


def test_approximate_index_still_returns_exact_scores(seeded):
    interests, items = seeded
    index = build_index(items, "HNSW16")
    apply_search_params(index, "efSearch=64")
    reference = brute_force(interests, items)
    for b, result in enumerate(faiss_merged_topk(index, interests, items, 20)):
        np.testing.assert_allclose(result.scores, reference[b, result.rows], rtol=1e-5, atol=1e-5)


def test_bad_index_settings_are_clear_errors(seeded):
    _, items = seeded
    with pytest.raises(ValueError, match="index factory"):
        build_index(items, "NoSuchIndex")
    with pytest.raises(ValueError, match="search parameters"):
        apply_search_params(build_index(items), "nosuchparam=3")
