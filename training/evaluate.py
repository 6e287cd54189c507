"""The paper's evaluation protocol on held-out users.

For each validation/test user, the first 80% of the sequence (its last seq_len items) is the
input and the remaining 20% is the ground truth. Candidates come from Eq. 7 with exact search
(`dense_merged_topk`, equal to K exact top-N searches merged by max score); a user with no known
input item gets the popularity list, as the service answers them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from remi_core.bundle import Bundle
from remi_core.diversity import POOL_MULTIPLE, gather, greedy_diverse, list_diversity
from remi_core.models import MultiInterestEncoder, pad_histories
from remi_core.retrieval import dense_merged_topk
from remi_core.threads import follow_load
from training.data import SequenceDataset
from training.metrics import ranking_metrics

CUTOFFS = (20, 50)


@dataclass
class EvalSet:
    """Inputs and ground truth of held-out users, as tensors."""

    items: torch.Tensor  # (U, L) right-padded input windows
    mask: torch.Tensor  # (U, L) bool
    truth: torch.Tensor  # (U, T) distinct truth rows, right-padded with 0; -1: unknown item
    # (U,) held-out interactions, repeats included (Recall's denominator); None: distinct items
    num_truth: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> EvalSet:
        num_truth = None if self.num_truth is None else self.num_truth.to(device)
        return EvalSet(
            self.items.to(device), self.mask.to(device), self.truth.to(device), num_truth
        )

    def __len__(self) -> int:
        return self.items.shape[0]


def make_eval_set(
    dataset: SequenceDataset, users: np.ndarray, seq_len: int, row_map: np.ndarray | None = None
) -> EvalSet:
    """Split each user's sequence 80/20 into input and truth.

    `row_map` translates this dataset's rows into another catalogue's rows (0 = unknown there), so
    an older bundle can be evaluated on the same users; unknown items drop out of the input and
    count as truth that model cannot hit.
    """
    histories, truths, counts = [], [], []
    for u in users:
        seq = dataset.sequences[u]
        cut = int(len(seq) * 0.8)
        history, truth = seq[:cut], np.unique(seq[cut:])
        counts.append(len(seq) - cut)
        if row_map is not None:
            history = row_map[history]
            history = history[history > 0]
            truth = np.where(row_map[truth] > 0, row_map[truth], -1)  # -1: counted, never hit
        histories.append(history)
        truths.append(truth)
    items, mask = pad_histories(histories, seq_len)
    width = max((len(t) for t in truths), default=1)
    truth = torch.zeros(len(truths), width, dtype=torch.long)
    for i, t in enumerate(truths):
        truth[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
    return EvalSet(items, mask, truth, torch.tensor(counts, dtype=torch.long))


def summarise(per_user: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(values.mean()) for name, values in per_user.items()}


def ranked_metrics(
    ranked: torch.Tensor, truth: torch.Tensor, num_truth: torch.Tensor | None = None
) -> dict[str, float]:
    return summarise(ranking_metrics(ranked, truth, CUTOFFS, num_truth))


@torch.inference_mode()
def evaluate_model(
    model: MultiInterestEncoder,
    eval_set: EvalSet,
    batch_size: int = 1024,
    popularity: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall/HitRate/NDCG@20,50 of a multi-interest encoder on an evaluation set.

    With `popularity` (the model's rows, most popular first), a user whose input holds no item
    the model knows (an older bundle on tonight's data) is ranked that list, as the service
    answers such a user; without it, such a user's list is whatever order the exact search
    gives interests computed from nothing.
    """
    was_training = model.training
    model.eval()
    device = model.item_table().device
    items = model.item_table()
    ranked = []
    for start in range(0, len(eval_set), batch_size):
        follow_load()
        chunk_items = eval_set.items[start : start + batch_size].to(device)
        chunk_mask = eval_set.mask[start : start + batch_size].to(device)
        interests, _ = model(chunk_items, chunk_mask)
        _, rows = dense_merged_topk(interests, items, max(CUTOFFS))  # (b, N)
        if popularity is not None:
            rows = _popular_when_unknown(rows, chunk_mask, popularity)
        ranked.append(rows)
    model.train(was_training)
    num_truth = None if eval_set.num_truth is None else eval_set.num_truth.to(device)
    return ranked_metrics(torch.cat(ranked), eval_set.truth.to(device), num_truth)


def _popular_when_unknown(
    rows: torch.Tensor, mask: torch.Tensor, popularity: np.ndarray
) -> torch.Tensor:
    """rows (b, N) with the users whose mask (b, L) is empty given the popularity list instead,
    padded with row 0 (never a hit) when it is shorter than N."""
    empty = ~mask.any(dim=1)  # (b,)
    if not bool(empty.any()):
        return rows
    head = torch.as_tensor(popularity[: rows.shape[1]], dtype=rows.dtype, device=rows.device)
    rows = rows.clone()
    rows[empty] = 0
    rows[empty, : len(head)] = head
    return rows


@torch.inference_mode()
def evaluate_diversity(
    model: MultiInterestEncoder,
    eval_set: EvalSet,
    lambdas: list[float],
    categories: np.ndarray | None = None,
    n: int = 50,
    batch_size: int = 1024,
    popularity: np.ndarray | None = None,
) -> list[dict[str, float]]:
    """Recall@n, HitRate@n and list diversity of ComiRec's greedy aggregation, per lambda.

    Each user's n items are chosen by `greedy_diverse` from the exact Eq. 7 top `pool_size`
    candidates; `categories` (N,) gives each catalogue row's category (-1: none), and without it
    the interest that produced an item is its category, as in serving. Diversity is ComiRec's:
    the share of item pairs in a list whose categories differ, averaged over users.

    With `popularity`, a user whose input holds no known item gets the most popular n at every
    lambda, as the service answers (and `evaluate_model` ranks) such a user, so lambda 0 gives
    the model's own Recall@n; without categories such a list has no producing interests, and
    its user is left out of the diversity mean.
    """
    was_training = model.training
    model.eval()
    device = model.item_table().device
    items = model.item_table()
    pool = POOL_MULTIPLE * n
    ranked: dict[float, list[np.ndarray]] = {lam: [] for lam in lambdas}
    spread: dict[float, list[np.ndarray]] = {lam: [] for lam in lambdas}
    head = np.zeros(n, dtype=np.int64)  # the popularity fallback, padded with row 0
    if popularity is not None:
        head[: min(n, len(popularity))] = popularity[:n]
    for start in range(0, len(eval_set), batch_size):
        mask = eval_set.mask[start : start + batch_size]
        interests, _ = model(
            eval_set.items[start : start + batch_size].to(device), mask.to(device)
        )  # (b, K, d)
        fallback = ~mask.any(dim=1).cpu().numpy() & (popularity is not None)  # (b,)
        scores, rows = dense_merged_topk(interests, items, pool)  # (b, P)
        if categories is None:
            per_interest = torch.einsum("bpd,bkd->bpk", items[rows], interests)  # (b, P, K)
            cats = per_interest.argmax(dim=2).cpu().numpy()
        else:
            cats = categories[rows.cpu().numpy()]
        scores_np, rows_np = scores.float().cpu().numpy(), rows.cpu().numpy()
        for lam in lambdas:
            picked = greedy_diverse(scores_np, cats, n, lam)  # (b, w): w < n below n items
            chosen, chosen_cats = gather(rows_np, picked), gather(cats, picked)  # (b, w)
            lengths = (picked >= 0).sum(axis=1)
            fill = head[: picked.shape[1]]
            chosen[fallback] = fill
            lengths[fallback] = int((fill > 0).sum())
            if categories is not None:
                chosen_cats[fallback] = categories[fill]
            ranked[lam].append(chosen)
            per_user = list_diversity(chosen_cats, lengths)
            spread[lam].append(per_user if categories is not None else per_user[~fallback])
    model.train(was_training)
    out = []
    for lam in lambdas:
        metrics = ranking_metrics(
            torch.from_numpy(np.concatenate(ranked[lam])), eval_set.truth, (n,), eval_set.num_truth
        )
        measured = np.concatenate([np.zeros(0), *spread[lam]])
        out.append(
            {
                "lambda": lam,
                f"recall@{n}": float(metrics[f"recall@{n}"].mean()),
                f"hitrate@{n}": float(metrics[f"hitrate@{n}"].mean()),
                # 0 when no user has a list to measure (every one a fallback, no categories)
                f"diversity@{n}": float(measured.mean()) if len(measured) else 0.0,
            }
        )
    return out


def evaluate_popularity(popularity: np.ndarray, eval_set: EvalSet) -> dict[str, float]:
    """The most-popular baseline: every user gets the same ranked list."""
    top = torch.as_tensor(popularity[: max(CUTOFFS)], dtype=torch.long)
    ranked = top.unsqueeze(0).expand(len(eval_set), -1)
    return ranked_metrics(ranked, eval_set.truth, eval_set.num_truth)


@torch.inference_mode()
def routing_concentration(
    model: MultiInterestEncoder, eval_set: EvalSet, max_users: int = 1024
) -> float | None:
    """Mean over users and interests of an interest's largest routing weight.

    Near 1 means routing collapse: each interest is built from a single history item; 1/L means
    interests that average the whole history. None for models without a routing matrix.
    """
    was_training = model.training
    model.eval()
    device = model.item_table().device
    items = eval_set.items[:max_users].to(device)
    _, routing = model(items, eval_set.mask[:max_users].to(device))
    model.train(was_training)
    return None if routing is None else float(routing.amax(dim=2).mean())


def evaluate_bundle(
    bundle: Bundle, dataset: SequenceDataset, split: str = "test", users: np.ndarray | None = None
) -> dict[str, float]:
    """Metrics of a bundle's encoder on a dataset's held-out users (those of `split`, or `users`),
    matching items by external id.

    The dataset may have a different catalogue (e.g. tonight's, with new items): its items are
    translated to the bundle's rows, and items the bundle does not know cannot be hit; a user
    with no item the bundle knows gets its popularity list, as the service answers them.
    """
    eval_set = bundle_eval_set(bundle, dataset, split, users)
    return evaluate_model(bundle.encoder, eval_set, popularity=bundle.popularity)


def bundle_eval_set(
    bundle: Bundle, dataset: SequenceDataset, split: str, users: np.ndarray | None = None
) -> EvalSet:
    """A dataset's held-out users (those of `split`, or `users`) in a bundle's catalogue rows
    (see `evaluate_bundle`)."""
    row_of = bundle.row_of()
    row_map = np.array([row_of.get(item, 0) if item else 0 for item in dataset.item_ids], np.int64)
    users = dataset.users(split) if users is None else users
    return make_eval_set(dataset, users, bundle.config.seq_len, row_map=row_map)
