"""The Spark evaluator on tiny frames whose answers are worked out by hand, and its parity with metrics.py."""

from __future__ import annotations

import datetime
import math

import numpy as np
import pandas as pd
import pytest

from recsys_spark import metrics as M
from recsys_spark import tables as tb
from recsys_spark.errors import RecsysError
from recsys_spark.evaluate.ranking import COVERAGE, MEAN_POPULARITY, N_USERS, evaluate, format_table, with_run_info

RECS_DDL = f"{tb.USER_IDX} int, {tb.ITEM_IDX} int, {tb.SCORE} double, {tb.RANK} int"
PAIRS_DDL = f"{tb.USER_IDX} int, {tb.ITEM_IDX} int"

D2 = 1.0 / math.log2(3)  # discount of position 2


def as_dict(frame) -> dict[tuple[str, int], float]:
    return {(r[tb.METRIC], r[tb.K]): r[tb.VALUE] for r in frame.collect()}


@pytest.fixture(scope="module")
def tiny(spark):
    """Four users, six items, ks = [1, 2].

    u0: recs 5, 3 (equal scores, rank disagrees with item order: rank alone decides), test {3}
    u1: recs 0, 1 (and 2 at rank 3, past max k), test {0, 4}
    u2: no recs, test {2}               -> counts with 0
    u3: recs 4, 1, no test items        -> left out of the ranking metrics, kept in coverage and popularity
    """
    recs = spark.createDataFrame(
        [
            (0, 3, 0.9, 2), (0, 5, 0.9, 1),
            (1, 0, 0.8, 1), (1, 1, 0.7, 2), (1, 2, 0.1, 3),
            (3, 4, 0.6, 1), (3, 1, 0.5, 2),
        ],
        RECS_DDL,
    )
    test = spark.createDataFrame(
        [(0, 3, 1.0), (1, 0, 1.0), (1, 4, 2.0), (2, 2, 1.0)], f"{PAIRS_DDL}, {tb.WEIGHT} double"
    )
    # (0, 0) twice: popularity counts distinct users.
    train = spark.createDataFrame(
        [(0, 0), (0, 0), (0, 1), (1, 3), (2, 0), (2, 3), (3, 0), (3, 2)], PAIRS_DDL
    )
    return as_dict(evaluate(recs, test, train, ks=[2, 1], n_items=6))


@pytest.mark.spark
def test_ranking_metrics_by_hand(tiny):
    # Per user (u0, u1, u2) at k = 1: u0 top-1 is item 5 (miss), u1 top-1 is item 0 (hit), u2 has nothing.
    # At k = 2: u0 hits at position 2, u1 still only at position 1.
    assert tiny[(M.HR, 1)] == pytest.approx((0 + 1 + 0) / 3)
    assert tiny[(M.HR, 2)] == pytest.approx((1 + 1 + 0) / 3)
    assert tiny[(M.RECALL, 1)] == pytest.approx((0 + 1 / 2 + 0) / 3)
    assert tiny[(M.RECALL, 2)] == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert tiny[(M.PRECISION, 1)] == pytest.approx((0 + 1 + 0) / 3)
    assert tiny[(M.PRECISION, 2)] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    # k = 1: u1 DCG 1 / ideal 1. k = 2: u0 DCG 1/log2(3) / ideal min(1, 2) = 1 -> 0.63093;
    # u1 DCG 1 / ideal min(2, 2) = 1 + 0.63093 -> 0.61315
    assert tiny[(M.NDCG, 1)] == pytest.approx((0 + 1 + 0) / 3)
    assert tiny[(M.NDCG, 2)] == pytest.approx((D2 + 1 / (1 + D2) + 0) / 3)
    assert tiny[(M.NDCG, 2)] == pytest.approx(0.41469, abs=1e-5)
    # k = 2: u0 (1/2) / min(1, 2) = 1/2; u1 (1/1) / min(2, 2) = 1/2
    assert tiny[(M.MAP, 1)] == pytest.approx((0 + 1 + 0) / 3)
    assert tiny[(M.MAP, 2)] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    # u0's first hit at 2: item 5 before item 3, although their scores tie and 3 < 5, because rank says so
    assert tiny[(M.MRR, 1)] == pytest.approx((0 + 1 + 0) / 3)
    assert tiny[(M.MRR, 2)] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert tiny[(N_USERS, 0)] == 3.0


@pytest.mark.spark
def test_coverage_and_popularity_by_hand(tiny):
    # top-1 items of all users with recs (u3 included): {5, 0, 4} -> 3 / 6; top-2: {5, 3, 0, 1, 4} -> 5 / 6
    assert tiny[(COVERAGE, 1)] == pytest.approx(3 / 6)
    assert tiny[(COVERAGE, 2)] == pytest.approx(5 / 6)
    # popularity over 4 train users: item 0 by u0, u2, u3 = 3/4; item 1 by u0 = 1/4; item 3 by u1, u2 = 2/4;
    # items 4 and 5 never in train = 0.
    # top-1 pairs (u0, 5), (u1, 0), (u3, 4): (0 + 3/4 + 0) / 3
    assert tiny[(MEAN_POPULARITY, 1)] == pytest.approx((0 + 3 / 4 + 0) / 3)
    # top-2 adds (u0, 3), (u1, 1), (u3, 1): (0 + 3/4 + 0 + 1/2 + 1/4 + 1/4) / 6
    assert tiny[(MEAN_POPULARITY, 2)] == pytest.approx((0 + 3 / 4 + 0 + 1 / 2 + 1 / 4 + 1 / 4) / 6)


@pytest.mark.spark
def test_result_shape(tiny):
    names = [*M.RANKING_METRICS, COVERAGE, MEAN_POPULARITY]
    assert set(tiny) == {(name, k) for name in names for k in (1, 2)} | {(N_USERS, 0)}


@pytest.mark.spark
def test_schema(spark):
    recs = spark.createDataFrame([(0, 1, 1.0, 1)], RECS_DDL)
    pairs = spark.createDataFrame([(0, 1)], PAIRS_DDL)
    result = evaluate(recs, pairs, pairs, ks=[1], n_items=2)
    assert [(f.name, f.dataType.simpleString()) for f in result.schema.fields] == [
        (tb.METRIC, "string"),
        (tb.K, "int"),
        (tb.VALUE, "double"),
    ]


@pytest.mark.spark
def test_parity_with_numpy(spark):
    """Spark evaluate() equals the plain average of metrics.py over the same users."""
    rng = np.random.default_rng(7)
    n_items, ks = 15, [1, 3, 10]  # lists of 6, so k = 10 runs past their end
    ranked = {u: [int(i) for i in rng.permutation(n_items)[:6]] for u in range(7)}  # user 6: no test items
    relevant = {u: [int(i) for i in rng.choice(n_items, size=rng.integers(1, 4), replace=False)]
                for u in [0, 1, 2, 3, 4, 5, 7]}  # user 7: no recommendations
    recs_rows = [(u, item, 1.0 - 0.1 * r, r + 1) for u, items in ranked.items() for r, item in enumerate(items)]
    recs = spark.createDataFrame(recs_rows[::-1], RECS_DDL)  # order of rows must not matter
    test = spark.createDataFrame([(u, i) for u, items in relevant.items() for i in items], PAIRS_DDL)
    train = spark.createDataFrame([(u, (u + 1) % n_items) for u in range(8)], PAIRS_DDL)

    got = as_dict(evaluate(recs, test, train, ks, n_items))

    singles = {M.HR: M.hit_rate, M.RECALL: M.recall, M.PRECISION: M.precision, M.NDCG: M.ndcg,
               M.MAP: M.average_precision, M.MRR: M.reciprocal_rank}
    for name, metric in singles.items():
        for k in ks:
            expected = np.mean([metric(ranked.get(u, []), items, k) for u, items in relevant.items()])
            assert got[(name, k)] == pytest.approx(expected, abs=1e-12), (name, k)
    assert got[(N_USERS, 0)] == len(relevant)


@pytest.mark.spark
def test_invalid_arguments(spark):
    recs = spark.createDataFrame([(0, 1, 1.0, 1)], RECS_DDL)
    pairs = spark.createDataFrame([(0, 1)], PAIRS_DDL)
    with pytest.raises(RecsysError, match="cut-offs"):
        evaluate(recs, pairs, pairs, ks=[0], n_items=2)
    with pytest.raises(RecsysError, match="n_items"):
        evaluate(recs, pairs, pairs, ks=[1], n_items=0)
    with pytest.raises(RecsysError, match="rank"):
        evaluate(recs.drop(tb.RANK), pairs, pairs, ks=[1], n_items=2)


@pytest.mark.spark
def test_with_run_info(spark):
    metrics = spark.createDataFrame([("hr", 10, 0.25)], f"{tb.METRIC} string, {tb.K} int, {tb.VALUE} double")
    rows = with_run_info(metrics, "r1", "2024-03-01", "als", "leave_last_out").collect()
    assert [tuple(r) for r in rows] == [("r1", datetime.date(2024, 3, 1), "als", "leave_last_out", "hr", 10, 0.25)]


def test_format_table_from_one_frame():
    frame = pd.DataFrame(
        {
            tb.MODEL: ["als", "als", "als", "pop", "pop", "pop"],
            tb.METRIC: ["hr", "ndcg", N_USERS, "hr", "ndcg", N_USERS],
            tb.K: [10, 10, 0, 10, 10, 0],
            tb.VALUE: [0.25, 0.1, 100.0, 0.125, 0.05, 100.0],
        }
    )
    assert format_table(frame) == "\n".join(
        [
            "model  NDCG@10   HR@10  users",
            "-----  -------  ------  -----",
            "als     0.1000  0.2500    100",
            "pop     0.0500  0.1250    100",
        ]
    )


@pytest.mark.spark
def test_format_table_from_dict_with_chosen_columns(spark):
    als = spark.createDataFrame(
        [("hr", 10, 0.25), ("recall", 20, 0.5)], f"{tb.METRIC} string, {tb.K} int, {tb.VALUE} double"
    )
    ncf = pd.DataFrame({tb.METRIC: ["hr"], tb.K: [10], tb.VALUE: [0.3]})
    assert format_table({"als": als, "ncf": ncf}, columns=["hr@10", "recall@20"]) == "\n".join(
        [
            "model   HR@10  Recall@20",
            "-----  ------  ---------",
            "als    0.2500     0.5000",
            "ncf    0.3000          -",
        ]
    )
