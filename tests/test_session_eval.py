"""Next-item evaluation: a hand-computed example under both tie rules, resets reaching a stateful scorer,
the popularity and item-kNN baselines, the SASRec scorer against the module itself, and the Spark
evaluator agreeing with the one-process one."""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch

from recsys_spark import tables as tb
from recsys_spark.data.sequences import session_item_arrays
from recsys_spark.evaluate.sessions import (
    ItemKNNScorer,
    PopularityScorer,
    evaluate_sessions,
    next_item_metrics,
    query_ranks,
)
from recsys_spark.models.gru4rec import GRU4RecScorer
from recsys_spark.models.sasrec import SASRecScorer
from recsys_spark.nn.gru4rec import GRU4Rec
from recsys_spark.nn.sasrec import SASRec

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


def left_padded(prefix, max_len: int) -> torch.Tensor:
    tail = list(prefix)[-max_len:]
    return torch.tensor([[tb.PAD_IDX] * (max_len - len(tail)) + tail])  # [1, max_len]


@pytest.mark.torch
def test_sasrec_scorer_matches_the_module_on_the_left_padded_prefix(torch_one_thread):
    model = SASRec(12, max_len=4, d=8, heads=2, blocks=2, dropout=0.3).eval()
    # Rebuilt from numpy weights after a pickle round trip (as when broadcast): the same module.
    scorer = pickle.loads(pickle.dumps(SASRecScorer.from_model(model)))
    assert scorer.n_items == 12 and scorer.snapshot.weights
    sessions = [[3, 7, 1, 0, 11, 5, 2], [4, 4, 9], [6, 2]]  # the first is longer than max_len
    expected = {}  # (session, position) -> the module's scores after reading items[: position + 1]
    for n, items in enumerate(sessions):
        for t in range(len(items) - 1):
            expected[n, t] = model.score_all(left_padded(items[: t + 1], 4))[0].numpy()
    # Drive the scorer session-parallel by hand: 2 rows, session 2 takes row 1 after session 1 ends
    # (reset), row 1 idles (PAD) once session 2 is done while row 0 goes on.
    score = scorer.start(2)
    plan = [(0, 0, 1, 0, True), (0, 1, 1, 1, False), (0, 2, 2, 0, True), (0, 3, None, None, False),
            (0, 4, None, None, False), (0, 5, None, None, False)]
    for s0, t0, s1, t1, fresh in plan:
        inputs = np.array([sessions[s0][t0], tb.PAD_IDX if s1 is None else sessions[s1][t1]])
        reset = np.array([t0 == 0, fresh])
        got = score(inputs, reset)
        assert got.shape == (2, 12)
        np.testing.assert_allclose(got[0], expected[s0, t0], rtol=1e-5, atol=1e-5)
        if s1 is not None:
            np.testing.assert_allclose(got[1], expected[s1, t1], rtol=1e-5, atol=1e-5)
    # A reset clears the history: row 0 (7 items read) and row 1 start afresh.
    got = score(np.array([9, 2]), np.array([True, True]))
    np.testing.assert_allclose(got[0], model.score_all(left_padded([9], 4))[0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], model.score_all(left_padded([2], 4))[0].numpy(), rtol=1e-5, atol=1e-5)
    # Without the reset the row would still see its old items.
    assert not np.allclose(got[0], model.score_all(left_padded([0, 11, 5, 9], 4))[0].numpy(), atol=1e-3)
    # Through the evaluator: the same ranks as the module on every prefix.
    ranks = [1 + int((expected[n, t] > expected[n, t][sessions[n][t + 1]]).sum()) for n, t in sorted(expected)]
    got = next_item_metrics(scorer.start(2), sessions, ks=[20], batch_size=2)
    assert got["n_queries"] == len(ranks) == 9
    assert got["mrr@20"] == pytest.approx(np.mean([1 / r for r in ranks]), rel=1e-6)


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
        "sasrec": SASRecScorer.from_model(SASRec(10, max_len=4, d=8, heads=2, blocks=1).eval()),
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
