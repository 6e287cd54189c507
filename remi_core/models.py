"""Multi-interest user encoders.

Every encoder maps a right-padded behaviour window to K interest vectors and, where the model
has one, the item-to-interest routing matrix that REMI's routing regulariser acts on:

    items (B, L) int64, mask (B, L) bool  ->  interests (B, K, d), routing (B, K, L) | None

Model types (registry names), following the official REMI code (Tokkiu/REMI):

- "comirec-sa": ComiRec-SA, self-attentive routing; routing = the attention matrix.
- "comirec-dr": ComiRec-DR, capsule dynamic routing with a per-position bilinear map;
  routing = the final coupling coefficients.
- "mind": MIND, capsule dynamic routing with one shared bilinear map and Gaussian routing
  logits; routing = the final coupling coefficients. Stochastic in training mode (see MIND).
- "youtube-dnn": YouTube DNN, masked mean pooling and a linear layer; one interest, no routing.
- "gru4rec": GRU4Rec, the GRU state after the last valid item; one interest, no routing.

Single-interest models ignore `EncoderConfig.num_interests` and output K = 1;
`MultiInterestEncoder.num_interests` always reports the K a model really outputs.

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
    """K, the number of interest vectors per user; single-interest models ignore it (K = 1)."""
    seq_len: int = 20
    """Length of the behaviour window the encoder reads (the most recent items)."""
    routing_grad: bool = False
    """Dynamic routing (ComiRec-DR, MIND) only: backpropagate through every routing iteration,
    so the coupling coefficients get gradients and REMI's routing regulariser can shape them.
    False is the official stop-gradient, under which RR cannot act on these models."""

    def __post_init__(self) -> None:
        if self.routing_grad and self.model_type not in CAPSULE_MODEL_TYPES:
            raise ValueError(
                f"routing_grad applies to {', '.join(CAPSULE_MODEL_TYPES)} only, "
                f"not {self.model_type!r}"
            )

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

    def reset_parameters(self) -> None:
        # Kaiming-normal on every weight (the item table included), as the official code does.
        for weight in self.parameters():
            nn.init.kaiming_normal_(weight)

    @property
    def num_interests(self) -> int:
        """K of the interests (B, K, d) that forward returns, which may differ from the config."""
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

    def routing(self, items: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return masked item representations H (B, L, d) and routing A (B, K, L)."""
        h = self.item_embedding(items) * mask.unsqueeze(-1).to(self.item_embedding.weight.dtype)
        positions = self.position_embedding[:, : items.shape[1]]  # (1, L, d)
        logits = self.attn_out(torch.tanh(self.attn_hidden(h + positions)))
        logits = logits.transpose(1, 2)  # (B, K, L)
        logits = logits.masked_fill(~mask.unsqueeze(1), _MASK_VALUE)
        return h, F.softmax(logits, dim=-1)

    def forward(
        self, items: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, routing = self.routing(items, mask)  # (B, L, d), (B, K, L)
        return routing @ h, routing  # (B, K, d)


def _squash(s: torch.Tensor) -> torch.Tensor:
    """Capsule squash v = |s|^2 / (1 + |s|^2) * s / |s| over the last axis.

    The 1e-9 (as in the official code) keeps an all-padding user's zero capsule finite.
    """
    norm2 = s.square().sum(dim=-1, keepdim=True)
    return s * (norm2 / (1.0 + norm2) / torch.sqrt(norm2 + 1e-9))


class _CapsuleEncoder(MultiInterestEncoder):
    """Dynamic (behaviour-to-interest) routing shared by ComiRec-DR and MIND.

    Mirrors the CapsuleNetwork of the official REMI code: the routing logits b (B, K, L) are
    softmax-normalised over the L positions of each interest (REMI's PyTorch code; the original
    ComiRec TensorFlow code normalises over the K interests instead), all but the last iteration
    route a stop-gradient copy of the predictions u_hat and update b, and the last iteration
    routes u_hat itself so gradients reach the encoder only through that final capsule.

    One deliberate difference: padded positions are masked *before* the softmax, so the
    coupling coefficients of an interest sum to 1 over the valid positions. The official code
    zeroes them after a softmax over all L positions, which leaks routing mass to padding and
    shrinks the capsules of short histories; both agree on full windows.

    Without `cfg.routing_grad` (the official stop-gradient) the coupling coefficients are a
    function of detached tensors only, so the returned routing matrix carries no gradient: REMI's
    routing regulariser then changes the loss value but not the training of these models.
    With it, every iteration routes u_hat itself and the whole loop is differentiable.
    """

    routing_iterations: int = 3

    def predictions(self, h: torch.Tensor) -> torch.Tensor:
        """Per-interest predictions u_hat (B, K or 1, L, d) of the masked items h (B, L, d)."""
        raise NotImplementedError

    def initial_logits(self, batch: int, length: int, like: torch.Tensor) -> torch.Tensor:
        """Routing logits b (B, K, L) before the first iteration."""
        raise NotImplementedError

    def output(self, capsules: torch.Tensor) -> torch.Tensor:
        """Hook applied to the final capsules (B, K, d)."""
        return capsules

    def forward(
        self, items: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Zeroed padding makes u_hat vanish there (the maps have no bias), so padded items can
        # neither move the logits nor enter a capsule.
        h = self.item_embedding(items) * mask.unsqueeze(-1).to(self.item_embedding.weight.dtype)
        u_hat = self.predictions(h)  # (B, K, L, d); MIND's shared map gives (B, 1, L, d)
        u_iter = u_hat if self.cfg.routing_grad else u_hat.detach()
        batch, length = items.shape
        logits = self.initial_logits(batch, length, h)  # (B, K, L)
        valid = mask.unsqueeze(1)  # (B, 1, L)
        # Multiplying by `valid` after the masked softmax also gives an all-padding user an
        # all-zero routing row instead of a uniform one over padding.
        valid_f = valid.to(h.dtype)
        for i in range(self.routing_iterations):
            coupling = F.softmax(logits.masked_fill(~valid, _MASK_VALUE), dim=-1) * valid_f
            if i < self.routing_iterations - 1:
                capsules = _squash((coupling.unsqueeze(2) @ u_iter).squeeze(2))  # (B, K, d)
                logits = logits + (u_iter @ capsules.unsqueeze(-1)).squeeze(-1)  # (B, K, L)
            else:
                capsules = _squash((coupling.unsqueeze(2) @ u_hat).squeeze(2))  # (B, K, d)
        return self.output(capsules), coupling


class ComiRecDR(_CapsuleEncoder):
    """ComiRec-DR (Cen et al., KDD 2020): dynamic routing with a per-position bilinear map.

    u_hat_{k,l} = W_{l,k} e_l with a separate d x d map for every (position, interest) pair
    (the official bilinear_type 2), routing logits start at 0, 3 routing iterations.
    routing = the final coupling coefficients c (B, K, L), zero on padding.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg)
        # Kept in the official (1, L, K*d, d) layout because kaiming_normal_ derives its fan-in
        # from the shape, and the initial scale should match the reference implementation.
        self.bilinear = nn.Parameter(
            torch.empty(1, cfg.seq_len, cfg.num_interests * cfg.dim, cfg.dim)
        )
        self.reset_parameters()

    def predictions(self, h: torch.Tensor) -> torch.Tensor:
        batch, length, d = h.shape
        u_hat = torch.einsum("lod,bld->blo", self.bilinear[0, :length], h)  # (B, L, K*d)
        return u_hat.view(batch, length, self.cfg.num_interests, d).transpose(1, 2)  # (B,K,L,d)

    def initial_logits(self, batch: int, length: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(batch, self.cfg.num_interests, length)


class MIND(_CapsuleEncoder):
    """MIND (Li et al., CIKM 2019): dynamic routing with one bilinear map shared by all interests.

    u_hat_{k,l} = S e_l for every interest k (the official bilinear_type 0). Identical predictions
    would route identically and collapse the K interests into one, so the routing logits start
    from a standard Gaussian draw instead of 0; that is what separates the interests.

    Randomness: in training mode every forward draws fresh logits with the global torch RNG
    (generator-free torch.randn, as the official code), so training forwards are stochastic and
    reproducible only through torch.manual_seed. In eval mode the logits start from one fixed
    Gaussian draw per (interest, position), made at construction and kept as the persistent
    buffer `eval_routing_init`, so evaluation and serving are deterministic and a checkpoint or
    bundle reproduces the exact interests (the official code draws anew at evaluation too).

    `relu_layer` adds the official optional Linear + ReLU on the capsules (REMI enables it for the
    Book dataset only); it is off by default and not part of EncoderConfig, so bundles always
    rebuild MIND without it.
    """

    def __init__(self, cfg: EncoderConfig, relu_layer: bool = False) -> None:
        super().__init__(cfg)
        self.bilinear = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.relu_layer: nn.Module | None = None
        if relu_layer:
            self.relu_layer = nn.Sequential(nn.Linear(cfg.dim, cfg.dim, bias=False), nn.ReLU())
        self.register_buffer("eval_routing_init", torch.randn(1, cfg.num_interests, cfg.seq_len))
        self.reset_parameters()

    def predictions(self, h: torch.Tensor) -> torch.Tensor:
        # One map for all interests: broadcasting over K replaces the official K-fold repeat.
        return self.bilinear(h).unsqueeze(1)  # (B, 1, L, d)

    def initial_logits(self, batch: int, length: int, like: torch.Tensor) -> torch.Tensor:
        if self.training:
            return torch.randn(
                batch, self.cfg.num_interests, length, device=like.device, dtype=like.dtype
            )
        init = self.eval_routing_init[:, :, :length].to(like.dtype)
        return init.expand(batch, -1, -1)  # (B, K, L)

    def output(self, capsules: torch.Tensor) -> torch.Tensor:
        return capsules if self.relu_layer is None else self.relu_layer(capsules)


class YouTubeDNN(MultiInterestEncoder):
    """YouTube DNN (Covington et al., RecSys 2016) as in the official REMI code.

    One interest: a bias-free linear layer on the mean of the valid history embeddings. The
    official code leaves the ReLU after the layer commented out; so does this one.
    `cfg.num_interests` is ignored: the output is always (B, 1, d) and `num_interests` is 1.
    There is no routing matrix (uniform pooling weights have nothing for RR to act on).
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg)
        self.linear = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.reset_parameters()

    @property
    def num_interests(self) -> int:
        return 1

    def forward(
        self, items: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        weights = mask.unsqueeze(-1).to(self.item_embedding.weight.dtype)  # (B, L, 1)
        # The official code sums the unmasked embeddings, so padding row 0 (re-initialised to
        # non-zero by kaiming) leaks into the mean of short histories; masking avoids that.
        total = (self.item_embedding(items) * weights).sum(dim=1)  # (B, d)
        mean = total / weights.sum(dim=1).clamp(min=1.0)
        return self.linear(mean).unsqueeze(1), None  # (B, 1, d)


class GRU4Rec(MultiInterestEncoder):
    """GRU4Rec (Hidasi et al., ICLR 2016) as in the official REMI code.

    Embedding dropout, a bias-free GRU with hidden size 2d, and a dense 2d -> d layer on the
    output after the last valid item. Layers and dropout default to REMI's command-line defaults
    (--layers 1, --dropout 0.2). `cfg.num_interests` is ignored: the output is (B, 1, d) and
    `num_interests` is 1. There is no routing matrix.
    """

    def __init__(self, cfg: EncoderConfig, num_layers: int = 1, dropout: float = 0.2) -> None:
        super().__init__(cfg)
        d = cfg.dim
        self.emb_dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(d, 2 * d, num_layers=num_layers, batch_first=True, bias=False)
        self.dense = nn.Linear(2 * d, d)
        self.reset_parameters()

    @property
    def num_interests(self) -> int:
        return 1

    def reset_parameters(self) -> None:
        # The official initialisation: Xavier-normal item table, Xavier-uniform first GRU layer;
        # deeper GRU layers and the dense layer keep PyTorch's defaults.
        nn.init.xavier_normal_(self.item_embedding.weight)
        nn.init.xavier_uniform_(self.gru.weight_ih_l0)
        nn.init.xavier_uniform_(self.gru.weight_hh_l0)

    def forward(
        self, items: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Right padding comes after the last valid step, so a unidirectional GRU never sees it
        # there; zeroing it only matters for an all-padding row, which then ignores its items.
        h = self.item_embedding(items) * mask.unsqueeze(-1).to(self.item_embedding.weight.dtype)
        states, _ = self.gru(self.emb_dropout(h))  # (B, L, 2d)
        # An empty history reads position 0 instead of the official index -1.
        last = (mask.sum(dim=1) - 1).clamp(min=0)  # (B,)
        final = states[torch.arange(items.shape[0], device=items.device), last]  # (B, 2d)
        return self.dense(final).unsqueeze(1), None  # (B, 1, d)


_REGISTRY: dict[str, type[MultiInterestEncoder]] = {
    "comirec-sa": ComiRecSA,
    "comirec-dr": ComiRecDR,
    "mind": MIND,
    "youtube-dnn": YouTubeDNN,
    "gru4rec": GRU4Rec,
}
MODEL_TYPES: tuple[str, ...] = tuple(_REGISTRY)
CAPSULE_MODEL_TYPES: tuple[str, ...] = tuple(
    name for name, cls in _REGISTRY.items() if issubclass(cls, _CapsuleEncoder)
)


def build_encoder(cfg: EncoderConfig) -> MultiInterestEncoder:
    """Instantiate the encoder a configuration describes."""
    try:
        cls = _REGISTRY[cfg.model_type]
    except KeyError:
        raise ValueError(
            f"unknown model_type {cfg.model_type!r}; expected one of {', '.join(MODEL_TYPES)}"
        ) from None
    return cls(cfg)


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights as contiguous CPU tensors, as safetensors and checkpoints store them."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


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
    # Filled in numpy: a tensor assignment per row cost ~10 us, 3% of serving a batch.
    items = np.zeros((len(histories), seq_len), dtype=np.int64)
    for b, history in enumerate(histories):
        window = np.asarray(history, dtype=np.int64)[-seq_len:]
        items[b, : len(window)] = window
    tensor = torch.from_numpy(items)
    return tensor, tensor > 0
