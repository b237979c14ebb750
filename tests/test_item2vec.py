"""item2vec on tiny corpora whose answers are known: items that share users are alike, recent items steer a
user's recommendations, and the session scorer reads a session the same way."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from recsys_spark import tables as tb
from recsys_spark.models.item2vec import Item2VecParams, Item2VecRecommender
from recsys_spark.scoring import collect_factors

pytestmark = pytest.mark.spark

DAY0 = dt.datetime(2024, 1, 1)
GROUPS = ([0, 1, 2, 3], [4, 5, 6, 7])  # items of group 1 are only ever seen together, and so are group 2's
TINY = {"vector_size": 8, "window": 3, "min_count": 1, "max_iter": 15, "seed": 3}
# Users 100.. carry the corpus; user 0 saw 0, 1, 2 first and 4, 5 lately.
PROBE = {0: [0, 1, 2, 4, 5]}


def histories(n_users: int = 40) -> dict[int, list[int]]:
    """Each corpus user reads one group 3 times in a shuffled order (a sentence of 12 items)."""
    rng = np.random.default_rng(0)
    return {100 + u: [int(i) for _ in range(3) for i in rng.permutation(GROUPS[u % 2])] for u in range(n_users)}


@pytest.fixture(scope="module")
def train(spark):
    rows = [(u, i, 1.0, DAY0 + dt.timedelta(days=t)) for u, items in {**histories(), **PROBE}.items()
            for t, i in enumerate(dict.fromkeys(items))]  # an item's first interaction orders the history
    return spark.createDataFrame(rows, f"{tb.USER_IDX} int, {tb.ITEM_IDX} int, {tb.WEIGHT} double, "
                                       f"{tb.FIRST_TS} timestamp").persist()


def unit_vectors(model) -> dict[int, np.ndarray]:
    ids, matrix = collect_factors(model.item_factors(), tb.ITEM_IDX)
    return {int(i): v / np.linalg.norm(v) for i, v in zip(ids, matrix, strict=True)}


def test_items_seen_together_are_similar_and_recent_items_steer_the_user(train):
    model = Item2VecRecommender(Item2VecParams(**TINY, recency_decay=0.3)).fit(train)
    unit = unit_vectors(model)
    within = [unit[a] @ unit[b] for g in GROUPS for a in g for b in g if a < b]
    across = [unit[a] @ unit[b] for a in GROUPS[0] for b in GROUPS[1]]
    assert min(within) > max(across)
    assert unit[0] @ unit[1] > unit[0] @ unit[4]
    similar = model.similar_items(3).toPandas()
    assert set(similar[similar[tb.ITEM_IDX] == 0][tb.SIMILAR_ITEM_IDX]) == {1, 2, 3}

    # equation (1): the normalised sum of unit item vectors weighted 0.3^(items since), latest first
    users = model.user_factors().toPandas().set_index(tb.USER_IDX)[tb.EMBEDDING]
    items = PROBE[0]
    expected = sum(0.3 ** (len(items) - 1 - t) * unit[i] for t, i in enumerate(items))
    np.testing.assert_allclose(users[0], expected / np.linalg.norm(expected), atol=1e-5)

    # user 0 lately moved to group 2: its unseen items (6, 7) come first although group 1 holds more of its items
    recs = model.recommend(train.sparkSession.createDataFrame([(0,)], f"{tb.USER_IDX} int"), 2, seen=train)
    assert set(recs.toPandas()[tb.ITEM_IDX]) == {6, 7}


def test_without_recency_the_bulk_of_the_history_wins(train):
    model = Item2VecRecommender(Item2VecParams(**TINY, recency_decay=1.0)).fit(train)
    recs = model.recommend(train.sparkSession.createDataFrame([(0,)], f"{tb.USER_IDX} int"), 1, seen=train)
    assert recs.toPandas()[tb.ITEM_IDX].tolist() == [3]  # the one unseen item of group 1 (3 of its 5 items)


def test_session_scorer_follows_the_session_and_saves(spark, tmp_path):
    rows = [(f"s{s}", s, i, p) for s, items in histories().items() for p, i in enumerate(items)]
    rows += [("rare", 99, 8, 0)]  # item 8 occurs once: below min_count, no vector
    sessions = spark.createDataFrame(rows, f"{tb.SESSION_ID} string, {tb.USER_IDX} int, {tb.ITEM_IDX} int, "
                                           f"{tb.POSITION} int")
    model = Item2VecRecommender(Item2VecParams(**{**TINY, "min_count": 2}, recency_decay=0.5))
    scorer = model.fit_session_scorer(sessions, n_items=10)
    score = scorer.start(3)
    first = score(np.array([0, 8, -1]), np.array([True, True, False]))  # [3, 10]
    assert first.shape == (3, 10)
    assert set(np.argsort(-first[0])[:4]) == set(GROUPS[0])  # after item 0: its own group first
    assert np.argsort(-first[1]).tolist()[:2] == [0, 1]  # nothing known yet: by popularity, ties by index
    assert first[0, 8] > first[0, 9] and first[0, 8] < first[0, :8].min()  # no vector (8, 9): last, by popularity
    second = score(np.array([4, 5, -1]), np.array([False, True, False]))
    assert set(np.argsort(-second[1])[:4]) == set(GROUPS[1])
    mixed = second[0]  # 0 then 4: the recent click leads, the older one still counts
    assert np.argmax(mixed) == 4 and mixed[1] > second[1][1]

    model.save(str(tmp_path / "m"))
    loaded = Item2VecRecommender.load(spark, str(tmp_path / "m"))
    assert loaded.known_users().count() == 0 and loaded.user_factors() is None
    pd.testing.assert_frame_equal(loaded.item_factors().toPandas().sort_values(tb.ITEM_IDX).reset_index(drop=True),
                                  model.item_factors().toPandas().sort_values(tb.ITEM_IDX).reset_index(drop=True))
