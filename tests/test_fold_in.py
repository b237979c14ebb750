"""ALS fold-in (recsys_spark/models/als.py ``fold_in``): users the fit never saw get factors from their
interactions with the item factors fixed, by MLlib's own normal equation."""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.errors import RecsysError
from recsys_spark.models.als import ALSParams, ALSRecommender
from recsys_spark.tables import EMBEDDING

pytestmark = pytest.mark.spark


def factors_by_user(frame) -> dict[int, np.ndarray]:
    return {r[tb.USER_IDX]: np.asarray(r[EMBEDDING], dtype=np.float64) for r in frame.collect()}


def cosines(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> np.ndarray:
    users = sorted(a)
    x, y = np.stack([a[u] for u in users]), np.stack([b[u] for u in users])
    return (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)


@pytest.mark.parametrize("nonnegative", [False, True], ids=["cholesky", "nnls"])
def test_folding_in_known_users_gives_back_the_factors_mllib_learnt(world, nonnegative):
    """MLlib's last half-iteration computes every user's factor from the final item factors; folding the
    same users in again from the same rows must give that factor back. Some weights are negated and some
    zeroed, so MLlib's |rating| confidence, preference 0 for r <= 0 and its count of positive rows in the
    regularisation are all pinned (measured: every cosine above 0.99999 for Cholesky, 0.999 for NNLS)."""
    train = world.train.select(
        tb.USER_IDX, tb.ITEM_IDX,
        F.when(F.col(tb.ITEM_IDX) % 7 == 3, -F.col(tb.WEIGHT))
        .when(F.col(tb.ITEM_IDX) % 11 == 5, F.lit(0.0)).otherwise(F.col(tb.WEIGHT)).alias(tb.WEIGHT),
    ).persist()
    model = ALSRecommender(ALSParams(rank=8, max_iter=6, reg_param=0.05, alpha=2.0, num_blocks=2, seed=3,
                                     nonnegative=nonnegative)).fit(train)
    learnt = factors_by_user(model.learnt_user_factors())
    folded = factors_by_user(model.fold_in(train))
    # A user with no positive weight left has no row (MLlib learnt a zero vector for them).
    zero = {u for u, v in learnt.items() if not v.any()}
    assert set(folded) == set(learnt) - zero and len(folded) > 50
    cos = cosines(folded, learnt)
    assert cos.min() > (0.999 if nonnegative else 0.99999), np.sort(cos)[:5]
    norms = np.array([np.linalg.norm(folded[u]) / np.linalg.norm(learnt[u]) for u in sorted(folded)])
    assert np.abs(norms - 1).max() < (1e-2 if nonnegative else 1e-4), norms
    train.unpersist()


def test_fold_in_users_adds_only_unseen_users_and_they_are_recommended(world):
    """Users left out of the fit are folded in and recommended from their factors; known users keep the
    learnt ones; items the model never saw are ignored; a user with no known item gets no factor."""
    train = world.train.select(tb.USER_IDX, tb.ITEM_IDX, tb.WEIGHT).persist()
    held_out = F.col(tb.USER_IDX) % 5 == 0
    model = ALSRecommender(ALSParams(rank=8, max_iter=5, num_blocks=2)).fit(train.filter(~held_out))
    n_items = train.agg(F.max(tb.ITEM_IDX)).first()[0] + 1
    ghost = world.train.sparkSession.createDataFrame([(100_000, n_items + 5, 3.0)], train.schema)
    new = model.fold_in_users(train.unionByName(ghost))
    new_users = {r[0] for r in new.select(tb.USER_IDX).collect()}
    assert new_users == {r[0] for r in train.filter(held_out).select(tb.USER_IDX).distinct().collect()}
    assert model.user_factors().count() == model.learnt_user_factors().count() + len(new_users)
    recs = model.recommend(train.filter(held_out).select(tb.USER_IDX), 5, seen=train).toPandas()
    assert set(recs[tb.USER_IDX]) == new_users and (recs.groupby(tb.USER_IDX).size() == 5).all()
    train.unpersist()


def test_fold_in_of_an_unfitted_model_says_so(world):
    with pytest.raises(RecsysError, match="not fitted"):
        ALSRecommender().fold_in(world.train)
