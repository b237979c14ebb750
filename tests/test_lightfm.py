"""LightFM: WARP against hand-computed values, the network's sums and folded biases, and a planted cold
item ranked by its features alone (pure torch, no Spark: seconds)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from recsys_spark import tables as tb
from recsys_spark.data.feature_spec import FeatureSpec
from recsys_spark.models.lightfm import LightFMNetParams, LightFMTask, cold_items_unknown
from recsys_spark.nn.lightfm import LightFM
from recsys_spark.train import losses

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]

GROUP = "group"  # a user feature: which half of the catalogue the user likes (1 or 2)
GENRE = "genre"  # an item feature: which half of the catalogue the item is in (1 or 2)
USERS, ITEMS = 40, 21  # items 0..9 genre 1, 10..19 genre 2, item 20 genre 1 and never interacted with
COLD = 20


def test_warp_hand_computed_rank_weights_and_no_violation():
    n_items = 10
    pos = torch.tensor([2.0, 0.0, 5.0, 1.0], requires_grad=True)
    neg = torch.tensor([[0.0, 1.5, 3.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.5]], requires_grad=True)
    # row 0: draw 1 misses (0 <= 2 - 1), draw 2 violates (1.5 > 1): rank floor(9 / 2) = 4, hinge 1 - 2 + 1.5
    # row 1: draw 1 violates: rank floor(9 / 1) = 9, hinge 1 - 0 + 0.5
    # row 2: no draw within the margin of 5: 0
    # row 3: draw 3 violates (0.5 > 0): rank floor(9 / 3) = 3, hinge 1 - 1 + 0.5
    rows = [math.log(4) * 0.5, math.log(9) * 1.5, 0.0, math.log(3) * 0.5]
    loss = losses.warp(pos, neg, n_items=n_items)
    assert loss.item() == pytest.approx(sum(rows) / 4, rel=1e-6)
    loss.backward()
    # Only the first violating negative of each row carries gradient, weighted by log(rank) / B.
    expected = torch.zeros(4, 3)
    expected[0, 1], expected[1, 0], expected[3, 2] = math.log(4) / 4, math.log(9) / 4, math.log(3) / 4
    assert torch.allclose(neg.grad, expected)
    assert torch.allclose(pos.grad, -expected.sum(1))
    # Nothing violates anywhere: exactly zero. A rank estimate below 2 (more draws than N - 1) weighs 0.
    assert losses.warp(torch.tensor([5.0]), torch.tensor([[0.0, 1.0]]), n_items=10).item() == 0.0
    assert losses.warp(torch.tensor([0.0]), torch.tensor([[-5.0, 3.0]]), n_items=2).item() == 0.0


def test_network_sums_active_features_and_folds_the_biases():
    model = LightFM([5, 3], [4, 3], dim=6)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    users = torch.tensor([[2, 1], [0, 2], [0, 0], [9, 1]])  # id 2 + group 1; cold (group only); nothing; unseen id
    items = torch.tensor([[3, 2], [0, 1]])
    emb, bias = model.users.embedding.weight, model.users.bias.weight[:, 0]
    # Rows: field 0 at 0..4, field 1 at 5..7; unknown (0) and past-the-vocabulary values contribute nothing.
    p = torch.stack([emb[2] + emb[6], emb[7], torch.zeros(6), emb[6]])
    b = torch.stack([bias[2] + bias[6], bias[7], torch.zeros(()), bias[6]])
    q_emb, q_bias = model.items.embedding.weight, model.items.bias.weight[:, 0]
    q = torch.stack([q_emb[3] + q_emb[6], q_emb[5]])
    b_i = torch.stack([q_bias[3] + q_bias[6], q_bias[5]])
    expected = p @ q.T + b[:, None] + b_i[None, :]  # f(u, i) = <p_u, q_i> + b_u + b_i
    with torch.no_grad():
        assert torch.allclose(model.score_items(users, items), expected, atol=1e-5)
        assert torch.allclose(model(users.unsqueeze(1), items.unsqueeze(0)), expected, atol=1e-5)
        # Candidates of a table, as training scores them (each distinct item embedded once).
        candidates = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 1]])
        assert torch.allclose(model(users, items, candidates), expected.gather(1, candidates), atol=1e-5)
        assert model.user_vectors(users).shape == (4, 8)  # [p_u, b_u, 1]: dot [q_i, 1, b_i] = f


def _spec() -> FeatureSpec:
    cards = {tb.USER_IDX: USERS + 1, GROUP: 3, tb.ITEM_IDX: ITEMS + 1, GENRE: 3}
    return FeatureSpec((tb.USER_IDX, GROUP), (tb.ITEM_IDX, GENRE), (), cards)


def _positives() -> dict[str, torch.Tensor]:
    """Every user of group g likes 6 of the 10 items of genre g (never the planted item 20)."""
    users, items = [], []
    for u in range(USERS):
        half = 0 if u < USERS // 2 else 10
        for i in range(6):
            users.append(u)
            items.append(half + (u + i) % 10)
    users_t, items_t = torch.tensor(users), torch.tensor(items)
    fields = torch.stack([users_t + 1, torch.where(users_t < USERS // 2, 1, 2)], dim=1)  # user block [N, 2]
    return {tb.USER_IDX: users_t, tb.ITEM_IDX: items_t, tb.FIELDS: torch.cat([fields, fields * 0], dim=1)}


def test_id_dropout_blanks_a_share_of_users_identity_and_nothing_else():
    """A row trained as a cold user reads what serving gives a cold user: id 0, side features kept."""
    users = torch.stack([torch.arange(1, 2001), torch.full((2000,), 2)], dim=1)  # [B, Fu]: id, group
    task = LightFMTask(LightFMNetParams(id_dropout=0.3), _spec(), np.ones((ITEMS, 2), dtype=np.int64))
    task.seed_negatives(0)
    cold = task._make_cold(users)
    blanked = cold[:, 0] == 0
    assert 0.27 < blanked.float().mean() < 0.33
    assert torch.equal(cold[~blanked], users[~blanked]) and (cold[:, 1] == 2).all()
    off = LightFMTask(LightFMNetParams(id_dropout=0.0), _spec(), np.ones((ITEMS, 2), dtype=np.int64))
    assert torch.equal(off._make_cold(users), users)


@pytest.mark.parametrize("loss, id_dropout", [("warp", 0.0), ("bpr", 0.0), ("warp", 0.3)])
def test_planted_cold_item_is_ranked_by_its_features(loss, id_dropout):
    data = _positives()
    raw = np.stack([np.arange(ITEMS) + 1, np.where((np.arange(ITEMS) < 10) | (np.arange(ITEMS) == COLD), 1, 2)], 1)
    table = cold_items_unknown(raw, _spec(), np.bincount(data[tb.ITEM_IDX].numpy(), minlength=ITEMS))
    assert table[COLD].tolist() == [0, 1] and (table[:COLD, 0] == np.arange(1, COLD + 1)).all()
    task = LightFMTask(LightFMNetParams(dim=8, loss=loss, n_negatives=4, id_dropout=id_dropout, seed=0), _spec(),
                       table)
    task = pickle.loads(pickle.dumps(task))  # what the launcher does to ship it to a rank
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(len(data[tb.ITEM_IDX]), (64,), generator=g)
        opt.zero_grad()
        task.loss(model, {k: v[idx] for k, v in data.items()}).backward()
        opt.step()
    with torch.no_grad():
        # A warm user of each group, and a cold user of each group (identity unknown).
        scores = model.eval().score_items(torch.tensor([[1, 1], [USERS, 2], [0, 1], [0, 2]]),
                                          torch.as_tensor(table)).numpy()
    genre1, genre2 = scores[:, :10], scores[:, 10:20]
    for row in (0, 2):  # group 1: the cold genre-1 item above every genre-2 item
        assert scores[row, COLD] > genre2[row].max()
    for row in (1, 3):  # group 2: below every genre-2 item
        assert scores[row, COLD] < genre2[row].min()
    assert (genre1[[0, 2]].mean(1) > genre2[[0, 2]].mean(1)).all()
