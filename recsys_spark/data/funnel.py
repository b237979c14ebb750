""""Seen but not bought": the items each user viewed but never carted or purchased, from the funnel of
``bronze/events``, as per-user candidate lists for negative sampling (NCF's ``negatives: funnel``).

Which event types count as a view and which as a conversion is the caller's (``viewed``, ``bought``;
canonical names of ``config.EVENT_TYPES``). Only events up to each user's latest train interaction are
read, so a conversion that happens in the test period never shapes the negatives.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.config import EVENT_TYPES
from recsys_spark.errors import RecsysError
from recsys_spark.tables import require_columns

log = logging.getLogger(__name__)

_CUT = "_cut"


def viewed_not_bought(events: DataFrame, user_index: DataFrame, item_index: DataFrame, train: DataFrame,
                      viewed: Sequence[str] = ("view",), bought: Sequence[str] = ("cart", "purchase"),
                      max_per_user: int = 200) -> DataFrame:
    """(user_idx, items array<int>): per train user, the items with a ``viewed`` event and no ``bought``
    event up to the user's latest train ``last_ts``, the most recently viewed first, at most
    ``max_per_user``. Users without such items have no row. Items outside the index are dropped."""
    unknown = sorted((set(viewed) | set(bought)) - set(EVENT_TYPES))
    if unknown or not viewed or not bought or set(viewed) & set(bought):
        raise RecsysError(f"funnel event types must be non-empty, disjoint and among {list(EVENT_TYPES)}: "
                          f"viewed={list(viewed)}, bought={list(bought)}")
    require_columns(events, [tb.USER_ID, tb.ITEM_ID, tb.EVENT_TYPE, tb.EVENT_TIME], "events")
    require_columns(train, [tb.USER_IDX, tb.LAST_TS], "train rows")
    cut = train.groupBy(tb.USER_IDX).agg(F.max(tb.LAST_TS).alias(_CUT))
    rows = (events.join(user_index.select(tb.USER_ID, tb.USER_IDX), tb.USER_ID)
            .join(item_index.select(tb.ITEM_ID, tb.ITEM_IDX), tb.ITEM_ID)
            .join(cut, tb.USER_IDX)
            .filter(F.col(tb.EVENT_TIME) <= F.col(_CUT)))
    is_view, is_bought = F.col(tb.EVENT_TYPE).isin(list(viewed)), F.col(tb.EVENT_TYPE).isin(list(bought))
    pairs = (rows.groupBy(tb.USER_IDX, tb.ITEM_IDX)
             .agg(F.max(F.when(is_view, F.col(tb.EVENT_TIME))).alias("_viewed"),
                  F.max(is_bought.cast("int")).alias("_bought"))
             .filter(F.col("_viewed").isNotNull() & (F.col("_bought") == 0)))
    latest = Window.partitionBy(tb.USER_IDX).orderBy(F.desc("_viewed"), tb.ITEM_IDX)
    kept = pairs.withColumn("_pos", F.row_number().over(latest)).filter(F.col("_pos") <= max_per_user)
    ordered = F.sort_array(F.collect_list(F.struct("_pos", F.col(tb.ITEM_IDX).cast("int").alias("i"))))
    return kept.groupBy(tb.USER_IDX).agg(F.transform(ordered, lambda s: s["i"]).alias(tb.ITEMS))


def candidate_matrix(lists: DataFrame, n_users: int) -> np.ndarray:
    """Per-user lists (user_idx, items) collected to the driver as [n_users, m] int64, each row its items
    then ``PAD_IDX`` (m: the longest list, at least 1): the padded tensor a training task samples from.
    Users past ``n_users`` are dropped."""
    pdf = lists.filter(F.col(tb.USER_IDX) < n_users).select(tb.USER_IDX, tb.ITEMS).toPandas()
    width = max([1, *(len(x) for x in pdf[tb.ITEMS])])
    log.info("collecting %d users' candidate lists (%d x %d) to the driver", len(pdf), n_users, width)
    out = np.full((n_users, width), tb.PAD_IDX, dtype=np.int64)
    for user, items in zip(pdf[tb.USER_IDX], pdf[tb.ITEMS], strict=True):
        out[user, : len(items)] = items
    return out
