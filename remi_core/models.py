"""Multi-interest user encoders.

Every encoder maps a right-padded behaviour window to K interest vectors and, where the model
has one, the item-to-interest routing matrix that REMI's routing regulariser acts on:

    items (B, L) int64, mask (B, L) bool  ->  interests (B, K, d), routing (B, K, L) | None

Row 0 of the item table is padding. The configuration is plain data so a bundle can rebuild
the same encoder from its manifest alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The official code masks padded positions with -2**32 + 1 before the softmax; any large negative
# works, but a finite one keeps an all-padding row from turning into NaN.
_MASK_VALUE = -(2.0**32) + 1.0


@dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters that fully determine an encoder's architecture."""

    num_items: int
    """Rows in the item table, padding row 0 included."""
    model_type: str = "comirec-sa"
    """One of MODEL_TYPES."""
    dim: int = 64
    """Embedding size d."""
    num_interests: int = 4
    """K, the number of interest vectors per user."""
    seq_len: int = 20
    """Length of the behaviour window the encoder reads (the most recent items)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown encoder settings: {sorted(unknown)}")
        return cls(**data)


class MultiInterestEncoder(nn.Module):
    """Shared item table and the interface every encoder implements."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        if cfg.num_items < 2:
            raise ValueError("an encoder needs at least one real item besides padding row 0")
        self.cfg = cfg
        self.item_embedding = nn.Embedding(cfg.num_items, cfg.dim, padding_idx=0)

    @property
    def num_interests(self) -> int:
        return self.cfg.num_interests

    def item_table(self) -> torch.Tensor:
        """(N, d) embeddings used both as encoder input and as retrieval targets."""
        return self.item_embedding.weight

    def forward(
        self, items: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class ComiRecSA(MultiInterestEncoder):
    """ComiRec-SA (Cen et al., KDD 2020): self-attentive multi-interest extraction.

    A = softmax_L(W2 tanh(W1 (H + P)))  with padding masked, V_u = H A.
    Position embeddings only shape the routing; interests are mixtures of the raw item embeddings,
    as in the paper and its official code.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg)
        d = cfg.dim
        self.position_embedding = nn.Parameter(torch.empty(1, cfg.seq_len, d))
        self.attn_hidden = nn.Linear(d, 4 * d, bias=False)
        self.attn_out = nn.Linear(4 * d, cfg.num_interests, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Kaiming-normal on every weight, as the official REMI code does.
        for weight in self.parameters():
            nn.init.kaiming_normal_(weight)

    def routing(self, items: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return masked item representations H (B, L, d) and routing A (B, K, L)."""
        h = self.item_embedding(items) * mask.unsqueeze(-1).to(self.item_embedding.weight.dtype)
        length = items.shape[1]
        logits = self.attn_out(torch.tanh(self.attn_hidden(h + self.position_embedding[:, :length])))
        logits = logits.transpose(1, 2)  # (B, K, L)
        logits = logits.masked_fill(~mask.unsqueeze(1), _MASK_VALUE)
        return h, F.softmax(logits, dim=-1)

    def forward(
        self, items: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, routing = self.routing(items, mask)  # (B, L, d), (B, K, L)
        return routing @ h, routing  # (B, K, d)


_REGISTRY: dict[str, type[MultiInterestEncoder]] = {
    "comirec-sa": ComiRecSA,
}
MODEL_TYPES: tuple[str, ...] = tuple(_REGISTRY)


def build_encoder(cfg: EncoderConfig) -> MultiInterestEncoder:
    """Instantiate the encoder a configuration describes."""
    try:
        cls = _REGISTRY[cfg.model_type]
    except KeyError:
        raise ValueError(
            f"unknown model_type {cfg.model_type!r}; expected one of {', '.join(MODEL_TYPES)}"
        ) from None
    return cls(cfg)


def select_interest(interests: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard read-out: the interest closest to the target item, by inner product.

    interests (B, K, d), target (B, d) -> (B, d)
    """
    scores = torch.einsum("bkd,bd->bk", interests, target)
    chosen = scores.argmax(dim=1)
    return interests[torch.arange(interests.shape[0], device=interests.device), chosen]


def pad_histories(
    histories: list[list[int]] | list[np.ndarray], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad the last seq_len rows of each history, oldest first, as training windows are.

    -> items (B, seq_len) int64, mask (B, seq_len) bool
    """
    items = torch.zeros(len(histories), seq_len, dtype=torch.long)
    for b, history in enumerate(histories):
        window = list(history)[-seq_len:]
        if window:
            items[b, : len(window)] = torch.as_tensor(window, dtype=torch.long)
    return items, items > 0
