"""Test helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from remi_core.bundle import Bundle, write_bundle
from remi_core.models import EncoderConfig, build_encoder, pad_histories

TINY = {"num_items": 201, "dim": 16, "num_interests": 4, "seq_len": 10}


def tiny_item_ids(num_items: int = TINY["num_items"]) -> list[str | None]:
    return [None] + [f"books-{i:04d}" for i in range(1, num_items)]


def write_tiny_bundle(
    root: Path,
    seed: int = 0,
    publish: bool = True,
    version: str | None = None,
    popularity_size: int = 50,
    **config: int,
) -> Path:
    """Write a bundle from a seeded random encoder; returns the version directory."""
    cfg = EncoderConfig(**{**TINY, **config})
    with torch.random.fork_rng():  # seeded without disturbing other tests' randomness
        torch.manual_seed(seed)
        encoder = build_encoder(cfg)
    rng = np.random.default_rng(seed)
    popularity = rng.permutation(np.arange(1, cfg.num_items))[:popularity_size]
    return write_bundle(
        root,
        encoder=encoder,
        item_ids=tiny_item_ids(cfg.num_items),
        popularity=popularity,
        metadata={"dataset": "tiny-test", "seed": seed},
        version=version,
        publish=publish,
    )


def dead_redis_url() -> str:
    """A Redis URL nothing listens on (for tests that must not need Redis)."""
    from tests.conftest import free_port

    return f"redis://127.0.0.1:{free_port()}/0"


def encode(bundle: Bundle, history: list[str]) -> tuple[np.ndarray, list[int]]:
    """Interests (K, d) computed independently of the service, and all known rows."""
    row_of = bundle.row_of()
    rows = [row_of[item] for item in history if item in row_of]
    items, mask = pad_histories([rows[-bundle.config.seq_len :]], bundle.config.seq_len)
    with torch.inference_mode():
        interests, _ = bundle.encoder(items, mask)
    return interests[0].numpy(), rows


def assert_brute_force(
    bundle: Bundle, history: list[str], body: dict, n: int, exclude_history: bool
) -> None:
    """Every score is max_k <v_k, e_item>, and no item left out scores higher (Eq. 7, exact)."""
    interests, rows = encode(bundle, history)
    per_interest = bundle.item_embeddings @ interests.T  # (N, K)
    best = per_interest.max(axis=1)
    eligible = np.ones(len(best), dtype=bool)
    eligible[0] = False
    if exclude_history:
        eligible[rows] = False
    row_of = bundle.row_of()
    returned = [row_of[item["item_id"]] for item in body["items"]]
    assert len(returned) == len(set(returned)), "duplicate items"
    assert len(returned) == min(n, int(eligible.sum()))
    for item, row in zip(body["items"], returned, strict=True):
        assert eligible[row], f"{item['item_id']} should have been excluded"
        np.testing.assert_allclose(item["score"], best[row], rtol=1e-5, atol=1e-6)
        assert per_interest[row, item["interest"]] == best[row] or np.isclose(
            per_interest[row, item["interest"]], best[row], rtol=1e-5, atol=1e-6
        )
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)
    outside = eligible.copy()
    outside[returned] = False
    if outside.any() and returned:
        assert best[outside].max() <= min(scores) + 1e-6


def same_response(a: Any, b: Any) -> bool:
    """Deep equality that allows float noise: encoding a user inside a batch and alone may pick
    different matmul kernels, which round differently in the last bits."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-5, atol=1e-6))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_response(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_response(x, y) for x, y in zip(a, b, strict=True))
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        return same_response(dataclasses.asdict(a), dataclasses.asdict(b))
    return a == b
