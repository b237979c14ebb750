"""Losses against hand-computed values on tiny examples; negative samplers never return the positive."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys_spark.errors import RecsysError
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


# ------------------------------------------------------------------- triplet, margin, hard and funnel


def test_triplet_hand_computed():
    u, p = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])  # ||u - p||² = 1
    n = torch.tensor([[[0.0, 2.0], [0.0, 0.5]]])  # ||u - n||² = 4 and 0.25
    # max(1 - 4 + 1, 0) = 0 and max(1 - 0.25 + 1, 0) = 1.75, averaged over the two negatives
    assert losses.triplet(u, p, n, alpha=1.0).item() == pytest.approx(1.75 / 2)
    assert losses.triplet(u, p, n[:, 0], alpha=1.0).item() == 0.0  # one negative as [*, d]
    two = losses.triplet(u.repeat(2, 1), torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.zeros(2, 2), alpha=0.5,
                         weight=torch.tensor([0.0, 1.0]))
    assert two.item() == pytest.approx(9.0 + 0.5)  # only row 1: 9 - 0 + 0.5


def test_margin_ranking_hand_computed():
    pos, neg = torch.tensor([2.0, 0.0]), torch.tensor([[1.5, 0.0], [3.0, -2.0]])
    # row 0: max(0, 1 - 2 + 1.5) = .5, max(0, 1 - 2 + 0) = 0; row 1: max(0, 1 + 3) = 4, max(0, 1 - 2) = 0
    assert losses.margin_ranking(pos, neg, margin=1.0).item() == pytest.approx((0.25 + 2.0) / 2)
    assert losses.margin_ranking(pos, neg, 1.0, weight=torch.tensor([1.0, 0.0])).item() == pytest.approx(0.25)
    ref = torch.nn.MarginRankingLoss(margin=0.3)(torch.tensor([0.2, 1.0]), torch.tensor([0.4, 0.1]), torch.ones(2))
    assert losses.margin_ranking(torch.tensor([0.2, 1.0]), torch.tensor([0.4, 0.1]), 0.3).item() == pytest.approx(
        ref.item())


def test_triplet_is_the_hinge_on_the_distance_gmf_scores():
    from recsys_spark.nn.ncf import GMF

    torch.manual_seed(0)
    gmf = GMF(4, 6, dim=3, metric="distance")
    users, items = torch.tensor([0, 3]), torch.tensor([[1, 2, 5], [0, 4, 4]])  # the positive first
    logits = gmf(users.unsqueeze(1), items)  # -||p_u - q_i||²
    u, q = gmf.user_emb(users), gmf.item_emb(items)
    expected = losses.triplet(u, q[:, 0], q[:, 1:], alpha=0.7)
    assert losses.margin_ranking(logits[:, 0], logits[:, 1:], 0.7).item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(gmf.score_all(users).gather(1, items), logits, atol=1e-5)  # the shortcut agrees


def test_top_non_positives_skips_positives_and_pads():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.7], [0.0, 0.5, 0.5, 0.2]])
    indptr, items = np.array([0, 2, 5]), np.array([0, 3, 0, 1, 3])  # user 0 saw 0, 3; user 1 saw 0, 1, 3
    top = negatives.top_non_positives(scores.clone(), indptr, items, n_hard=2)
    assert top.tolist() == [[1, 2], [2, -1]]  # user 1 has a single non-positive: padded


def test_from_candidates_draws_only_each_users_own_items():
    candidates = torch.tensor([[3, 4, -1], [-1, -1, -1], [7, -1, -1]])
    g = torch.Generator().manual_seed(0)
    items, usable = negatives.from_candidates(candidates, torch.tensor([0, 1, 2, 0]), 200, g)
    assert set(items[0].tolist()) == {3, 4} and set(items[3].tolist()) == {3, 4}  # both, and nothing else
    assert not usable[1].any() and usable[[0, 2, 3]].all() and set(items[2].tolist()) == {7}


def test_mix_keeps_the_share_and_never_the_positive():
    g = torch.Generator().manual_seed(0)
    base = negatives.uniform(100, (2000, 4), g, positives=torch.full((2000,), 5))
    special = torch.tensor([[5, 50, 50, 50]]).expand(2000, 4)  # 5 is every row's positive
    usable = torch.ones(2000, 4, dtype=torch.bool)
    mixed = negatives.mix(base, special, usable, 0.25, g, positives=torch.full((2000,), 5)).items
    assert not (mixed == 5).any()
    assert (mixed[:, 1:] == 50).float().mean().item() == pytest.approx(0.25 + 0.75 / 99, abs=0.02)
    assert torch.equal(negatives.mix(base, special, usable, 0.0, g).items, base.items)


def _ncf_task(negatives_kind: str, **extra):
    from recsys_spark.models.ncf import NCFNetParams, NCFTask

    params = NCFNetParams(model="gmf", mf_dim=4, n_negatives=6, negatives=negatives_kind, n_hard=3,
                          hard_share=1.0, funnel_share=1.0, seed=1)
    task = NCFTask(params, n_users=5, n_items=12, **extra)
    task.seed_negatives(0)
    return task


def test_hard_negatives_are_the_top_scored_non_positives_of_the_model():
    indptr, items = np.array([0, 2, 3, 3, 5, 6]), np.array([0, 1, 4, 2, 3, 11])
    task = _ncf_task("hard", positives=(indptr, items))
    model = task.build_model()
    task.start_epoch(model, 0)
    with torch.no_grad():
        scores = model.score_all(torch.arange(5))
    for user in range(5):
        ranked = [i for i in torch.argsort(scores[user], descending=True, stable=True).tolist()
                  if i not in items[indptr[user]:indptr[user + 1]]]
        assert task._candidates[user].tolist() == ranked[:3]
    users, pos = torch.tensor([0, 3, 3]), torch.tensor([0, 2, 3])
    neg = task.negatives_for(users, pos)  # hard_share 1: every negative is one of the user's hard items
    for row, user in enumerate(users.tolist()):
        assert set(neg[row].tolist()) <= set(task._candidates[user].tolist())
    with torch.no_grad():  # after a step the refresh follows the new weights
        model.item_emb.weight[7] = 100 * model.user_emb.weight[4] / model.out.weight[0]
    task.start_epoch(model, 1)
    assert task._candidates[4, 0].item() == 7


def test_funnel_negatives_draw_only_viewed_not_bought_items():
    funnel = np.full((5, 2), -1)
    funnel[1] = [6, 9]
    task = _ncf_task("funnel", funnel=funnel)
    neg = task.negatives_for(torch.tensor([1, 1, 2]), torch.tensor([0, 6, 3]))
    assert set(neg[0].tolist()) == {6, 9}  # funnel_share 1: only the user's viewed-not-bought items
    assert 6 not in neg[1].tolist() and 9 in neg[1].tolist()  # never the row's own positive (a uniform draw)
    assert (neg[2] != 3).all() and len(set(neg[2].tolist())) > 2  # user 2 has none: uniform


def test_ncf_trains_end_to_end_with_hard_negatives_and_the_triplet_loss():
    from recsys_spark.models.ncf import NCFNetParams, NCFTask
    from recsys_spark.train.distributed import launch
    from recsys_spark.train.trainer import TrainConfig, fit

    users = torch.arange(6).repeat_interleave(3).int()
    items = ((users * 2 + torch.arange(18) % 3) % 10).int()  # each user 3 neighbouring items
    pairs = sorted(set(zip(users.tolist(), items.tolist(), strict=True)))
    indptr = np.searchsorted([u for u, _ in pairs], np.arange(7))
    params = NCFNetParams(model="gmf", mf_dim=4, loss="triplet", negatives="hard", n_hard=2, seed=3)
    task = NCFTask(params, 6, 10, positives=(indptr, np.array([i for _, i in pairs])))
    shard = {"user_idx": users, "item_idx": items, "weight": torch.ones(18)}
    config = TrainConfig(epochs=3, batch_size=6, lr=0.05, progress=False, schedule="constant")
    (result,) = launch(None, lambda ctx: fit(task, ctx, shard, 3, config), backend="local")
    assert len(result.history) == 3 and all(math.isfinite(r["train_loss"]) for r in result.history)
    assert result.init_kwargs["metric"] == "distance"


@pytest.mark.spark
def test_funnel_lists_hold_the_items_viewed_but_never_bought_before_the_cut(spark):
    import datetime as dt

    from recsys_spark.data.funnel import candidate_matrix, viewed_not_bought

    day = dt.datetime(2026, 1, 1)
    events = spark.createDataFrame([
        ("u1", "a", "view", day), ("u1", "b", "view", day), ("u1", "b", "cart", day),  # b: carted
        ("u1", "c", "view", day + dt.timedelta(1)), ("u1", "d", "purchase", day),  # d: bought, never viewed
        ("u1", "e", "view", day + dt.timedelta(9)),  # after u1's last train interaction: unseen
        ("u2", "c", "view", day), ("u2", "c", "purchase", day + dt.timedelta(1)),  # bought later, still bought
        ("u2", "zz", "view", day),  # not in the item index
    ], "user_id string, item_id string, event_type string, event_time timestamp")
    users = spark.createDataFrame([("u1", 0), ("u2", 1)], "user_id string, user_idx int")
    items = spark.createDataFrame([(x, i) for i, x in enumerate("abcde")], "item_id string, item_idx int")
    train = spark.createDataFrame([(0, 3, day + dt.timedelta(2)), (1, 2, day + dt.timedelta(2))],
                                  "user_idx int, item_idx int, last_ts timestamp")
    lists = viewed_not_bought(events, users, items, train)
    assert {r[0]: r[1] for r in lists.collect()} == {0: [2, 0]}  # c then a: the latest view first
    assert candidate_matrix(lists, 3).tolist() == [[2, 0], [-1, -1], [-1, -1]]
    with pytest.raises(RecsysError, match="disjoint"):
        viewed_not_bought(events, users, items, train, viewed=["view"], bought=["view"])
