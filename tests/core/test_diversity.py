"""ComiRec's greedy diverse aggregation against Eq. 7, brute force and a plain reference."""

from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch

from remi_core.diversity import (
    POOL_MULTIPLE,
    different_pairs,
    gather,
    greedy_diverse,
    list_diversity,
    objective,
    pool_size,
    rerank,
)
from remi_core.retrieval import dense_merged_topk, merge_candidates


def reference_greedy(scores, categories, n, diversity):
    """The greedy rule written plainly: one user, Python lists, marginal gain of F itself."""
    chosen: list[int] = []
    for _ in range(min(n, len(scores))):
        best, best_gain = None, -np.inf
        for i in range(len(scores)):
            if i in chosen or not np.isfinite(scores[i]):
                continue
            gain = scores[i] + diversity * sum(categories[j] != categories[i] for j in chosen)
            if gain > best_gain:
                best, best_gain = i, gain
        if best is None:
            break
        chosen.append(best)
    return chosen


def brute_force_best(scores, categories, n, diversity):
    return max(
        objective(scores[list(s)], categories[list(s)], diversity)
        for s in combinations(range(len(scores)), n)
    )


def sorted_case(rng, width, num_categories, batch=1):
    """Candidates as the merge gives them: scores descending, random categories."""
    scores = -np.sort(-rng.normal(size=(batch, width)), axis=1)
    categories = rng.integers(0, num_categories, size=(batch, width))
    return scores, categories


def test_lambda_zero_is_eq7_exactly():
    """Through the real merge: lambda 0 returns the merged top-n, rows and order unchanged."""
    rng = np.random.default_rng(0)
    items = rng.normal(size=(300, 8)).astype(np.float32)
    interests = rng.normal(size=(5, 3, 8)).astype(np.float32)
    n = 20
    _, exact = dense_merged_topk(torch.from_numpy(interests), torch.from_numpy(items), n)
    merged = merge_candidates(interests, np.tile(np.arange(300), (5, 1)), items, 4 * n)
    scores = np.stack([m.scores for m in merged])
    rows = np.stack([m.rows for m in merged])
    producing = np.stack([m.interests for m in merged])
    picked = greedy_diverse(scores, producing, n, 0.0)
    assert np.array_equal(picked, np.tile(np.arange(n), (5, 1)))
    assert np.array_equal(gather(rows, picked), exact.numpy())


@pytest.mark.parametrize("diversity", [0.0, 0.05, 0.3, 1.0, 5.0])
@pytest.mark.parametrize("seed", range(6))
def test_greedy_reaches_the_brute_force_optimum(diversity, seed):
    """One category per item makes the greedy rule optimal (remi_core/diversity.py); never above."""
    rng = np.random.default_rng(seed)
    scores, categories = sorted_case(rng, width=9, num_categories=3)
    n = 4
    picked = greedy_diverse(scores, categories, n, diversity)[0]
    greedy = objective(scores[0, picked], categories[0, picked], diversity)
    best = brute_force_best(scores[0], categories[0], n, diversity)
    assert greedy <= best + 1e-9
    assert greedy == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("diversity", [0.0, 0.1, 0.7, 3.0])
def test_batch_matches_the_reference_greedy(diversity):
    rng = np.random.default_rng(1)
    scores, categories = sorted_case(rng, width=30, num_categories=4, batch=16)
    scores[3, 10:] = -np.inf  # a user with only 10 candidates
    scores[5, 25:] = -np.inf
    picked = greedy_diverse(scores, categories, 12, diversity)
    for b in range(16):
        expected = reference_greedy(scores[b], categories[b], 12, diversity)
        got = [int(p) for p in picked[b] if p >= 0]
        assert got == expected, b
    assert (picked[3, 10:] == -1).all() and (picked[3, :10] >= 0).all()


@pytest.mark.parametrize("seed", range(4))
def test_ties_unsorted_candidates_and_gaps_match_the_reference(seed):
    """Whole-number scores (many exact ties), candidates in no order, -inf holes, category -1."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=(8, 20)).astype(np.float64)
    scores[rng.random((8, 20)) < 0.2] = -np.inf
    categories = rng.integers(-1, 4, size=(8, 20))
    lambdas = rng.choice([0.0, 0.5, 1.0, 2.0, 7.0], size=8)
    picked = greedy_diverse(scores, categories, 15, lambdas)
    for b in range(8):
        expected = reference_greedy(scores[b], categories[b], 15, lambdas[b])
        assert [int(p) for p in picked[b] if p >= 0] == expected, b


def stepwise_greedy(scores, categories, n, diversity):
    """The greedy step as the implementation's docstring states it, one step at a time: each
    category's head is its best remaining candidate (then the earliest); the head with the
    largest f - lambda x (items taken from its category) wins, the earliest on equal gains."""
    scores = np.where(np.isfinite(scores), scores, -np.inf)
    left, taken, chosen = set(range(len(scores))), Counter(), []
    while left and len(chosen) < n:
        heads = {}
        for i in sorted(left, key=lambda i: (-scores[i], i)):
            heads.setdefault(categories[i], i)
        gain, i = max((scores[i] - diversity * taken[c], -i) for c, i in heads.items())
        if not np.isfinite(gain):
            break
        chosen.append(-i)
        left.discard(-i)
        taken[categories[-i]] += 1
    return chosen


@pytest.mark.parametrize("seed", range(6))
def test_many_categories_and_rounding_match_the_stepwise_greedy(seed):
    """Many categories, whole-number ties, scores a float32 ulp apart (the merge's scores are
    float32) at huge, tiny and negative magnitudes, across powers of two, and lambdas below
    their rounding: the one-sort list is the stepwise greedy's, bit for bit."""
    rng = np.random.default_rng(seed)
    batch, width = 6, 60
    base = rng.choice([0.0, 1.0, -1.0, 2.0**54, -(2.0**-20), 1e-30], size=(batch, 1))
    step = np.spacing(np.abs(base).astype(np.float32)).astype(np.float64)
    ulps = rng.integers(-4, 4, size=(batch, width)) * step
    scores = np.where(base == 0, rng.integers(-3, 4, size=(batch, width)), base + ulps)
    scores = scores.astype(np.float32).astype(np.float64)
    scores[rng.random((batch, width)) < 0.1] = -np.inf
    categories = rng.integers(-1, rng.choice([2, 10, 60]), size=(batch, width))
    lambdas = rng.choice([0.0, 1e-17, 0.5, 1.0, 3.0, 2.0**-52, 4.0], size=batch)
    picked = greedy_diverse(scores, categories, 40, lambdas)
    for b in range(batch):
        expected = stepwise_greedy(scores[b], categories[b], 40, lambdas[b])
        assert [int(p) for p in picked[b] if p >= 0] == expected, b


def test_per_user_lambdas_and_prefixes():
    """One call with a lambda per user equals separate calls; a shorter list is a prefix."""
    rng = np.random.default_rng(2)
    scores, categories = sorted_case(rng, width=25, num_categories=3, batch=4)
    lambdas = np.array([0.0, 0.2, 1.0, 0.05])
    together = greedy_diverse(scores, categories, 10, lambdas)
    for b, lam in enumerate(lambdas):
        alone = greedy_diverse(scores[b : b + 1], categories[b : b + 1], 10, float(lam))
        assert np.array_equal(together[b], alone[0])
        assert np.array_equal(greedy_diverse(scores[b : b + 1], categories[b : b + 1], 4, lam)[0],
                              alone[0, :4])  # fmt: skip


def test_large_lambda_spreads_over_categories_and_ties_keep_candidate_order():
    scores = np.array([[5.0, 4.0, 3.0, 2.0, 1.0, 0.5]])
    categories = np.array([[0, 0, 0, 1, 1, 2]])
    assert greedy_diverse(scores, categories, 3, 0.0).tolist() == [[0, 1, 2]]
    assert greedy_diverse(scores, categories, 3, 10.0).tolist() == [[0, 3, 5]]
    # Equal gains: the earlier candidate (higher score, or smaller row) goes first.
    tied = np.array([[1.0, 1.0, 1.0]])
    assert greedy_diverse(tied, np.array([[0, 1, 2]]), 3, 0.5).tolist() == [[0, 1, 2]]


def test_diversity_measure():
    assert different_pairs(np.array([1, 1, 2, 3])) == 5
    lists = np.array([[1, 1, 1, 1], [1, 2, 3, 4], [1, 1, 2, 2], [7, 8, 0, 0]])
    measured = list_diversity(lists, lengths=np.array([4, 4, 4, 2]))
    assert measured.tolist() == pytest.approx([0.0, 1.0, 4 / 6, 1.0])
    assert list_diversity(np.array([[3]])).tolist() == [0.0]


def test_pool_and_bad_lambda():
    assert pool_size(10, 0.0) == 10
    assert pool_size(10, 0.1) > 10
    with pytest.raises(ValueError, match="negative"):
        greedy_diverse(np.zeros((1, 3)), np.zeros((1, 3), dtype=int), 2, -0.1)


def test_rerank_keeps_each_users_pool_and_n():
    rng = np.random.default_rng(3)
    scores, producing = sorted_case(rng, width=40, num_categories=4, batch=3)
    rows = rng.permutation(np.arange(1, 121))[:120].reshape(3, 40)
    categories = rng.integers(-1, 3, size=121)
    n, lambdas = np.array([2, 5, 10]), np.array([0.5, 0.0, 2.0])
    got_rows, got_scores, got_k, counts = rerank(rows, scores, producing, n, lambdas, categories)
    assert counts.tolist() == [2, 5, 10] and got_rows.shape == (3, 10)
    for b in range(3):
        pool = slice(0, POOL_MULTIPLE * n[b])  # user b never sees candidates past its pool
        alone = greedy_diverse(scores[b : b + 1, pool], categories[rows[b : b + 1, pool]],
                               n[b], lambdas[b])[0]  # fmt: skip
        assert got_rows[b, : n[b]].tolist() == rows[b, alone].tolist()
        assert got_scores[b, : n[b]].tolist() == scores[b, alone].tolist()
        assert got_k[b, : n[b]].tolist() == producing[b, alone].tolist()
        assert (got_rows[b, n[b] :] == 0).all()
    # Without categories the producing interest is the category.
    by_interest = rerank(rows, scores, producing, n, lambdas)[0]
    assert by_interest[0, :2].tolist() == rows[0, greedy_diverse(scores[:1, :8], producing[:1, :8],
                                                                 2, 0.5)[0]].tolist()  # fmt: skip
