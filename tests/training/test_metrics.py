"""Ranking metrics on tiny hand-computed cases."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from training.data import build_dataset
from training.evaluate import EvalSet, evaluate_popularity, make_eval_set, ranked_metrics
from training.metrics import ranking_metrics


def test_one_user_by_hand():
    ranked = torch.tensor([[5, 3, 9, 1]])
    truth = torch.tensor([[3, 1, 7]])  # hits at ranks 2 and 4 (1-based)
    m = ranking_metrics(ranked, truth, (2, 4))
    assert m["recall@2"].item() == pytest.approx(1 / 3)
    assert m["recall@4"].item() == pytest.approx(2 / 3)
    assert m["hitrate@2"].item() == 1.0
    dcg2 = 1 / math.log2(3)
    assert m["ndcg@2"].item() == pytest.approx(dcg2 / (1 + 1 / math.log2(3)))
    dcg4 = 1 / math.log2(3) + 1 / math.log2(5)
    idcg4 = 1 + 1 / math.log2(3) + 1 / math.log2(4)  # min(|truth| = 3, 4) ideal hits
    assert m["ndcg@4"].item() == pytest.approx(dcg4 / idcg4)


def test_rank_order_matters_for_ndcg_only():
    truth = torch.tensor([[1, 0]])  # one truth item, padded
    early = ranking_metrics(torch.tensor([[1, 2, 3]]), truth, (3,))
    late = ranking_metrics(torch.tensor([[2, 3, 1]]), truth, (3,))
    assert early["recall@3"] == late["recall@3"] == 1.0
    assert early["ndcg@3"].item() == pytest.approx(1.0)
    assert late["ndcg@3"].item() == pytest.approx(1 / math.log2(4))


def test_miss_gives_zeros_and_users_average():
    ranked = torch.tensor([[4, 5], [1, 2]])
    truth = torch.tensor([[1, 0], [1, 2]])
    m = ranking_metrics(ranked, truth, (2,))
    assert m["recall@2"].tolist() == [0.0, 1.0]
    assert m["hitrate@2"].tolist() == [0.0, 1.0]
    assert m["ndcg@2"].tolist() == pytest.approx([0.0, 1.0])


def test_popularity_baseline_uses_the_same_metric_code():
    eval_set = EvalSet(
        items=torch.zeros(2, 3, dtype=torch.long),
        mask=torch.zeros(2, 3, dtype=torch.bool),
        truth=torch.tensor([[2, 0], [7, 8]]),
    )
    popularity = np.arange(1, 61)  # rows 1..60, row 1 most popular
    m = evaluate_popularity(popularity, eval_set)
    assert m["recall@20"] == pytest.approx((1.0 + 1.0) / 2)
    assert m["ndcg@20"] == pytest.approx(
        (1 / math.log2(3) + (1 / math.log2(8) + 1 / math.log2(9)) / (1 + 1 / math.log2(3))) / 2
    )


def test_truth_unknown_to_the_model_counts_but_never_matches():
    # Truth {3, an item the evaluated bundle lacks (-1)}; the bundle ranks 3 first.
    m = ranked_metrics(torch.tensor([[3, 5]]), torch.tensor([[3, -1]]))
    assert m["recall@20"] == pytest.approx(0.5)
    assert m["ndcg@20"] == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_a_repeated_held_out_item_counts_once_per_interaction_in_recall():
    # History a..h, held out [x, x] (80/20 cut at 8): one distinct item, two interactions. The
    # official code divides by the interactions, so retrieving x gives Recall 1/2, not 1.
    items = [*"abcdefgh", "x", "x"]
    rows = pd.DataFrame({"user": "u", "item": items, "time": range(len(items))})
    dataset = build_dataset(rows, "t", min_count=1)
    eval_set = make_eval_set(dataset, np.array([0]), seq_len=20)
    x = dataset.item_ids.index("x")
    assert eval_set.truth.tolist() == [[x]] and eval_set.num_truth.tolist() == [2]
    m = ranked_metrics(torch.tensor([[x, 1]]), eval_set.truth, eval_set.num_truth)
    assert m["recall@20"] == pytest.approx(0.5)
    assert m["hitrate@20"] == 1.0
    assert m["ndcg@20"] == pytest.approx(1.0)  # the one distinct item, ranked first
