"""REMI's training objective: sampled softmax with interest-aware hard negatives (IHN) plus
routing regularisation (RR), and the encoder-plus-loss module the trainer optimises."""

from __future__ import annotations

import torch
from torch import nn

from remi_core.models import MultiInterestEncoder, select_interest
from training.config import TrainConfig


def sampled_softmax_ihn(
    pos_logits: torch.Tensor,
    neg_logits: torch.Tensor,
    beta: float = 0.0,
    neg_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean sampled-softmax loss over the batch, with IHN importance weights.

    pos_logits (B,), neg_logits (B, L) for L shared uniform negatives, neg_mask (B, L) bool marks
    negatives to ignore (accidental hits of the positive). Each negative's exp-score is weighted by
    w_i = exp(beta s_i) / mean_j exp(beta s_j), a Monte-Carlo estimate of sampling from
    q_beta(i) ~ exp(beta s_i); the loss is -log(e^s+ / (e^s+ + sum_i w_i e^s_i)). It is computed
    in the log domain (log w_i added to the logits), which is exact and cannot overflow.
    beta = 0 makes every w_i = 1: the plain sampled softmax. As in the official code, gradients
    flow through the weights too.
    """
    if neg_mask is not None:
        neg_logits = neg_logits.masked_fill(neg_mask, -torch.inf)
    if beta != 0.0:
        scaled = beta * neg_logits
        if neg_mask is None:
            count = torch.full_like(pos_logits, neg_logits.shape[1])
        else:
            count = (~neg_mask).sum(dim=1).clamp(min=1).to(pos_logits.dtype)
        log_mean = torch.logsumexp(scaled, dim=1) - count.log()  # (B,)
        # A row whose negatives are all masked has nothing to weigh: -inf there would turn the
        # masked logits into -inf - -inf = NaN; 0 keeps them -inf (the beta = 0 result).
        log_mean = log_mean.nan_to_num(neginf=0.0)
        neg_logits = neg_logits + scaled - log_mean.unsqueeze(1)
    logits = torch.cat([pos_logits.unsqueeze(1), neg_logits], dim=1)  # (B, 1 + L)
    return (torch.logsumexp(logits, dim=1) - pos_logits).mean()


def routing_regularizer(routing: torch.Tensor, dim: int) -> torch.Tensor:
    """L_reg = sum over users of ||diag(C)||^2, C = (A - mean A)^T (A - mean A) / d.

    routing (B, K, L): A^T per user, softmax over the L positions for each of the K interests.
    diag(C)_k is (L times) the variance of interest k's routing weights: large when an interest
    concentrates on a few items, which is what stops every interest collapsing onto the same
    items. The 1/d scale and the batch sum match the official code, so its lambda values (e.g.
    100) mean the same here. Like the official code, the variance runs over all L slots, padding
    included (where the routing is ~0): a routing spread evenly over a short history still pays
    a little, so short histories are pushed somewhat harder towards spreading.
    """
    centred = routing - routing.mean(dim=2, keepdim=True)
    diag = centred.square().sum(dim=2) / dim  # (B, K), the diagonal of C without forming it
    return diag.square().sum()


def logits(
    user: torch.Tensor, target_emb: torch.Tensor, negative_emb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive (B,) and negative (B, L_neg) logits of user (B, d), in float32 even under
    autocast: bfloat16's 8-bit mantissa would blur IHN's exp(beta s) weights and the logsumexp
    over 1,280 negatives, and scored apart, an item would score differently as the positive
    (a float32 sum) than as a negative (a bfloat16 matmul, widened only after rounding)."""
    with torch.autocast(user.device.type, enabled=False):
        user = user.float()
        positive = (user * target_emb.float()).sum(dim=1)
        return positive, user @ negative_emb.float().T


def remi_loss(
    model: MultiInterestEncoder,
    items: torch.Tensor,
    mask: torch.Tensor,
    target: torch.Tensor,
    negatives: torch.Tensor,
    cfg: TrainConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, routing regulariser) for one batch."""
    interests, routing = model(items, mask)  # (B, K, d), (B, K, L)
    table = model.item_table()
    target_emb = table[target]  # (B, d)
    user = select_interest(interests, target_emb)  # (B, d)
    pos_logits, neg_logits = logits(user, target_emb, table[negatives])  # (B,), (B, L_neg)
    hits = negatives.unsqueeze(0) == target.unsqueeze(1) if cfg.remove_accidental_hits else None
    loss = sampled_softmax_ihn(pos_logits, neg_logits, cfg.beta, hits)
    reg = torch.zeros((), device=loss.device)
    if routing is not None and cfg.rr_lambda:
        reg = routing_regularizer(routing, cfg.dim)
        loss = loss + cfg.rr_lambda * reg
    return loss, reg


class Objective(nn.Module):
    """The encoder plus REMI's loss as one module, so DistributedDataParallel sees every use of
    the item table (input, target and negatives) inside a single forward."""

    def __init__(self, encoder: MultiInterestEncoder, cfg: TrainConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg

    def forward(self, items, mask, target, negatives) -> torch.Tensor:
        return remi_loss(self.encoder, items, mask, target, negatives, self.cfg)[0]
