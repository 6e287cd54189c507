"""REMI's loss terms against their formulas on hand-sized inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from remi_core.models import build_encoder
from training.config import TrainConfig
from training.losses import logits, remi_loss, routing_regularizer, sampled_softmax_ihn


def test_beta_zero_is_the_plain_sampled_softmax():
    gen = torch.Generator().manual_seed(0)
    pos = torch.randn(8, generator=gen)
    neg = torch.randn(8, 30, generator=gen)
    expected = F.cross_entropy(torch.cat([pos[:, None], neg], 1), torch.zeros(8, dtype=torch.long))
    assert sampled_softmax_ihn(pos, neg, beta=0.0).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_ihn_weights_on_a_hand_example():
    # One user, positive score 1, negatives 0 and 2, beta = 1:
    # w = e^{s} / mean(e^{s}) = (1, e^2) / ((1 + e^2) / 2)
    # loss = -log(e / (e + w_0 e^0 + w_1 e^2))
    pos, neg = torch.tensor([1.0]), torch.tensor([[0.0, 2.0]])
    mean = (1 + math.e**2) / 2
    denominator = math.e + (1 / mean) * 1 + (math.e**2 / mean) * math.e**2
    expected = -math.log(math.e / denominator)
    assert sampled_softmax_ihn(pos, neg, beta=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_ihn_makes_hard_negatives_weigh_more():
    pos, neg = torch.tensor([1.0]), torch.tensor([[0.0, 2.0]])
    assert sampled_softmax_ihn(pos, neg, beta=1.0) > sampled_softmax_ihn(pos, neg, beta=0.0)


def test_masked_negatives_are_ignored_in_the_sum_and_the_mean():
    pos = torch.tensor([0.5])
    neg = torch.tensor([[0.3, 9.0, -1.0]])
    mask = torch.tensor([[False, True, False]])
    for beta in (0.0, 0.7):
        masked = sampled_softmax_ihn(pos, neg, beta, mask)
        dropped = sampled_softmax_ihn(pos, neg[:, [0, 2]], beta)
        assert masked.item() == pytest.approx(dropped.item(), rel=1e-6)


def test_a_row_with_every_negative_masked_costs_nothing_for_any_beta():
    # A one-item catalogue: every sampled negative is the positive itself.
    pos = torch.tensor([0.5, 1.0], requires_grad=True)
    neg = torch.tensor([[0.5, 0.5], [0.2, 3.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [False, False]])
    for beta in (0.0, 0.1, 10.0):
        loss = sampled_softmax_ihn(pos, neg, beta, mask)
        alone = sampled_softmax_ihn(pos[1:], neg[1:], beta) / 2  # row 0 adds 0 to the mean
        assert loss.item() == pytest.approx(alone.item(), rel=1e-6)
        loss.backward()
        assert torch.isfinite(pos.grad).all() and torch.isfinite(neg.grad).all()
        pos.grad = neg.grad = None


def test_ihn_is_stable_for_large_scores():
    pos, neg = torch.tensor([300.0]), torch.tensor([[310.0, 250.0]])
    assert torch.isfinite(sampled_softmax_ihn(pos, neg, beta=10.0))


def test_routing_regularizer_matches_the_formula_on_a_hand_matrix():
    # One user, K = 2 interests over n = 3 positions (rows of A^T).
    routing = torch.tensor([[[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]]])
    d = 4
    # interest 0: mean 1/3, squared deviations (1/6)^2 + 2 (1/12)^2 = 1/24
    # interest 1: mean 1/3, squared deviations (2/3)^2 + 2 (1/3)^2 = 2/3
    diag = torch.tensor([1 / 24, 2 / 3]) / d
    expected = (diag**2).sum()
    assert routing_regularizer(routing, d).item() == pytest.approx(expected.item(), rel=1e-6)


def test_routing_regularizer_equals_diag_of_covariance_and_sums_users():
    gen = torch.Generator().manual_seed(1)
    routing = torch.softmax(torch.randn(3, 4, 6, generator=gen), dim=-1)
    total = 0.0
    for a_t in routing:  # (K, n) = A^T
        a = a_t.T  # (n, K)
        centred = a - a.mean(dim=0, keepdim=True)
        c = centred.T @ centred / 8
        total += torch.linalg.vector_norm(torch.diagonal(c)) ** 2
    assert routing_regularizer(routing, 8).item() == pytest.approx(float(total), rel=1e-5)


def test_mixed_precision_keeps_the_ihn_loss_in_float32():
    # Under bfloat16 autocast the logits come out of the matmuls in bfloat16; computed there, the
    # IHN weights and the logsumexp over 1,280 negatives were off by ~2e-3 on this batch.
    torch.manual_seed(0)
    cfg = TrainConfig(beta=1.0, rr_lambda=0.0)
    model = build_encoder(cfg.encoder_config(5000))
    items = torch.randint(1, 5000, (128, 20))
    mask = torch.ones(128, 20, dtype=torch.bool)
    target, negatives = torch.randint(1, 5000, (128,)), torch.randint(1, 5000, (1280,))
    with torch.no_grad():
        full, _ = remi_loss(model, items, mask, target, negatives, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed, _ = remi_loss(model, items, mask, target, negatives, cfg)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(full.item(), abs=5e-4)


def test_an_item_scores_the_same_as_positive_and_as_negative_under_autocast():
    # The negatives' matmul ran in bfloat16 under autocast (widened after rounding, off by up
    # to 0.24 at scores ~30) while the positive's sum ran in float32.
    torch.manual_seed(0)
    user, table = 6 * torch.randn(64, 32), torch.randn(100, 32)
    target = torch.randint(0, 100, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        positive, negative = logits(user, table[target], table)
    assert positive.dtype == negative.dtype == torch.float32
    same = negative.gather(1, target.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(same, positive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(negative, user @ table.T, rtol=1e-5, atol=1e-5)
