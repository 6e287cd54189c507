"""Ranking metrics of the ComiRec/REMI protocol, computed on ranked lists.

Recall@N = hits / |truth| and HitRate@N = [hits > 0], averaged over users. NDCG@N uses binary
gains at the positions where hits occur, normalised by the ideal DCG of min(|truth|, N) hits.
(The official code sums gains in an order that loses the ranking; this one keeps it.)
"""

from __future__ import annotations

import torch


def hit_matrix(ranked: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """ranked (B, N) rows; truth (B, T) unique rows, right-padded with 0 -> hits (B, N) bool."""
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
    truth (B, T) unique rows padded with 0. num_truth (B,) overrides |truth| when some truth
    items cannot be listed (a model that does not know them still owes them).
    """
    hits = hit_matrix(ranked, truth).float()  # (B, N)
    if num_truth is None:
        num_truth = (truth > 0).sum(dim=1)
    num_truth = num_truth.clamp(min=1).float()  # (B,)
    discounts = 1.0 / torch.log2(torch.arange(hits.shape[1], device=hits.device) + 2.0)
    ideal = torch.cumsum(discounts, dim=0)  # ideal[m - 1] = IDCG of m hits
    out = {}
    for n in cutoffs:
        top = hits[:, :n]
        count = top.sum(dim=1)
        out[f"recall@{n}"] = count / num_truth
        out[f"hitrate@{n}"] = (count > 0).float()
        idcg_index = (torch.minimum(num_truth, torch.tensor(float(top.shape[1]))) - 1).long()
        out[f"ndcg@{n}"] = (top * discounts[: top.shape[1]]).sum(dim=1) / ideal[idcg_index]
    return out
