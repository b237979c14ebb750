"""Losses against hand-computed values on tiny examples; negative samplers never return the positive."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys_spark.train import losses, negatives

pytestmark = pytest.mark.torch

LN2 = math.log(2.0)


def neg_log_sigmoid(x: float) -> float:
    return -math.log(1.0 / (1.0 + math.exp(-x)))


# ----------------------------------------------------------------------------------------------- losses


def test_bce_sampled_hand_computed():
    pos = torch.tensor([0.0, 2.0])
    neg = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    row0 = neg_log_sigmoid(0.0) + neg_log_sigmoid(-0.0) + neg_log_sigmoid(1.0)  # -log(1 - σ(s)) = -log σ(-s)
    row1 = neg_log_sigmoid(2.0) + neg_log_sigmoid(-1.0) + neg_log_sigmoid(0.0)
    assert losses.bce_sampled(pos, neg).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # σ(0) = 1/2 for a positive and its one negative: 2 ln 2; one negative may be given as the same shape
    assert losses.bce_sampled(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(2 * LN2)
    # a 0/1 weight keeps the first positive only
    assert losses.bce_sampled(pos, neg, weight=torch.tensor([1.0, 0.0])).item() == pytest.approx(row0, rel=1e-6)


def test_bpr_hand_computed():
    # pairs (1, 0) and (1, 1): -log σ(1) and -log σ(0) = ln 2
    value = losses.bpr(torch.tensor([1.0]), torch.tensor([[0.0, 1.0]])).item()
    assert value == pytest.approx((neg_log_sigmoid(1.0) + LN2) / 2, rel=1e-6)
    # weighted mean over positives: weights 3 and 1 on losses -log σ(2) and -log σ(-1)
    value = losses.bpr(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]), weight=torch.tensor([3.0, 1.0])).item()
    assert value == pytest.approx((3 * neg_log_sigmoid(2.0) + neg_log_sigmoid(-1.0)) / 4, rel=1e-6)


def test_full_softmax_ce_hand_computed_and_ignore_index():
    # row 0: exp(logits) = 1, 2, 3 -> p(target 2) = 3/6 -> ln 2; row 1: uniform over 3 -> ln 3; row 2 ignored
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [5.0, 1.0, 1.0]]))
    targets = torch.tensor([2, 0, -1])
    assert losses.full_softmax_ce(logits, targets).item() == pytest.approx((LN2 + math.log(3)) / 2, rel=1e-6)
    # [B, L, C] logits with [B, L] targets, as SASRec gives them
    assert losses.full_softmax_ce(logits.unsqueeze(0), targets.unsqueeze(0)).item() == pytest.approx(
        (LN2 + math.log(3)) / 2, rel=1e-6
    )
    # every target ignored: 0, not nan
    assert losses.full_softmax_ce(logits, torch.full((3,), -1)).item() == 0.0


def test_sampled_softmax_hand_computed_with_and_without_log_q():
    pos = torch.log(torch.tensor([3.0]))
    neg = torch.log(torch.tensor([[1.0, 2.0]]))
    # no correction: -log(3 / (3 + 1 + 2)) = ln 2
    assert losses.sampled_softmax(pos, neg).item() == pytest.approx(LN2, rel=1e-6)
    # Q = (1/2, 1/4), m = 2: s - log(m Q) = s - 0 and s + ln 2 -> exp: 1 and 4 -> -log(3 / 8)
    log_q = torch.log(torch.tensor([[0.5, 0.25]]))
    assert losses.sampled_softmax(pos, neg, neg_log_q=log_q).item() == pytest.approx(math.log(8 / 3), rel=1e-6)
    # the positive corrected as well (in-batch): Q_pos = 1/4 -> pos' = ln 3 + ln 2 -> -log(6 / (6 + 1 + 4))
    value = losses.sampled_softmax(pos, neg, neg_log_q=log_q, pos_log_q=torch.log(torch.tensor([0.25]))).item()
    assert value == pytest.approx(math.log(11 / 6), rel=1e-6)
    # a masked negative drops out: only exp 1 remains next to 3 -> -log(3 / 4)
    mask = torch.tensor([[True, False]])
    assert losses.sampled_softmax(pos, neg, neg_mask=mask).item() == pytest.approx(math.log(4 / 3), rel=1e-6)


def test_sampled_softmax_with_every_item_as_negative_equals_full_softmax():
    g = torch.Generator().manual_seed(0)
    n_items = 7
    logits = torch.randn(5, n_items, generator=g, dtype=torch.float64)  # [B, C]
    targets = torch.tensor([0, 3, 6, 2, 3])
    full = losses.full_softmax_ce(logits, targets)
    pos = logits.gather(1, targets[:, None]).squeeze(1)  # [B]
    # negatives: the n - 1 other items of each row, Q uniform over them (m·Q = 1)
    others = torch.stack([torch.cat([torch.arange(t), torch.arange(t + 1, n_items)]) for t in targets.tolist()])
    neg = logits.gather(1, others)  # [B, n - 1]
    log_q = torch.full(neg.shape, -math.log(n_items - 1), dtype=torch.float64)
    assert losses.sampled_softmax(pos, neg, neg_log_q=log_q).item() == pytest.approx(full.item(), rel=1e-12)
    # negatives: the whole catalogue with the positive masked, Q uniform over the n items (m·Q = 1 again)
    mask = torch.arange(n_items)[None, :] != targets[:, None]
    log_q = torch.full((n_items,), -math.log(n_items), dtype=torch.float64)  # [m], shared by the rows
    value = losses.sampled_softmax(pos, logits, neg_log_q=log_q, neg_mask=mask).item()
    assert value == pytest.approx(full.item(), rel=1e-12)


def test_losses_give_zero_not_nan_on_empty_batches():
    empty = torch.zeros(0)
    assert losses.bce_sampled(empty, torch.zeros(0, 3)).item() == 0.0
    assert losses.sampled_softmax(empty, torch.zeros(0, 3)).item() == 0.0


# ------------------------------------------------------------------------------------------- negatives


def test_uniform_never_returns_the_positive_and_is_uniform_over_the_others():
    g = torch.Generator().manual_seed(1)
    n_items = 3  # small, so that a draw equal to the positive would be frequent
    positives = torch.randint(n_items, (4000,), generator=g)
    neg = negatives.uniform(n_items, (4000, 5), g, positives=positives)
    assert neg.items.shape == (4000, 5) and neg.mask is None
    assert (neg.items != positives[:, None]).all()
    assert ((neg.items >= 0) & (neg.items < n_items)).all()
    # positive 0: items 1 and 2 about half each; log Q = log 1/2
    share_of_1 = (neg.items[positives == 0] == 1).float().mean().item()
    assert share_of_1 == pytest.approx(0.5, abs=0.03)
    assert torch.allclose(neg.log_q, torch.full_like(neg.log_q, -LN2))
    # padded positions exclude nothing and still return items
    pad = negatives.uniform(n_items, (2, 3), g, positives=torch.tensor([-1, -1]))
    assert ((pad.items >= 0) & (pad.items < n_items)).all()


def test_uniform_is_reproducible_from_the_seed():
    a = negatives.uniform(100, (8, 4), torch.Generator().manual_seed(7), positives=torch.arange(8)).items
    b = negatives.uniform(100, (8, 4), torch.Generator().manual_seed(7), positives=torch.arange(8)).items
    assert torch.equal(a, b)


def test_popularity_probs_smoothing():
    probs = negatives.popularity_probs(np.array([4.0, 1.0, 0.0]), exponent=0.5)  # sqrt: 2, 1, 0
    assert torch.allclose(probs, torch.tensor([2 / 3, 1 / 3, 0.0]))
    with pytest.raises(ValueError):
        negatives.popularity_probs(np.zeros(3))


def test_popularity_never_returns_the_positive_and_follows_q_given_not_positive():
    g = torch.Generator().manual_seed(2)
    probs = negatives.popularity_probs(np.array([6.0, 3.0, 1.0, 0.0]), exponent=1.0)  # q = .6 .3 .1 0
    positives = torch.tensor([0] * 3000 + [1] * 3000 + [-1] * 100)
    neg = negatives.popularity(probs, (6100, 4), g, positives=positives)
    assert (neg.items != positives[:, None]).all()
    assert (neg.items != 3).all()  # zero count: never drawn
    # given positive 0, q(1 | not 0) = .3 / .4 = .75, q(2 | not 0) = .25; given 1: q(0 | not 1) = 6/7
    assert (neg.items[:3000] == 1).float().mean().item() == pytest.approx(0.75, abs=0.02)
    assert (neg.items[3000:6000] == 0).float().mean().item() == pytest.approx(6 / 7, abs=0.02)
    assert neg.log_q[0, 0].item() == pytest.approx(math.log(probs[neg.items[0, 0]].item() / 0.4), rel=1e-5)
    # a positive holding nearly all the mass is still excluded in one pass
    skewed = negatives.popularity_probs(np.array([1e9, 1.0, 1.0]), exponent=1.0)
    drawn = negatives.popularity(skewed, (50, 10), g, positives=torch.zeros(50, dtype=torch.long)).items
    assert (drawn != 0).all()


def test_popularity_without_positives_follows_q():
    g = torch.Generator().manual_seed(3)
    probs = negatives.popularity_probs(np.array([1.0, 3.0]), exponent=1.0)
    neg = negatives.popularity(probs, (20000,), g)
    assert (neg.items == 1).float().mean().item() == pytest.approx(0.75, abs=0.02)
    assert torch.allclose(neg.log_q, torch.log(probs[neg.items]))


def test_in_batch_masks_the_rows_own_positive_and_its_duplicates():
    positives = torch.tensor([3, 5, 3, 7])
    probs = torch.full((8,), 1 / 8)
    neg = negatives.in_batch(positives, probs)
    assert torch.equal(neg.items, positives.expand(4, 4))
    assert torch.equal(neg.mask[0], torch.tensor([False, True, False, True]))
    rows = torch.arange(4)[:, None].expand(4, 4)
    assert (neg.items[neg.mask] != positives[rows[neg.mask]]).all()
    assert torch.allclose(neg.log_q, torch.full((4, 4), math.log(1 / 8)))
