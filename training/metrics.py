"""Ranking metrics of the ComiRec/REMI protocol, computed on ranked lists.

Recall@N = hits / |held-out interactions| and HitRate@N = [hits > 0], averaged over users; hits
count distinct retrieved items, and a repeated held-out item counts once per interaction in the
denominator, as in the official code. NDCG@N uses binary gains at the positions where hits occur,
normalised by the ideal DCG of min(|distinct truth items|, N) hits. (The official code sums gains
in an order that loses the ranking; this one keeps it.)
"""

from __future__ import annotations

import torch


def hit_matrix(ranked: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """ranked (B, N) rows; truth (B, T) distinct rows, padded with 0 (-1 never hits) -> (B, N)."""
    hits = (ranked.unsqueeze(2) == truth.unsqueeze(1)) & (truth.unsqueeze(1) > 0)
    return hits.any(dim=2)


def ranking_metrics(
    ranked: torch.Tensor,
    truth: torch.Tensor,
    cutoffs: tuple[int, ...] = (20, 50),
    num_truth: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-user recall, hit rate and NDCG at each cutoff: {"recall@20": (B,), ...}.

    ranked (B, N) best first with N >= max(cutoffs) (or the catalogue size if smaller);
    truth (B, T) distinct rows padded with 0, where -1 marks an item the ranked catalogue lacks
    (a model that does not know it still owes it: counted, never hit). num_truth (B,) is the
    number of held-out interactions, repeats included (default: the distinct truth items).
    """
    hits = hit_matrix(ranked, truth).float()  # (B, N)
    distinct = (truth != 0).sum(dim=1).float()  # (B,)
    if num_truth is None:
        num_truth = distinct
    num_truth = num_truth.clamp(min=1).float()  # (B,)
    discounts = 1.0 / torch.log2(torch.arange(hits.shape[1], device=hits.device) + 2.0)
    ideal = torch.cumsum(discounts, dim=0)  # ideal[m - 1] = IDCG of m hits
    out = {}
    for n in cutoffs:
        top = hits[:, :n]
        count = top.sum(dim=1)
        out[f"recall@{n}"] = count / num_truth
        out[f"hitrate@{n}"] = (count > 0).float()
        idcg_index = (distinct.clamp(min=1, max=top.shape[1]) - 1).long()
        out[f"ndcg@{n}"] = (top * discounts[: top.shape[1]]).sum(dim=1) / ideal[idcg_index]
    return out
