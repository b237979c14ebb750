"""Events -> implicit feedback: a weight per event type, optional time decay, one row per (user, item),
and minimum-activity filters iterated until no user or item falls below its threshold."""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.config import InteractionsConfig

log = logging.getLogger(__name__)


def weighted_events(events: DataFrame, config: InteractionsConfig) -> DataFrame:
    """Each event with its ``weight``: the event type's weight, decayed by age when a half-life is set.

    Event types absent from ``event_weights`` or weighted 0 are dropped here.
    """
    weights = F.create_map(*[F.lit(x) for pair in config.event_weights.items() for x in pair])
    weight = F.coalesce(weights[F.col(tb.EVENT_TYPE)], F.lit(0.0))
    if config.half_life_days:
        newest = events.agg(F.max(tb.EVENT_TIME)).first()[0]
        age_days = (F.unix_timestamp(F.lit(newest)) - F.unix_timestamp(tb.EVENT_TIME)) / 86400.0
        weight = weight * F.pow(F.lit(0.5), age_days / config.half_life_days)
    return events.withColumn(tb.WEIGHT, weight).filter(F.col(tb.WEIGHT) > 0)


def aggregate(events: DataFrame, user_col: str = tb.USER_ID, item_col: str = tb.ITEM_ID) -> DataFrame:
    """One row per (user, item): summed weight, event count, first and last event time."""
    return events.groupBy(user_col, item_col).agg(
        F.sum(tb.WEIGHT).alias(tb.WEIGHT),
        F.count(F.lit(1)).alias(tb.N_EVENTS),
        F.min(tb.EVENT_TIME).alias(tb.FIRST_TS),
        F.max(tb.EVENT_TIME).alias(tb.LAST_TS),
    )


def filter_min_activity(pairs: DataFrame, min_user: int, min_item: int, max_rounds: int,
                        user_col: str = tb.USER_ID, item_col: str = tb.ITEM_ID) -> DataFrame:
    """Drop users with fewer than ``min_user`` items and items with fewer than ``min_item`` users,
    repeatedly, until a round removes nothing (a k-core), or ``max_rounds`` is reached."""
    if min_user <= 1 and min_item <= 1:
        return pairs
    current = pairs.localCheckpoint()
    n = current.count()
    for round_ in range(1, max_rounds + 1):
        users = current.groupBy(user_col).count().filter(F.col("count") >= min_user).select(user_col)
        items = current.groupBy(item_col).count().filter(F.col("count") >= min_item).select(item_col)
        kept = current.join(users, user_col, "left_semi").join(items, item_col, "left_semi").localCheckpoint()
        n_kept = kept.count()
        log.info("activity filter round %d: %d -> %d pairs", round_, n, n_kept)
        current, done = kept, n_kept == n
        n = n_kept
        if done:
            break
    else:
        log.warning("activity filter did not converge in %d rounds; raise max_filter_rounds", max_rounds)
    return current
