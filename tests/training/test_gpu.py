"""GPU paths: run only where CUDA (and, for the index, a GPU build of faiss) is present."""

import faiss
import numpy as np
import pytest
import torch

from remi_core.bundle import load_bundle, write_bundle
from remi_core.index import GPU_MAX_K, build_index, gpu_available, to_best_device
from remi_core.models import EncoderConfig, build_encoder, pad_histories
from remi_core.retrieval import (
    dense_merged_topk,
    exact_merged_topk,
    faiss_merged_topk,
    merge_candidates,
)
from tests.core.test_retrieval_fast import assert_matches, reference
from training.config import TrainConfig
from training.data import DataConfig, load_dataset
from training.losses import Objective
from training.trainer import BatchSampler, TrainStep, make_optimizer, train

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
def test_training_on_cuda_with_mixed_precision_beats_most_popular(tmp_path):
    dataset = load_dataset(DataConfig(synthetic_users=600, synthetic_seed=11))
    cfg = TrainConfig(
        dim=16,
        num_interests=3,
        seq_len=10,
        batch_size=64,
        max_iters=1200,
        eval_every=300,
        patience=4,
        device="cuda",
        amp=True,
    )
    result = train(dataset, cfg, tmp_path / "run", progress=False)
    assert result.test["recall@50"] > 1.5 * result.popularity_test["recall@50"]


@needs_cuda
@pytest.mark.parametrize("model_type", ["comirec-sa", "mind"])
def test_a_training_step_never_waits_on_the_host(model_type):
    # Sampling, loss and update must queue on the GPU without a device-to-host copy or sync.
    dataset = load_dataset(DataConfig(synthetic_users=600, synthetic_seed=11))
    cfg = TrainConfig(model_type=model_type, dim=16, seq_len=10, batch_size=64, amp=True)
    device = torch.device("cuda")
    model = build_encoder(cfg.encoder_config(dataset.num_items)).to(device)
    step = TrainStep(
        Objective(model, cfg),
        make_optimizer(model, cfg),
        BatchSampler(dataset, cfg.seq_len, device),
        torch.Generator(device=device).manual_seed(0),
        cfg,
        dataset.num_items,
    )
    step()  # lazy initialisation (cuBLAS handles, optimizer state) may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_a_model_on_cuda_exports_a_bundle_the_cpu_loads(tmp_path):
    # The nightly job trains on a GPU and publishes to CPU servers: the bundle (weights, item
    # table, an index tuned on encoded histories) must come out of a model that lives on CUDA.
    cfg = EncoderConfig(num_items=2001, dim=16, num_interests=4, seq_len=10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = build_encoder(cfg).cuda()
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 2001, size=int(rng.integers(2, 12))) for _ in range(300)]
    path = write_bundle(
        tmp_path,
        encoder=encoder,
        item_ids=[None] + [f"item-{row}" for row in range(1, 2001)],
        popularity=np.arange(1, 51),
        metadata={"dataset": "gpu-test"},
        index_factory="IVF16,Flat",
        tune_histories=histories,
    )
    assert next(encoder.parameters()).is_cuda  # the caller's model stays where it was
    bundle = load_bundle(path)
    assert bundle.manifest["index"]["recall"]["reached"]
    items, mask = pad_histories([h[-cfg.seq_len :] for h in histories[:16]], cfg.seq_len)
    with torch.inference_mode():
        on_gpu = encoder.eval()(items.cuda(), mask.cuda())[0].cpu()
        on_cpu = bundle.encoder(items, mask)[0]
    torch.testing.assert_close(on_cpu, on_gpu, rtol=1e-3, atol=1e-3)


@needs_cuda
def test_dense_merge_on_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(3)
    interests = torch.randn(8, 4, 16, generator=gen)
    items = torch.randn(300, 16, generator=gen)
    cpu_scores, cpu_rows = dense_merged_topk(interests, items, 20)
    gpu_scores, gpu_rows = dense_merged_topk(interests.cuda(), items.cuda(), 20)
    torch.testing.assert_close(gpu_scores.cpu(), cpu_scores, rtol=1e-4, atol=1e-4)
    assert (gpu_rows.cpu() == cpu_rows).float().mean() > 0.99


@needs_cuda
@pytest.mark.parametrize("n", [1, 10, 299, 1000])
@pytest.mark.parametrize("chunk", [1, 2, None])
@pytest.mark.parametrize("eager", [False, True])
def test_exact_search_on_cuda_equals_brute_force(n, chunk, eager):
    # The service's dense search with the table on the GPU (REMI_DEVICE=cuda): rows, scores,
    # credited interests and tie order as the plain-Python reference, exclusions included.
    rng = np.random.default_rng(7)
    items = rng.standard_normal((300, 8)).astype(np.float32)
    interests = rng.standard_normal((5, 3, 8)).astype(np.float32)
    exclude = [rng.choice(np.arange(1, 300), size, replace=False) for size in (0, 3, 40, 1, 299)]
    table = torch.from_numpy(items).cuda()
    found = exact_merged_topk(interests, table, n, exclude, chunk, eager=eager)
    assert_matches(found, reference(interests, items, n, exclude))
    assert found.counts[-1] == 0  # everything excluded: nothing is invented


@needs_cuda
def test_exact_search_on_cuda_keeps_near_duplicates_for_its_merge():
    # Rows a few ulps apart: the search must hand the merge every row it might rank in the top
    # n, so the list is the merge's own top n over the whole catalogue (on the same device).
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 64)).astype(np.float32)
    copies = np.repeat(base, 8, axis=0)
    copies *= (1 + rng.integers(-3, 4, copies.shape) * 2.0**-23).astype(np.float32)
    table = torch.from_numpy(np.vstack([np.zeros((1, 64), np.float32), copies])).cuda()
    interests = rng.standard_normal((48, 4, 64)).astype(np.float32)
    every_row = np.broadcast_to(np.arange(1, table.shape[0]), (48, table.shape[0] - 1))
    want = merge_candidates(interests, every_row, table, 20)
    found = exact_merged_topk(interests, table, 20)
    assert found.rows.tolist() == want.rows.tolist()


@needs_cuda
def test_exact_search_on_cuda_over_a_large_catalogue_finds_the_float64_top_n():
    # 300k items: the default chunks and blocks on a GPU (hundreds of users a chunk, blocks of
    # tens of thousands of rows) against a float64 brute force.
    gen = torch.Generator().manual_seed(1)
    items = torch.randn(300_001, 64, generator=gen)
    interests = torch.randn(300, 4, 64, generator=gen)
    found = exact_merged_topk(interests.numpy(), items.cuda(), 50)
    want_scores, want_rows = dense_merged_topk(interests.double(), items.double(), 50, chunk=16)
    np.testing.assert_allclose(found.scores, want_scores.numpy(), rtol=1e-5, atol=1e-5)
    same = [len(set(a) & set(b)) for a, b in zip(found.rows, want_rows.numpy(), strict=True)]
    assert sum(same) >= 0.999 * 300 * 50  # only float32 near-ties may swap


@pytest.mark.skipif(not gpu_available(), reason="faiss without GPU support, or no GPU")
def test_gpu_index_gives_the_cpu_results():
    rng = np.random.default_rng(0)
    items = rng.standard_normal((500, 16)).astype(np.float32)
    interests = rng.standard_normal((4, 4, 16)).astype(np.float32)
    index = build_index(items)
    gpu_index, where = to_best_device(build_index(items))
    assert where == "gpu"
    cpu = faiss_merged_topk(index, interests, items, 30)
    gpu = faiss_merged_topk(gpu_index, interests, items, 30)
    for a, b in zip(cpu, gpu, strict=True):
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not gpu_available(), reason="faiss without GPU support, or no GPU")
def test_an_index_probing_more_lists_than_a_gpu_can_stays_on_the_cpu():
    rng = np.random.default_rng(0)
    items = rng.standard_normal((2000, 16)).astype(np.float32)
    index = build_index(items, "IVF16,Flat")
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = GPU_MAX_K + 1
    assert to_best_device(index)[1] == "cpu"
    ivf.nprobe = 8
    assert to_best_device(index)[1] == "gpu"
