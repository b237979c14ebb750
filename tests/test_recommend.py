"""Top-N scoring from factors, the cold-user fallback and the way back to original ids."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import types as T

from recsys_spark import recommend as R
from recsys_spark import scoring as S
from recsys_spark import tables as tb
from recsys_spark.models.als import ALSParams, ALSRecommender
from recsys_spark.models.popularity import PopularityRecommender

PAIRS_SCHEMA = f"{tb.USER_IDX} int, {tb.ITEM_IDX} int"


def brute_force(user_ids, users, item_ids, items, k, seen=None, excluded=()):
    """Full sort of every user's scores on (-score, item_idx): the reference for the blocked top-k."""
    rows = []
    for r, user in enumerate(user_ids):
        scores = (users[r] @ items.T).astype(np.float32)
        banned = set(excluded) | set(seen.get(user, ()) if seen else ())
        order = np.lexsort((item_ids, -scores))
        picked = [c for c in order if item_ids[c] not in banned][:k]
        rows += [(int(user), int(item_ids[c]), float(scores[c]), i + 1) for i, c in enumerate(picked)]
    return rows


def as_rows(frame: pd.DataFrame):
    return [(int(u), int(i), float(s), int(r)) for u, i, s, r in frame[[tb.USER_IDX, tb.ITEM_IDX, tb.SCORE, tb.RANK]]
            .itertuples(index=False)]


def assert_same_recs(got: list[tuple], expected: list[tuple]) -> None:
    """Same (user, item, rank) rows in the same order, scores equal up to float32 rounding."""
    assert [(u, i, r) for u, i, _, r in got] == [(u, i, r) for u, i, _, r in expected]
    assert [s for _, _, s, _ in got] == pytest.approx([s for _, _, s, _ in expected], rel=1e-5, abs=1e-6)


def factors_frame(spark, ids, matrix, id_col):
    schema = T.StructType(
        [T.StructField(id_col, T.IntegerType()), T.StructField(tb.EMBEDDING, T.ArrayType(T.FloatType()))]
    )
    rows = [(int(i), [float(x) for x in v]) for i, v in zip(ids, matrix, strict=True)]
    return spark.createDataFrame(rows, schema)


def test_top_k_of_scores_equals_brute_force_argsort():
    rng = np.random.default_rng(0)
    user_ids = np.arange(7, dtype=np.int32)
    item_ids = np.array([0, 2, 3, 5, 8, 9, 11, 12, 20, 21], dtype=np.int32)  # not dense: positions != ids
    users = rng.normal(size=(7, 4)).astype(np.float32)
    items = rng.normal(size=(10, 4)).astype(np.float32)
    seen = {0: [2, 3, 99], 3: [0], 6: [0, 2, 3, 5, 8, 9, 11, 12]}  # 99 is not in the catalogue
    seen_col = [np.array(seen.get(u, []), dtype=np.int32) if u in seen else None for u in user_ids]
    excluded = [20]
    got = S.top_k_of_scores(user_ids, users @ items.T, seen_col, item_ids, 4,
                            S.positions(item_ids, np.array(excluded)))
    assert_same_recs(as_rows(got), brute_force(user_ids, users, item_ids, items, 4, seen, excluded))
    # User 6 has seen 8 items and item 20 is excluded: only item 21 is left.
    assert got[got[tb.USER_IDX] == 6][tb.ITEM_IDX].tolist() == [21]


def test_top_k_of_scores_breaks_ties_by_smaller_item():
    item_ids = np.arange(5, dtype=np.int32)
    items = np.array([[1.0], [2.0], [2.0], [2.0], [1.0]], dtype=np.float32)  # items 1, 2, 3 tie for first
    got = S.top_k_of_scores(np.array([0]), np.array([[1.0]], np.float32) @ items.T, None, item_ids, 2)
    assert got[tb.ITEM_IDX].tolist() == [1, 2]
    assert got[tb.RANK].tolist() == [1, 2]


def test_top_k_of_scores_on_a_large_catalogue_keeps_every_tie_and_filter():
    """Past ``BOUND_RUN * k`` items only the items above a bound of the k-th best score are sorted: with
    many ties (small integer scores), seen items, excluded items and a user who has seen all but 3 items,
    the rows are still exactly those of a full sort."""
    rng = np.random.default_rng(2)
    n_users, n_items, k = 40, 5 * S.BOUND_RUN * 10 + 7, 10  # not a multiple of the run length
    item_ids = np.arange(n_items, dtype=np.int32) * 3
    scores = rng.integers(0, 6, size=(n_users, n_items)).astype(np.float32)
    seen = {u: list(rng.choice(item_ids, size=int(rng.integers(0, 50)), replace=False)) for u in range(n_users)}
    seen[5] = list(item_ids[3:])
    excluded = [int(item_ids[-1]), int(item_ids[0])]
    seen_col = [np.array(seen[u], dtype=np.int32) for u in range(n_users)]
    got = S.top_k_of_scores(np.arange(n_users), scores.copy(), seen_col, item_ids, k,
                            S.positions(item_ids, np.array(excluded)))
    expected = brute_force(np.arange(n_users), scores, item_ids, np.eye(n_items, dtype=np.float32), k, seen, excluded)
    assert_same_recs(as_rows(got), expected)
    assert got[got[tb.USER_IDX] == 5][tb.ITEM_IDX].tolist() == sorted(item_ids[1:3], key=lambda i: -scores[5, i // 3])


@pytest.mark.spark
def test_top_k_from_factors_equals_brute_force(spark):
    rng = np.random.default_rng(1)
    n_users, n_items, dim, k = 23, 17, 5, 6
    users = rng.normal(size=(n_users, dim)).astype(np.float32)
    items = rng.normal(size=(n_items, dim)).astype(np.float32)
    item_ids = np.arange(n_items) * 2 + 1
    seen = {u: list(rng.choice(item_ids, size=u % 5, replace=False)) for u in range(n_users)}
    seen[22] = list(item_ids)  # everything seen: no rows at all for user 22
    seen_df = spark.createDataFrame([(u, int(i)) for u, its in seen.items() for i in its], PAIRS_SCHEMA)
    got = S.top_k_from_factors(
        factors_frame(spark, range(n_users), users, tb.USER_IDX), factors_frame(spark, item_ids, items, tb.ITEM_IDX),
        k, seen=seen_df, exclude_items=[3, 5], users_per_block=4,
    ).toPandas().sort_values([tb.USER_IDX, tb.RANK])
    expected = brute_force(np.arange(n_users), users, item_ids, items, k, seen, [3, 5])
    assert_same_recs(as_rows(got), expected)
    per_user = got.groupby(tb.USER_IDX).size()
    assert 22 not in per_user.index
    assert all(per_user[u] == min(k, n_items - 2 - len(seen[u])) for u in per_user.index)


@pytest.mark.spark
def test_similar_from_factors_is_cosine(spark):
    vectors = np.array([[1, 0], [1, 1], [0, 2], [-1, 0]], dtype=np.float32)
    got = S.similar_from_factors(factors_frame(spark, range(4), vectors, tb.ITEM_IDX), 2).toPandas()
    top = got.sort_values([tb.ITEM_IDX, tb.RANK])
    first = top[top[tb.ITEM_IDX] == 0]
    assert first[tb.SIMILAR_ITEM_IDX].tolist() == [1, 2]  # cos 0.707, then 0 (item 2) beats -1 (item 3)
    assert first[tb.SCORE].tolist() == pytest.approx([1 / math.sqrt(2), 0.0], abs=1e-6)
    assert (got[tb.ITEM_IDX] != got[tb.SIMILAR_ITEM_IDX]).all()


@pytest.mark.spark
def test_to_original_ids(spark):
    recs = spark.createDataFrame([(0, 1, 0.9, 1), (1, 0, 0.5, 1)], f"{PAIRS_SCHEMA}, {tb.SCORE} double, {tb.RANK} int")
    users = spark.createDataFrame([("alice", 0), ("bob", 1)], f"{tb.USER_ID} string, {tb.USER_IDX} int")
    items = spark.createDataFrame([("apple", 0), ("pear", 1)], f"{tb.ITEM_ID} string, {tb.ITEM_IDX} int")
    got = sorted(tuple(r) for r in R.to_original_ids(recs, users, items).collect())
    assert got == [("alice", "pear", 0.9, 1), ("bob", "apple", 0.5, 1)]


@pytest.mark.spark
def test_fallback_gives_popularity_to_unknown_users(spark):
    # Users 0-3 trained; user 9 is new and has seen item 0, the most popular one.
    rows = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 2), (3, 0), (3, 3)]
    train = spark.createDataFrame([(u, i, 1.0) for u, i in rows], f"{PAIRS_SCHEMA}, {tb.WEIGHT} double")
    als = ALSRecommender(ALSParams(rank=2, max_iter=3, num_blocks=1)).fit(train)
    popularity = PopularityRecommender().fit(train)
    users = spark.createDataFrame([(0,), (9,)], f"{tb.USER_IDX} int")
    seen = train.select(tb.USER_IDX, tb.ITEM_IDX).union(spark.createDataFrame([(9, 0)], PAIRS_SCHEMA))
    recs = R.recommend_with_fallback(als, users, 2, seen, popularity_model=popularity).toPandas()
    cold = recs[recs[tb.USER_IDX] == 9].sort_values(tb.RANK)
    assert cold[tb.ITEM_IDX].tolist() == [1, 2]  # popularity order without item 0
    warm = recs[recs[tb.USER_IDX] == 0]
    assert sorted(warm[tb.ITEM_IDX]) == [2, 3]  # ALS's own list: everything unseen
    # Without the fallback the unknown user simply gets nothing.
    assert set(R.recommend_with_fallback(als, users, 2, seen).toPandas()[tb.USER_IDX]) == {0}
