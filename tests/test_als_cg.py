"""``als_cg`` (recsys_spark/models/als.py ``ALSCGRecommender``): implicit ALS solved by conjugate
gradients on the executors must be ``implicit``'s own fit, step for step, only distributed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.sparse import csr_matrix

from recsys_spark import tables as tb
from recsys_spark.errors import RecsysError
from recsys_spark.models.als import ALSCGParams, ALSCGRecommender
from recsys_spark.tables import EMBEDDING

pytestmark = pytest.mark.spark

N_USERS, N_ITEMS = 120, 40


@pytest.fixture(scope="module")
def table(spark):
    """Every user and item has rows; some weights are negative (a known dislike) or zero (dropped)."""
    rng = np.random.default_rng(5)
    pairs = {(u, i) for u in range(N_USERS) for i in rng.choice(N_ITEMS, 6, replace=False)}
    pairs |= {(int(rng.integers(N_USERS)), i) for i in range(N_ITEMS)}
    users, items = (np.array(col, dtype=np.int32) for col in zip(*sorted(pairs), strict=True))
    weights = rng.integers(1, 5, users.size).astype(np.float32)
    weights[rng.random(users.size) < 0.1] *= -1
    weights[rng.random(users.size) < 0.05] = 0
    frame = pd.DataFrame({tb.USER_IDX: users, tb.ITEM_IDX: items, tb.WEIGHT: weights})
    return frame, spark.createDataFrame(frame).repartition(3).persist()


def by_id(frame, col: str) -> np.ndarray:
    rows = frame.toPandas().sort_values(col)
    return np.stack(rows[EMBEDDING].to_numpy())


def test_the_spark_fit_is_implicits_fit(table):
    """Same seed, same rows: the factors of every user and item equal those of implicit's in-process CG
    fit, so the distribution (partitioning, broadcasts, warm starts, the signed confidences) changes
    nothing. A wrong warm start, a partial Gram matrix or a lost sign would each move them."""
    from implicit.cpu.als import AlternatingLeastSquares

    frame, train = table
    alpha, rank = 2.0, 6
    model = ALSCGRecommender(ALSCGParams(rank=rank, max_iter=4, reg_param=0.5, alpha=alpha, seed=9,
                                         num_blocks=2)).fit(train)
    kept = frame[frame[tb.WEIGHT] != 0]
    c = np.sign(kept[tb.WEIGHT]) * (1 + alpha * kept[tb.WEIGHT].abs())
    cui = csr_matrix((c.astype(np.float32), (kept[tb.USER_IDX], kept[tb.ITEM_IDX])), shape=(N_USERS, N_ITEMS))
    peer = AlternatingLeastSquares(factors=rank, regularization=0.5, alpha=1.0, iterations=4, random_state=9,
                                   num_threads=1, use_cg=True)  # 3 CG steps, as ours
    peer.fit(cui, show_progress=False)
    np.testing.assert_allclose(by_id(model.user_factors(), tb.USER_IDX), peer.user_factors, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(by_id(model.item_factors(), tb.ITEM_IDX), peer.item_factors, rtol=1e-4, atol=1e-6)


def test_folding_in_known_users_solves_the_same_equation(table):
    """Fold-in solves a user's equation exactly with the fit's item factors; for ``als_cg`` its penalty
    is reg_param itself (Hu et al.), not reg_param times the user's rows (MLlib's). After enough
    iterations the CG factors are that solution, so folding the users in again gives them back; with
    MLlib's scaling (about 6 rows a user here) the folded factors come out shorter."""
    frame, train = table
    model = ALSCGRecommender(ALSCGParams(rank=4, max_iter=25, reg_param=2.0, alpha=1.0, num_blocks=2)).fit(train)
    positive = set(frame[frame[tb.WEIGHT] > 0][tb.USER_IDX])
    learnt = by_id(model.learnt_user_factors().filter(model.learnt_user_factors()[tb.USER_IDX].isin(
        [int(u) for u in positive])), tb.USER_IDX)
    folded = by_id(model.fold_in(train), tb.USER_IDX)
    assert len(folded) == len(positive)
    cos = (learnt * folded).sum(1) / np.linalg.norm(learnt, axis=1) / np.linalg.norm(folded, axis=1)
    assert cos.min() > 0.999, np.sort(cos)[:5]
    ratio = np.linalg.norm(folded, axis=1) / np.linalg.norm(learnt, axis=1)
    assert np.abs(ratio - 1).max() < 0.02, np.sort(ratio)[[0, -1]]
    model.regularisation_per_interaction = True  # MLlib's penalty: not the equation the fit solved
    scaled = by_id(model.fold_in(train), tb.USER_IDX)
    assert np.median(np.linalg.norm(scaled, axis=1) / np.linalg.norm(learnt, axis=1)) < 0.9


def test_no_usable_rows_is_one_clear_line(spark):
    train = spark.createDataFrame(pd.DataFrame({tb.USER_IDX: [0, 1], tb.ITEM_IDX: [0, 1], tb.WEIGHT: [0.0, 0.0]}))
    with pytest.raises(RecsysError, match="als_cg: no training rows with a non-zero weight"):
        ALSCGRecommender(ALSCGParams(rank=2, max_iter=1)).fit(train)



def test_factors_over_the_drivers_result_limit_are_refused_before_the_fit(spark, table):
    """Every half-iteration collects a factor matrix: one over spark.driver.maxResultSize would fail a
    job after minutes of work, so the fit stops at once, in one line that names the setting."""
    _, train = table
    conf = spark.sparkContext._conf  # the running context's own conf, which the check reads
    before = conf.get("spark.driver.maxResultSize", "1g")
    conf.set("spark.driver.maxResultSize", "1m")
    try:
        with pytest.raises(RecsysError, match=r"^als_cg: 120 x 3000 factors \(1 MB\) are over "
                                              r"spark.driver.maxResultSize \(1m\), 1 MB: use als"):
            ALSCGRecommender(ALSCGParams(rank=3000, max_iter=1)).fit(train)
    finally:
        conf.set("spark.driver.maxResultSize", before)
