"""Encoder contract for every model type, plus checks against the official algorithms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import training.losses as loss_module
from remi_core.bundle import load_bundle, write_bundle
from remi_core.models import (
    MIND,
    MODEL_TYPES,
    EncoderConfig,
    MultiInterestEncoder,
    build_encoder,
    pad_histories,
)
from remi_core.retrieval import dense_merged_topk, faiss_merged_topk
from training.config import TrainConfig
from training.evaluate import EvalSet, evaluate_model
from training.losses import remi_loss

N, D, K, L = 60, 8, 3, 6
# Lengths cover a full window, short ones and a single item; all-padding rows get their own test.
HISTORIES = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11], [12], [13, 14, 15, 16, 17]]
WITH_ROUTING = {"comirec-sa", "comirec-dr", "mind"}
SINGLE_INTEREST = {"youtube-dnn", "gru4rec"}


def make(model_type: str, seed: int = 0, **overrides: int | bool) -> MultiInterestEncoder:
    cfg = {"num_items": N, "model_type": model_type, "dim": D, "num_interests": K, "seq_len": L}
    torch.manual_seed(seed)
    return build_encoder(EncoderConfig(**{**cfg, **overrides}))


def batch(histories: list[list[int]] = HISTORIES) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_histories(histories, L)


def test_registry_lists_every_model_and_rejects_unknown_ones():
    assert set(MODEL_TYPES) == WITH_ROUTING | SINGLE_INTEREST
    with pytest.raises(ValueError, match="unknown model_type"):
        make("sasrec")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_forward_shapes(model_type: str):
    model = make(model_type).eval()
    items, mask = batch()
    interests, routing = model(items, mask)
    k = 1 if model_type in SINGLE_INTEREST else K
    assert model.num_interests == k
    assert interests.shape == (len(HISTORIES), k, D)
    assert torch.isfinite(interests).all()
    if model_type in WITH_ROUTING:
        assert routing is not None and routing.shape == (len(HISTORIES), K, L)
    else:
        assert routing is None


@pytest.mark.parametrize("model_type", sorted(SINGLE_INTEREST))
def test_single_interest_models_ignore_num_interests(model_type: str):
    items, mask = batch()
    for k in (1, 5):
        model = make(model_type, num_interests=k).eval()
        assert model.num_interests == 1
        assert model(items, mask)[0].shape == (len(HISTORIES), 1, D)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_padded_positions_do_not_change_the_output(model_type: str):
    model = make(model_type).eval()  # eval: MIND's fixed routing init, no GRU4Rec dropout
    items, mask = batch(HISTORIES + [[]])  # an all-padding row too
    other = torch.where(mask, items, torch.randint(1, N, items.shape))
    assert not torch.equal(other, items)
    with torch.no_grad():
        interests, routing = model(items, mask)
        interests2, routing2 = model(other, mask)
    torch.testing.assert_close(interests2, interests)
    if routing is not None:
        torch.testing.assert_close(routing2, routing)


@pytest.mark.parametrize("model_type", sorted(WITH_ROUTING))
def test_routing_is_a_distribution_over_valid_positions(model_type: str):
    model = make(model_type).train()  # MIND's random logits must normalise too
    items, mask = batch()
    _, routing = model(items, mask)
    valid = mask.unsqueeze(1).expand_as(routing)
    torch.testing.assert_close(routing.sum(dim=-1), torch.ones(len(HISTORIES), K))
    assert (routing[~valid].abs() < 1e-6).all()
    assert (routing[valid] >= 0).all()


@pytest.mark.parametrize("model_type", ["comirec-dr", "mind"])
def test_capsules_of_an_empty_history_are_zero_not_nan(model_type: str):
    model = make(model_type).eval()
    interests, routing = model(*batch([[]]))
    assert torch.equal(interests, torch.zeros_like(interests))
    assert torch.equal(routing, torch.zeros_like(routing))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_gradients_reach_the_item_table_and_every_parameter(model_type: str):
    model = make(model_type).train()
    items, mask = batch()
    interests, _ = model(items, mask)
    interests.square().sum().backward()
    grad = model.item_table().grad
    used = items[mask].unique()
    assert (grad[used].abs().sum(dim=1) > 0).all()
    assert torch.equal(grad[0], torch.zeros(D))  # padding row
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_remi_loss_adds_rr_exactly_when_the_model_routes(
    model_type: str, monkeypatch: pytest.MonkeyPatch
):
    calls = []
    original = loss_module.routing_regularizer

    def spy(routing: torch.Tensor, dim: int) -> torch.Tensor:
        calls.append(tuple(routing.shape))
        return original(routing, dim)

    monkeypatch.setattr(loss_module, "routing_regularizer", spy)

    model = make(model_type).train()
    items, mask = batch()
    target = torch.tensor([20, 21, 22, 23])
    negatives = torch.randint(1, N, (40,), generator=torch.Generator().manual_seed(1))
    losses = {}
    for rr_lambda in (0.0, 100.0):
        cfg = TrainConfig(model_type=model_type, dim=D, beta=0.5, rr_lambda=rr_lambda)
        torch.manual_seed(3)  # same MIND logits and GRU4Rec dropout in both passes
        losses[rr_lambda] = remi_loss(model, items, mask, target, negatives, cfg)
    (plain, zero_reg), (regularised, reg) = losses[0.0], losses[100.0]
    assert torch.isfinite(regularised)
    regularised.backward()
    assert model.item_table().grad.abs().sum() > 0
    assert zero_reg.item() == 0.0
    if model_type in WITH_ROUTING:
        assert calls == [(len(HISTORIES), K, L)]
        assert reg.item() > 0
        assert regularised.item() == pytest.approx(plain.item() + 100.0 * reg.item(), rel=1e-5)
    else:
        assert calls == []
        assert reg.item() == 0.0 and regularised.item() == plain.item()


def test_rr_trains_comirec_sa_but_not_the_stop_gradient_capsules():
    # The official stop-gradient makes the capsules' coupling coefficients constants, so RR can
    # only shift their loss; routing_grad makes the routing differentiable.
    items, mask = batch()
    assert make("comirec-sa")(items, mask)[1].requires_grad
    for model_type in ("comirec-dr", "mind"):
        assert not make(model_type).train()(items, mask)[1].requires_grad
        model = make(model_type, routing_grad=True).train()
        _, routing = model(items, mask)
        loss_module.routing_regularizer(routing, D).backward()  # RR alone
        for name, param in model.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("model_type", ["comirec-dr", "mind"])
def test_routing_grad_changes_gradients_only(model_type: str):
    items, mask = batch()
    official = make(model_type).eval()
    differentiable = make(model_type, routing_grad=True).eval()
    differentiable.load_state_dict(official.state_dict())
    for a, b in zip(official(items, mask), differentiable(items, mask), strict=True):
        torch.testing.assert_close(a, b)


def test_routing_grad_is_refused_for_models_without_dynamic_routing():
    for model_type in ("comirec-sa", "youtube-dnn", "gru4rec"):
        with pytest.raises(ValueError, match="routing_grad applies to comirec-dr, mind only"):
            make(model_type, routing_grad=True)
        with pytest.raises(ValueError, match="routing_grad"):
            TrainConfig(model_type=model_type, routing_grad=True)


def test_mind_is_random_in_training_and_fixed_in_eval():
    model = make("mind")
    items, mask = batch()
    with torch.no_grad():
        a, b = model.train()(items, mask)[0], model(items, mask)[0]
        assert not torch.allclose(a, b)
        c, d = model.eval()(items, mask)[0], model(items, mask)[0]
        assert torch.equal(c, d)
        # The eval routing init is state, so a rebuilt model reproduces the interests.
        assert "eval_routing_init" in model.state_dict()
        clone = make("mind", seed=99).eval()
        clone.load_state_dict(model.state_dict())
        assert torch.equal(clone(items, mask)[0], c)


def test_mind_relu_layer_is_optional():
    cfg = EncoderConfig(num_items=N, model_type="mind", dim=D, num_interests=K, seq_len=L)
    assert MIND(cfg).relu_layer is None
    interests, _ = MIND(cfg, relu_layer=True).eval()(*batch())
    assert (interests >= 0).all()


def _official_capsule_routing(
    u_hat: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """REMI's CapsuleNetwork loop on u_hat (B, K, L, d), written as plainly as the original."""
    u_iter = u_hat.detach()
    for i in range(3):
        c = F.softmax(logits, dim=-1)
        c = torch.where(mask.unsqueeze(1).expand_as(c), c, torch.zeros_like(c)).unsqueeze(2)
        s = torch.matmul(c, u_iter if i < 2 else u_hat)  # (B, K, 1, d)
        norm = torch.sum(torch.square(s), -1, True)
        v = norm / (1 + norm) / torch.sqrt(norm + 1e-9) * s
        if i < 2:
            logits = logits + torch.matmul(u_iter, v.transpose(2, 3)).squeeze(-1)
    return v.squeeze(2), c.squeeze(2)


def test_comirec_dr_matches_the_official_algorithm_on_full_windows():
    model = make("comirec-dr").eval()
    items, mask = batch([list(range(1, 7)), list(range(10, 16))])
    h = model.item_embedding(items)
    # Official bilinear_type 2: sum over the input axis of w (1, L, K*d, d) * e (B, L, 1, d).
    u_hat = torch.sum(model.bilinear * h.unsqueeze(2), dim=3).view(2, L, K, D).transpose(1, 2)
    expected, coupling = _official_capsule_routing(u_hat, torch.zeros(2, K, L), mask)
    interests, routing = model(items, mask)
    torch.testing.assert_close(interests, expected)
    torch.testing.assert_close(routing, coupling)


def test_mind_matches_the_official_algorithm_on_full_windows():
    model = make("mind").eval()
    items, mask = batch([list(range(1, 7)), list(range(10, 16))])
    u_hat = model.bilinear(model.item_embedding(items)).repeat(1, 1, K)  # the official K-fold copy
    u_hat = u_hat.view(2, L, K, D).transpose(1, 2)
    logits = model.eval_routing_init.expand(2, -1, -1)
    expected, coupling = _official_capsule_routing(u_hat, logits, mask)
    interests, routing = model(items, mask)
    torch.testing.assert_close(interests, expected)
    torch.testing.assert_close(routing, coupling)
    assert not torch.allclose(interests[:, 0], interests[:, 1])  # the random init splits them


def test_youtube_dnn_is_a_linear_map_of_the_mean_history():
    model = make("youtube-dnn")
    items, mask = batch()
    interests, _ = model(items, mask)
    for b, history in enumerate(HISTORIES):
        window = torch.tensor(history[-L:])
        expected = model.linear(model.item_embedding(window).mean(dim=0))
        torch.testing.assert_close(interests[b, 0], expected)


def test_gru4rec_reads_the_state_after_the_last_valid_item():
    model = make("gru4rec").eval()
    items, mask = batch()
    interests, _ = model(items, mask)
    for b, history in enumerate(HISTORIES):
        window = torch.tensor([history[-L:]])
        states, _ = model.gru(model.item_embedding(window))
        torch.testing.assert_close(interests[b, 0], model.dense(states[0, -1]))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_evaluation_and_serving_retrieval_accept_every_model(model_type: str):
    model = make(model_type)
    items, mask = batch()
    truth = torch.tensor([[30, 31], [32, 0], [33, 0], [34, 35]])
    metrics = evaluate_model(model, EvalSet(items, mask, truth))
    assert set(metrics) >= {"recall@20", "recall@50"} and model.training

    faiss = pytest.importorskip("faiss")
    with torch.no_grad():
        interests, _ = model.eval()(items, mask)
    table = model.item_table().detach().numpy().astype(np.float32)
    index = faiss.IndexFlatIP(D)
    index.add(table[1:])
    found = faiss_merged_topk(index, interests.numpy(), table, n=10)
    _, dense_rows = dense_merged_topk(interests, torch.from_numpy(table), 10)
    for b, hit in enumerate(found):
        assert len(hit.rows) == 10 and (hit.interests < model.num_interests).all()
        assert set(hit.rows.tolist()) == set(dense_rows[b].tolist())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_a_bundle_rebuilds_the_same_encoder(model_type: str, tmp_path):
    pytest.importorskip("faiss")
    model = make(model_type).eval()
    path = write_bundle(
        tmp_path,
        encoder=model,
        item_ids=[None] + [f"item-{i}" for i in range(1, N)],
        popularity=np.arange(1, 11),
        metadata={},
    )
    loaded = load_bundle(path).encoder.eval()
    items, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(items, mask)[0], model(items, mask)[0])
    assert loaded.num_interests == model.num_interests
