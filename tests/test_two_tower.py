"""The two-tower model's own pieces: the log-Q corrected in-batch loss, cold items scored from their
features, and training histories that never hold the positive (the contract suite covers the rest)."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pytest
import torch

from recsys_spark import tables as tb
from recsys_spark.data.feature_spec import FeatureSpec
from recsys_spark.models.two_tower import TwoTowerNetParams, TwoTowerTask, in_batch_loss, prefix_histories

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]


def test_log_q_correction_changes_the_loss_as_the_formula_says():
    B, N, n_items = 3, 2, 4
    logits = torch.tensor([[2.0, 0.5, 1.0, -1.0, 0.3],
                           [0.2, 1.5, 0.7, 0.1, -0.4],
                           [1.1, -0.3, 0.9, 0.6, 0.0]])  # [B, B + N]
    positives = torch.tensor([0, 1, 0])  # row 2's positive is also column 0's item: not its negative
    uniform = torch.tensor([2, 1])
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    candidates = [0, 1, 0, 2, 1]

    def expected(correct: bool) -> float:
        def s(i: int, j: int) -> float:  # s'_ij = s_ij - log(B p_j + N / n_items), the corrected logit
            shift = math.log(B * probs[candidates[j]].item() + N / n_items) if correct else 0.0
            return logits[i, j].item() - shift

        total = 0.0
        for i in range(B):
            usable = [j for j in range(B + N) if j == i or candidates[j] != positives[i].item()]
            total += -s(i, i) + math.log(sum(math.exp(s(i, j)) for j in usable))
        return total / B

    corrected = in_batch_loss(logits, positives, uniform, probs, n_items).item()
    plain = in_batch_loss(logits, positives, uniform, None, n_items).item()
    assert corrected == pytest.approx(expected(True), rel=1e-5)
    assert plain == pytest.approx(expected(False), rel=1e-5)
    assert abs(corrected - plain) > 1e-3


def test_a_cold_item_is_ranked_by_its_features():
    """Planted: users of group g click only the items of genre g. After training with id dropout, an item
    with an unknown id (0) and genre g gets a finite vector and ranks above the other genre's for group g."""
    n_users, n_items = 8, 8
    spec = FeatureSpec((tb.USER_IDX, "group"), (tb.ITEM_IDX, "genre"), (),
                       {tb.USER_IDX: n_users + 1, "group": 3, tb.ITEM_IDX: n_items + 1, "genre": 3})
    group = np.array([1] * 4 + [2] * 4)  # user u's group; item i's genre is the same pattern
    item_fields = np.stack([np.arange(1, n_items + 1), group], axis=1)  # [n_items, 2]
    pairs = [(u, i) for u in range(n_users) for i in range(n_items) if group[u] == group[i]]
    users = torch.tensor([u for u, _ in pairs])
    batch = {tb.USER_IDX: users, tb.ITEM_IDX: torch.tensor([i for _, i in pairs]),
             tb.FIELDS: torch.stack([users + 1, torch.as_tensor(group)[users]], dim=1),
             tb.ITEMS: torch.full((len(pairs), 3), tb.PAD_IDX)}
    params = TwoTowerNetParams(dim=8, field_dim=8, hidden=[16], dropout=0.0, temperature=0.1, id_dropout=0.5)
    task = TwoTowerTask(params, spec, item_fields, np.full(n_items, 4.0))
    task.seed_negatives(0)
    model = task.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        optimizer.zero_grad()
        task.loss(model, batch).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        cold = model.item_vectors(torch.tensor([[0, 1], [0, 2]]))  # [2, d]: new ids, genres 1 and 2
        queries = torch.tensor([[1, 1], [5, 2], [0, 1], [0, 2]])  # users 0 and 4, then two cold users
        scores = model.user_vectors(queries, torch.full((4, 3), tb.PAD_IDX)) @ cold.T  # [4, 2]
    assert torch.isfinite(cold).all()
    assert (scores[[0, 2], 0] > scores[[0, 2], 1]).all() and (scores[[1, 3], 1] > scores[[1, 3], 0]).all()


@pytest.mark.spark
def test_training_histories_hold_only_earlier_items(spark):
    day = dt.datetime(2026, 1, 1)
    rows = [(0, item, day + dt.timedelta(hours=h)) for h, item in enumerate([5, 3, 9, 7])] + [(1, 2, day)]
    train = spark.createDataFrame(rows, f"{tb.USER_IDX} int, {tb.ITEM_IDX} int, {tb.FIRST_TS} timestamp")
    got = {(r[0], r[1]): list(r[2]) for r in prefix_histories(train, 2).collect()}
    pad = tb.PAD_IDX
    assert got == {(0, 5): [pad, pad], (0, 3): [pad, 5], (0, 9): [5, 3], (0, 7): [3, 9], (1, 2): [pad, pad]}
