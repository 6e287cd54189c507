"""Training settings: everything that determines a run, besides the data."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from remi_core.models import MODEL_TYPES, EncoderConfig


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (with the data and the seed)."""

    model_type: str = "comirec-sa"
    """Encoder architecture: comirec-sa, comirec-dr, mind, youtube-dnn or gru4rec."""
    dim: int = 64
    """Embedding size d."""
    num_interests: int = 4
    """K, interests per user."""
    seq_len: int = 20
    """History window read by the encoder."""
    beta: float = 0.1
    """IHN concentration; 0 gives the plain sampled softmax."""
    rr_lambda: float = 100.0
    """Weight of the routing regulariser; 0 disables RR. beta=0, lambda=0 is plain ComiRec-SA."""
    routing_grad: bool = False
    """ComiRec-DR and MIND only: gradients through every dynamic-routing iteration, so RR can
    act on their routing; False is the official stop-gradient (see EncoderConfig)."""
    num_negatives: int = 0
    """Shared uniform negatives per batch; 0 means 10 x batch_size."""
    remove_accidental_hits: bool = True
    """Ignore a sampled negative that is the positive itself (as TensorFlow's sampled softmax)."""
    batch_size: int = 128
    """Training examples per step."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW); 0 is plain Adam, the official code's optimiser. Without it
    the item table overfits: on Beauty validation Recall@50 peaks early and then falls."""
    max_iters: int = 1_000_000
    """Upper bound on training steps."""
    eval_every: int = 200
    """Validate (Recall@50 on validation users) every this many steps."""
    patience: int = 50
    """Stop after this many validations without improvement."""
    seed: int = 2023
    """Seeds initialisation and sampling; CPU runs with the same seed repeat exactly."""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ..."""
    amp: bool = False
    """bfloat16 autocast for the forward pass (weights, Adam, the logits and the loss stay
    float32)."""
    compile: bool = False
    """torch.compile the training step (a one-off compilation; needs a C++ compiler on CPU)."""

    def __post_init__(self) -> None:
        # Type-checked here too, not only by the CLI: a hand-edited config.json ("dim": 16.0)
        # was a TypeError traceback in evaluate, export and --resume.
        kinds = {"int": int, "float": (int, float), "bool": bool, "str": str}
        for f in fields(self):
            value, kind = getattr(self, f.name), kinds.get(str(f.type))
            if kind is not None and (
                not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)
            ):
                raise ValueError(f"{f.name} must be of type {f.type}, not {value!r}")
        positive = ("dim", "num_interests", "seq_len", "batch_size", "max_iters", "eval_every",
                    "patience")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("beta", "rr_lambda", "num_negatives", "lr", "weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:  # NaN trains to NaN weights, "finishing"
                raise ValueError(f"{name} must be a finite number >= 0, not {value}")
        if not -(2**63) <= self.seed < 2**63:  # torch's; past them an unnamed OverflowError
            raise ValueError(f"seed must be a whole number from -2^63 to 2^63 - 1, not {self.seed}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, not {self.model_type!r}")
        if self.device != "auto":
            try:  # the name only: whether the device is there is known when training starts
                kind = torch.device(self.device).type
            except RuntimeError:
                kind = None
            if kind not in ("cpu", "cuda"):  # meta, mps, xpu, ... failed deep in training
                raise ValueError(
                    f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {self.device!r}"
                )
        self.encoder_config(num_items=2)  # architecture checks (routing_grad) fail here, early

    def encoder_config(self, num_items: int) -> EncoderConfig:
        return EncoderConfig(
            num_items=num_items,
            model_type=self.model_type,
            dim=self.dim,
            num_interests=self.num_interests,
            seq_len=self.seq_len,
            routing_grad=self.routing_grad,
        )

    @property
    def negatives(self) -> int:
        return self.num_negatives or 10 * self.batch_size

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings: {unknown}")
        return cls(**data)
