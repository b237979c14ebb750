"""The two-stage model's training set on a tiny planted example: candidates from the model fitted before
the label period, labels and features from the right periods (no leakage)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from recsys_spark import tables as tb
from recsys_spark.models.twostage import (
    COLD,
    LABEL,
    TwoStageParams,
    TwoStageRecommender,
    cold_rows_with_prior,
    feature_names,
)

pytestmark = pytest.mark.spark

DAY0 = dt.datetime(2026, 1, 1)
LATE = 8  # in every user's label period, never before it: a model fitted on all train would rank it first


def _train(spark):
    """Users 0..5: early items 0, 1, 2 (days 1-3) and item 3 for user 0 (day 4); label period (the last
    two items, days 10-11): item LATE for everyone, item 3 for users 1..5."""
    rows = []
    for user in range(6):
        for day, item in enumerate([0, 1, 2], start=1):
            rows.append((user, item, 1.0, DAY0 + dt.timedelta(days=day)))
        if user == 0:
            rows.append((user, 3, 1.0, DAY0 + dt.timedelta(days=4)))
            rows.append((user, 4, 1.0, DAY0 + dt.timedelta(days=10)))
        else:
            rows.append((user, 3, 1.0, DAY0 + dt.timedelta(days=10)))
        rows.append((user, LATE, 1.0, DAY0 + dt.timedelta(days=11)))
    return spark.createDataFrame(rows, f"{tb.USER_IDX} int, {tb.ITEM_IDX} int, {tb.WEIGHT} float, "
                                       f"{tb.LAST_TS} timestamp")


def test_candidates_come_from_before_and_labels_from_the_label_period(spark):
    params = TwoStageParams(candidates="popularity", candidates_k=10, label_items=2, cold_share=0.0)
    rows, x, history = TwoStageRecommender(params).training_examples(_train(spark))
    # The candidate model saw the early part only: the label-period item is no candidate, and a user's
    # early items are filtered (user 0 already has item 3).
    assert set(rows[tb.ITEM_IDX]) == {3}
    assert set(rows[tb.USER_IDX]) == {1, 2, 3, 4, 5}
    # Labels: item 3 is in the label period of users 1..5.
    assert (rows[LABEL] == 1).all()
    # Features from the early part: item 3 had one user (user 0) before the label period, not six.
    names, _ = feature_names(history)
    assert np.allclose(x[:, names.index("item_log_users")], np.log1p(1.0))
    assert np.allclose(x[:, names.index("user_log_items")], np.log1p(3.0))


def test_a_candidate_outside_the_label_period_is_labelled_0(spark):
    params = TwoStageParams(candidates="popularity", candidates_k=10, label_items=1, cold_share=0.0)
    rows, _, _ = TwoStageRecommender(params).training_examples(_train(spark))
    # With one label item (LATE), item 3 moves to users 1..5's early part and item 4 to user 0's: the
    # candidates are the early items each user lacks, none of them LATE, so no label is 1.
    assert LATE not in set(rows[tb.ITEM_IDX]) and len(rows) > 0
    assert (rows[LABEL] == 0).all()


def test_an_unregistered_candidate_model_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown candidate model 'nope'"):
        TwoStageParams(candidates="nope")


def test_co_occurrence_features_read_the_users_latest_items_in_time_order():
    """The features that carry order into the ranker, on a hand-checked history: user 0 took items 0, 1, 2
    in that order, user 1 took 0 then 1, user 2 took 1, 2, 3; the candidate is item 3 for user 0."""
    import pandas as pd

    from recsys_spark.models.twostage import History, T

    rows = pd.DataFrame({tb.USER_IDX: [0, 0, 0, 1, 1, 2, 2, 2], tb.ITEM_IDX: [2, 0, 1, 0, 1, 1, 2, 3],
                         T: [3, 1, 2, 1, 2, 1, 2, 3]})  # user 0's rows out of time order on purpose
    none = np.zeros((1, 0), dtype=np.int64)
    history = History(rows, none, none)
    # cosine(a, b) = users of both / sqrt(users of a x users of b); item 3 was taken with 1 and 2 only
    cos_13, cos_23 = 1 / np.sqrt(3 * 1), 1 / np.sqrt(2 * 1)
    # follows: 3 came 1 step after 2 and 2 steps after 1 in user 2's history, never after 0
    got = history.co_occurrence(np.array([0, 7]), np.array([3, 3]))
    np.testing.assert_allclose(got[0], [(0 + cos_13 + cos_23) / 3, (0 + cos_13 + cos_23) / 3, cos_23,
                                        np.log1p(2), np.log1p(1)])
    assert np.isnan(got[1]).all()  # a user without history has no such features


def test_only_cold_users_candidates_get_the_popularity_prior_over_their_own_candidates():
    cands = pd.DataFrame({tb.USER_IDX: [0, 0, 0, 1, 1, 1, 2, 2], tb.ITEM_IDX: [0, 1, 2, 0, 1, 2, 1, 2],
                          COLD: [False] * 3 + [True] * 5})
    ranker = np.array([3.0, 2.0, 1.0, 3.0, 2.0, 1.0, 5.0, -5.0])  # the reverse of popularity's order
    counts = np.array([1.0, 10.0, 100.0])
    assert cold_rows_with_prior(cands, ranker, counts, None) is ranker
    out = cold_rows_with_prior(cands, ranker, counts, 0.1)
    assert (out[:3] == ranker[:3]).all()  # a warm user's rows as the ranker scored them
    z = np.array([1.0, 0.0, -1.0]) / np.std([1.0, 0.0, -1.0])
    assert np.allclose(out[3:6], np.log1p(counts) + 0.1 * z)
    assert np.allclose(out[6:], np.log1p(counts[1:]) + 0.1 * np.array([1.0, -1.0]))  # z over its 2 candidates
    assert out[5] > out[4] > out[3]  # a small weight: popularity's order
