"""Serving a model's recommendations to users: the popularity fallback for users the model cannot score,
and the way back from indices to the original ids. Used by the pipeline's recommend step.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyspark.sql import DataFrame

from recsys_spark import tables as tb
from recsys_spark.models.base import Recommender
from recsys_spark.tables import require_columns


def recommend_with_fallback(model: Recommender, users: DataFrame, k: int, seen: DataFrame | None = None,
                            exclude_items: Sequence[int] = (),
                            popularity_model: Recommender | None = None) -> DataFrame:
    """``model``'s recommendations for the users it knows, ``popularity_model``'s for the others.

    Without a popularity model, or for a model that scores every user (``known_users()`` is None), this
    is ``model.recommend``: unknown users then simply get no rows.
    """
    known = model.known_users()
    if popularity_model is None or known is None:
        return model.recommend(users, k, seen, list(exclude_items))
    require_columns(users, [tb.USER_IDX], "users")
    users = users.select(tb.USER_IDX).distinct()
    warm = users.join(known.select(tb.USER_IDX), tb.USER_IDX, "left_semi")
    cold = users.join(known.select(tb.USER_IDX), tb.USER_IDX, "left_anti")
    recs = model.recommend(warm, k, seen, list(exclude_items))
    return recs.unionByName(popularity_model.recommend(cold, k, seen, list(exclude_items)))


def to_original_ids(recs: DataFrame, user_index: DataFrame, item_index: DataFrame) -> DataFrame:
    """(user_idx, item_idx, score, rank) -> (user_id, item_id, score, rank) through the index tables."""
    require_columns(recs, [tb.USER_IDX, tb.ITEM_IDX, tb.SCORE, tb.RANK], "recommendations")
    require_columns(user_index, [tb.USER_ID, tb.USER_IDX], "user index")
    require_columns(item_index, [tb.ITEM_ID, tb.ITEM_IDX], "item index")
    return (
        recs.join(user_index.select(tb.USER_ID, tb.USER_IDX), tb.USER_IDX)
        .join(item_index.select(tb.ITEM_ID, tb.ITEM_IDX), tb.ITEM_IDX)
        .select(tb.USER_ID, tb.ITEM_ID, tb.SCORE, tb.RANK)
    )


