"""Serving with the encoder on CUDA (`REMI_DEVICE=cuda`): runs only where a CUDA device is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from remi_core.bundle import load_bundle, resolve_current
from service.app import create_app
from service.recommender import load_model, recommend_batch
from service.settings import Settings
from tests.helpers import assert_brute_force, dead_redis_url, random_histories, write_tiny_bundle

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def test_encoder_on_cuda_gives_the_cpu_answers(tiny_bundle_root: Path) -> None:
    cpu = load_model(tiny_bundle_root, device="cpu")
    gpu = load_model(tiny_bundle_root, device="cuda")
    assert next(gpu.encoder.parameters()).device.type == "cuda"
    users = random_histories(32, seed=5)
    for a, b in zip(
        recommend_batch(cpu, users, n=20, explain=True),
        recommend_batch(gpu, users, n=20, explain=True),
        strict=True,
    ):
        # TF32 and kernel choice differ between devices: near-ties may swap, nothing else.
        assert len(set(a.item_ids) & set(b.item_ids)) >= 18
        np.testing.assert_allclose(sorted(a.scores), sorted(b.scores), rtol=1e-3, atol=1e-3)
        assert a.explanation is not None and b.explanation is not None
        np.testing.assert_allclose(
            a.explanation.interests, b.explanation.interests, rtol=1e-3, atol=1e-3
        )


def test_an_exact_bundle_is_searched_on_the_encoders_gpu(tiny_bundle_root: Path) -> None:
    model = load_model(tiny_bundle_root, device="cuda")
    assert (model.search_backend, model.search_device) == ("dense", "cuda:0")
    # The encoder's table, already on the GPU, is the search's: no second copy.
    assert model.gpu_table is not None
    assert model.gpu_table.data_ptr() == model.encoder.item_table().data_ptr()
    assert not model.batches_side_by_side


def test_an_approximate_bundle_is_searched_exactly_on_the_gpu(tmp_path: Path) -> None:
    root = tmp_path / "bundles"
    write_tiny_bundle(root, index_factory="IVF8,Flat", search_params="nprobe=1")
    gpu = load_model(root, device="cuda")
    assert (gpu.search_backend, gpu.search_device, gpu.index_device) == ("dense", "cuda:0", "cpu")
    kept = load_model(root, device="cuda", exact_search="faiss")
    assert (kept.search_backend, kept.search_device) == ("faiss", "cpu")
    bundle = load_bundle(resolve_current(root))
    users = random_histories(32, seed=8)
    exact = recommend_batch(gpu, users, n=20)
    for history, result in zip(users, exact, strict=True):
        body = {"items": [{"item_id": i.item_id, "score": i.score, "interest": i.interest}
                          for i in result.items]}  # fmt: skip
        assert_brute_force(bundle, history, body, n=20, exclude_history=True)
    # One IVF list of eight probed: the index alone misses some of those items.
    approximate = recommend_batch(kept, users, n=20)
    assert any(a.item_ids != b.item_ids for a, b in zip(exact, approximate, strict=True))


@pytest.mark.parametrize("exact_search", ["screened", "screened-int8", "faiss"])
def test_searches_other_than_dense_stay_on_the_cpu(tiny_bundle_root: Path, exact_search) -> None:
    model = load_model(tiny_bundle_root, device="cuda", exact_search=exact_search)
    assert (model.search_backend, model.search_device) == (exact_search, "cpu")
    assert model.gpu_table is None


def test_tf32_matmuls_keep_the_exact_search_on_the_cpu(tiny_bundle_root: Path) -> None:
    # TF32 products are far outside the float32 rounding bound the exact search relies on.
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        model = load_model(tiny_bundle_root, device="cuda")
    finally:
        torch.set_float32_matmul_precision(before)
    assert model.search_device == "cpu" and model.gpu_table is None


def test_the_service_answers_with_the_encoder_on_cuda(tiny_bundle_root: Path) -> None:
    settings = Settings(
        bundle_root=tiny_bundle_root, redis_url=dead_redis_url(), reload_interval_s=0, device="cuda"
    )
    users = random_histories(6, seed=6)
    with TestClient(create_app(settings)) as client:
        single = client.post("/recommend", json={"history": users[0], "n": 10})
        batch = client.post(
            "/recommend/batch", json={"requests": [{"history": h, "n": 10} for h in users]}
        )
        health = client.get("/healthz")
        model = client.get("/v1/model").json()
    assert (model["search_backend"], model["search_device"]) == ("dense", "cuda:0")
    assert single.status_code == 200, single.text
    assert batch.status_code == 200, batch.text
    assert health.status_code == 200
    assert len(single.json()["items"]) == 10
    assert [len(r["items"]) for r in batch.json()["results"]] == [10] * len(users)
    # cuBLAS picks its kernels by batch size, so alone and in a batch of six the same history
    # may differ in the last bits of its scores (on CPU they are identical: test_batching).
    alone, batched = single.json()["items"], batch.json()["results"][0]["items"]
    assert [i["item_id"] for i in alone] == [i["item_id"] for i in batched]
    np.testing.assert_allclose(
        [i["score"] for i in alone], [i["score"] for i in batched], rtol=1e-5, atol=1e-5
    )
