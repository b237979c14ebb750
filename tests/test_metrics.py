"""Per-user ranking metrics against answers worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsys_spark import metrics as M

# Discounts 1 / log2(i + 1) for positions i = 1, 2, 3.
D1, D2, D3 = 1.0, 1.0 / math.log2(3), 1.0 / math.log2(4)  # 1, 0.63093, 0.5


def test_two_hits_in_five():
    ranked, relevant = [3, 1, 4, 5, 9], {1, 5, 7}  # hits at positions 2 and 4; |relevant| = 3
    assert M.hit_rate(ranked, relevant, 5) == 1.0
    assert M.recall(ranked, relevant, 5) == pytest.approx(2 / 3)
    assert M.precision(ranked, relevant, 5) == pytest.approx(2 / 5)
    # DCG = 1/log2(3) + 1/log2(5) = 0.63093 + 0.43068; ideal over min(3, 5) = 3 positions: 1 + 0.63093 + 0.5
    assert M.ndcg(ranked, relevant, 5) == pytest.approx((D2 + 1 / math.log2(5)) / (D1 + D2 + D3))
    assert M.ndcg(ranked, relevant, 5) == pytest.approx(0.49819, abs=1e-5)
    # precision at the hits: 1/2 (position 2), 2/4 (position 4); sum 1.0 / min(3, 5) = 1/3
    assert M.average_precision(ranked, relevant, 5) == pytest.approx(1 / 3)
    assert M.reciprocal_rank(ranked, relevant, 5) == pytest.approx(1 / 2)


def test_cutoff_before_any_hit():
    ranked, relevant = [3, 1, 4, 5, 9], {1, 5, 7}  # first hit at position 2, so nothing within k = 1
    for metric in (M.hit_rate, M.recall, M.precision, M.ndcg, M.average_precision, M.reciprocal_rank):
        assert metric(ranked, relevant, 1) == 0.0


def test_cutoff_three():
    ranked, relevant = [3, 1, 4, 5, 9], {1, 5, 7}  # within k = 3 only the hit at position 2
    assert M.recall(ranked, relevant, 3) == pytest.approx(1 / 3)
    assert M.precision(ranked, relevant, 3) == pytest.approx(1 / 3)
    # DCG = 0.63093; ideal over min(3, 3) = 3 positions = 2.13093
    assert M.ndcg(ranked, relevant, 3) == pytest.approx(D2 / (D1 + D2 + D3))
    # (1/2) / min(3, 3)
    assert M.average_precision(ranked, relevant, 3) == pytest.approx(1 / 6)


def test_k_larger_than_the_list():
    ranked, relevant = [2, 8], {8}  # one hit at position 2, list of 2, k = 10
    assert M.hit_rate(ranked, relevant, 10) == 1.0
    assert M.recall(ranked, relevant, 10) == 1.0
    assert M.precision(ranked, relevant, 10) == pytest.approx(1 / 10)  # still divided by k
    # DCG = 1/log2(3); ideal over min(1, 10) = 1 position = 1
    assert M.ndcg(ranked, relevant, 10) == pytest.approx(D2)
    # precision at the hit 1/2, divided by min(1, 10) = 1
    assert M.average_precision(ranked, relevant, 10) == pytest.approx(1 / 2)
    assert M.reciprocal_rank(ranked, relevant, 10) == pytest.approx(1 / 2)


def test_ideal_dcg_uses_min_of_relevant_and_k():
    ranked, relevant = [1, 9], [1, 2, 3]  # one hit at position 1; 3 relevant but only k = 2 slots
    # DCG = 1; ideal over min(3, 2) = 2 positions = 1 + 0.63093
    assert M.ndcg(ranked, relevant, 2) == pytest.approx(1 / (D1 + D2))
    assert M.ndcg(ranked, relevant, 2) == pytest.approx(0.61315, abs=1e-5)
    # precision at the hit 1/1, divided by min(3, 2) = 2
    assert M.average_precision(ranked, relevant, 2) == pytest.approx(1 / 2)
    assert M.recall(ranked, relevant, 2) == pytest.approx(1 / 3)  # by |relevant|, not min(|relevant|, k)


def test_order_is_taken_as_given():
    # Equal scores were already broken by the recommender; only the order of the list matters.
    assert M.reciprocal_rank([4, 7], {7}, 2) == pytest.approx(1 / 2)
    assert M.reciprocal_rank([7, 4], {7}, 2) == 1.0


def test_empty_recommendation_list_scores_zero():
    for metric in (M.hit_rate, M.recall, M.precision, M.ndcg, M.average_precision, M.reciprocal_rank):
        assert metric([], {1, 2}, 10) == 0.0
        assert metric(np.array([], dtype=np.int64), np.array([1, 2]), 10) == 0.0


def test_user_without_relevant_items_is_not_scored():
    for metric in (M.hit_rate, M.recall, M.precision, M.ndcg, M.average_precision, M.reciprocal_rank):
        assert math.isnan(metric([1, 2, 3], set(), 2))
    scores = M.user_metrics([1, 2, 3], [], [1, 2])
    assert all(np.isnan(values).all() for values in scores.values())


def test_duplicate_relevant_items_count_once():
    assert M.recall([5, 6], [5, 5, 6, 7], 2) == pytest.approx(2 / 3)


def test_user_metrics_at_several_ks():
    ranked, relevant = np.array([3, 1, 4, 5, 9]), np.array([1, 5, 7])
    scores = M.user_metrics(ranked, relevant, [1, 3, 5, 10])
    assert set(scores) == set(M.RANKING_METRICS)
    np.testing.assert_allclose(scores[M.HR], [0, 1, 1, 1])
    np.testing.assert_allclose(scores[M.RECALL], [0, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(scores[M.PRECISION], [0, 1 / 3, 2 / 5, 2 / 10])
    np.testing.assert_allclose(scores[M.MRR], [0, 1 / 2, 1 / 2, 1 / 2])
    # MAP: (1/2)/3 at k = 3; (1/2 + 2/4)/3 at k = 5 and 10
    np.testing.assert_allclose(scores[M.MAP], [0, 1 / 6, 1 / 3, 1 / 3])
    # the vectorised helper agrees with the one-k functions
    singles = {M.HR: M.hit_rate, M.RECALL: M.recall, M.PRECISION: M.precision, M.NDCG: M.ndcg,
               M.MAP: M.average_precision, M.MRR: M.reciprocal_rank}
    for name, metric in singles.items():
        for i, k in enumerate([1, 3, 5, 10]):
            assert scores[name][i] == pytest.approx(metric(ranked, relevant, k)), (name, k)


@pytest.mark.parametrize("ks", [[], [0], [2, -1], [1.5]])
def test_invalid_cutoffs_are_refused(ks):
    with pytest.raises(ValueError, match="cut-offs"):
        M.user_metrics([1], [1], ks)
