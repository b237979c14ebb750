"""Next-item evaluation: a hand-computed example under both tie rules, resets reaching a stateful scorer,
the popularity and item-kNN baselines, and the Spark evaluator agreeing with the one-process one."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from recsys_spark import tables as tb
from recsys_spark.evaluate_sessions import (
    GRU4RecScorer,
    ItemKNNScorer,
    PopularityScorer,
    evaluate_sessions,
    next_item_metrics,
    query_ranks,
    session_item_arrays,
)
from recsys_spark.models.gru4rec import GRU4Rec

# Scores of the 4 items given the current input item (row = input).
TABLE = np.array([
    [0.0, 0.9, 0.5, 0.5],
    [0.1, 0.2, 0.8, 0.8],  # items 2 and 3 tie
    [0.3, 0.3, 0.3, 0.3],  # everything ties
    [0.9, 0.1, 0.2, 0.0],
])
SESSIONS = [[0, 1, 2], [1, 3], [2, 0, 3], [3]]  # [3] has no query


def last_item_scorer(inputs: np.ndarray, reset: np.ndarray) -> np.ndarray:
    return TABLE[np.where(inputs >= 0, inputs, 0)]


class FirstItemScorer:
    """Scores by the session's *first* item: right only if resets reach the scorer."""

    n_items = 4

    def start(self, batch_size: int):
        first = np.zeros(batch_size, dtype=np.int64)

        def score(inputs, reset):
            first[reset] = inputs[reset]
            return TABLE[first]

        return score


def test_next_item_metrics_hand_computed_under_both_tie_rules():
    # Queries (input -> target): 0->1, 1->2, 1->3, 2->0, 0->3.
    # standard (1 + strictly higher): 1, 1, 1, 1, 2; conservative (>= target): 1, 2, 2, 4, 3.
    got = next_item_metrics(last_item_scorer, SESSIONS, ks=[1, 2], batch_size=2)
    assert got["n_queries"] == 5
    assert got["recall@1"] == pytest.approx(0.8) and got["recall@2"] == pytest.approx(1.0)
    assert got["mrr@1"] == pytest.approx(0.8) and got["mrr@2"] == pytest.approx(4.5 / 5)
    assert got["ndcg@2"] == pytest.approx((4 + 1 / math.log2(3)) / 5)
    cons = next_item_metrics(last_item_scorer, SESSIONS, ks=[1, 2], batch_size=3, ties="conservative")
    assert cons["recall@1"] == pytest.approx(0.2) and cons["recall@2"] == pytest.approx(0.6)
    assert cons["mrr@2"] == pytest.approx((1 + 0.5 + 0.5) / 5)
    assert cons["ndcg@2"] == pytest.approx((1 + 2 / math.log2(3)) / 5)
    assert query_ranks(TABLE[[2]], np.array([1])).tolist() == [1]
    assert query_ranks(TABLE[[2]], np.array([1]), ties="conservative").tolist() == [4]
    empty = next_item_metrics(last_item_scorer, [[1]], ks=[20])
    assert empty["n_queries"] == 0 and math.isnan(empty["recall@20"])


def test_resets_reach_a_stateful_scorer():
    # With the first item: 0->1 rank 1, 1->2 rank 2 (table[0]), 1->3 rank 1, 2->0 and 0->3 rank 1 (table[2]).
    # Batch 2 makes session [2, 0, 3] reuse the row of [1, 3]: without the reset it would score by item 1.
    got = next_item_metrics(FirstItemScorer().start(2), SESSIONS, ks=[1], batch_size=2)
    assert got["recall@1"] == pytest.approx(0.8)


def test_popularity_and_item_knn_baselines():
    train = [[0, 1], [0, 1, 2], [2, 3]]
    pop = PopularityScorer.fit(train, n_items=5)
    assert pop.counts.tolist() == [2, 2, 2, 1, 0]
    scores = pop.start(2)(np.array([3, -1]), np.array([True, True]))
    assert scores.shape == (2, 5) and scores[0] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])  # ties: smaller index first
    # Cosine (lambda 0, alpha 1/2) on session supports 0:2, 1:2, 2:2, 3:1: sim(0,1) = 2/2, sim(0,2) =
    # sim(1,2) = 1/2, sim(2,3) = 1/sqrt(2). Popularity order (half the smallest similarity at most) breaks ties.
    knn = ItemKNNScorer.fit(train, n_items=5, lam=0.0, alpha=0.5)
    scores = knn.start(1)(np.array([2]), np.array([True]))[0]
    prior = 0.5 * 0.5 * np.array([1.0, 0.8, 0.6, 0.4, 0.2])
    assert scores == pytest.approx([0.5 + prior[0], 0.5 + prior[1], prior[2], 1 / math.sqrt(2) + prior[3], prior[4]],
                                   rel=1e-6)
    assert np.argsort(-scores).tolist() == [3, 0, 1, 2, 4]
    top1 = ItemKNNScorer.fit(train, n_items=5, lam=0.0, alpha=0.5, neighbours=1)
    assert top1.indices[top1.indptr[2]:top1.indptr[3]].tolist() == [3]
    damped = ItemKNNScorer.fit(train, n_items=5, lam=20.0, alpha=0.5)  # lambda shrinks rare pairs
    assert damped.start(1)(np.array([0]), np.array([True]))[0][1] == pytest.approx(2 / 22 + damped.prior[1])
    # Item-kNN beats popularity on pairs that always go together (co-occurrence is symmetric: it cannot
    # tell a successor from a predecessor). Equal counts: popularity always predicts item 0.
    pattern = [[0, 1], [1, 0], [2, 3], [3, 2]] * 3
    knn, pop = ItemKNNScorer.fit(pattern, 4), PopularityScorer.fit(pattern, 4)
    assert next_item_metrics(knn.start(8), pattern, ks=[1], batch_size=8)["recall@1"] == 1.0
    assert next_item_metrics(pop.start(8), pattern, ks=[1], batch_size=8)["recall@1"] == pytest.approx(0.25)


@pytest.mark.spark
@pytest.mark.torch
def test_spark_evaluation_matches_the_one_process_evaluation(spark):
    rng = np.random.default_rng(0)
    sessions = [list(rng.integers(0, 10, size=rng.integers(1, 7))) for _ in range(40)]
    rows = [(f"s{n}", 0, int(item), pos) for n, s in enumerate(sessions) for pos, item in enumerate(s)]
    random.Random(0).shuffle(rows)  # order in the frame must not matter
    frame = spark.createDataFrame(rows, "session_id string, user_idx int, item_idx int, position int").repartition(3)
    torch.manual_seed(0)
    scorers = {
        "pop": PopularityScorer.fit(sessions, 10),
        "knn": ItemKNNScorer.fit(sessions, 10, lam=1.0),
        "gru4rec": GRU4RecScorer.from_model(GRU4Rec(10, hidden=8)),
    }
    for name, scorer in scorers.items():
        local = next_item_metrics(scorer.start(4), sessions, ks=[1, 5], batch_size=4)
        distributed = evaluate_sessions(spark, frame, scorer, ks=[1, 5], batch_size=4)
        assert distributed["n_queries"] == local["n_queries"] == sum(len(s) - 1 for s in sessions if len(s) > 1)
        assert distributed == pytest.approx(local), name
    padded = {r[tb.SESSION_ID]: r for r in session_item_arrays(frame, max_length=3).collect()}
    long_one = next(n for n, s in enumerate(sessions) if len(s) > 3)
    assert list(padded[f"s{long_one}"][tb.ITEMS]) == [int(x) for x in sessions[long_one][-3:]]
    short_one = next(n for n, s in enumerate(sessions) if len(s) == 2)
    assert list(padded[f"s{short_one}"][tb.ITEMS]) == [*map(int, sessions[short_one]), tb.PAD_IDX]
    assert padded[f"s{short_one}"][tb.LENGTH] == 2
