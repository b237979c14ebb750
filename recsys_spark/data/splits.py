"""Train/test splits of the evaluation protocol (docs/ARCHITECTURE.md): leave-last-out per user, and one
global time cut.

Both return (train, test) frames of indexed interactions; test items are always absent from the same
user's train part, since the evaluator filters seen items.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from itertools import accumulate

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.data.interactions import aggregate
from recsys_spark.errors import RecsysError

SECONDS_PER_DAY = 86_400

LEAVE_LAST_OUT = "leave_last_out"
TEMPORAL = "temporal"


def leave_last_out(interactions: DataFrame) -> tuple[DataFrame, DataFrame]:
    """Each user's most recent item is the test item; at one timestamp, the one last in id order
    (``tables.item_tie``: "10" after "9").

    Users with a single item stay whole in train: holding it out would leave nothing to learn from.
    """
    by_user = Window.partitionBy(tb.USER_IDX)
    latest = Window.partitionBy(tb.USER_IDX).orderBy(F.desc(tb.LAST_TS), tb.item_tie(interactions).desc())
    ranked = (
        interactions.withColumn("_n", F.count(F.lit(1)).over(by_user))
        .withColumn("_pos", F.row_number().over(latest))
    )
    is_test = (F.col("_pos") == 1) & (F.col("_n") >= 2)
    train = ranked.filter(~is_test).drop("_n", "_pos")
    test = ranked.filter(is_test).drop("_n", "_pos")
    return train, test


def temporal_cutoff(events: DataFrame, test_fraction: float) -> int:
    """The earliest second (epoch) at or before which at least (1 - test_fraction) of the events fall.

    Exact, so a rerun on the same events draws the same cut: ``approxQuantile`` is not (its answer
    depends on the order in which partitions merge, and a rerun once moved the cut). Events are counted
    per day, then per second within the day that holds the cut, so the driver collects a few hundred
    day counts and at most 86,400 second counts whatever the number of events.
    """
    t = F.unix_timestamp(tb.EVENT_TIME)
    day = F.floor(t / SECONDS_PER_DAY)
    times = events.filter(t.isNotNull())
    per_day = sorted(tuple(row) for row in times.groupBy(day.alias("day")).count().collect())
    if not per_day:
        raise RecsysError("the temporal split needs events, and there are none")
    target = max(1, math.ceil((1.0 - test_fraction) * sum(count for _, count in per_day)))
    up_to_day = list(accumulate(count for _, count in per_day))
    i = bisect_left(up_to_day, target)
    before_day = up_to_day[i] - per_day[i][1]
    per_second = sorted(tuple(row) for row in
                        times.filter(day == per_day[i][0]).groupBy(t.alias("t")).count().collect())
    up_to_second = list(accumulate(count for _, count in per_second))
    return int(per_second[bisect_left(up_to_second, target - before_day)][0])


def temporal(indexed_events: DataFrame, test_fraction: float) -> tuple[DataFrame, DataFrame]:
    """Events up to one global cut train; later (user, item) pairs of known users and items test.

    Test pairs the user already had before the cut are dropped (the evaluator filters seen items), and
    so are users and items that never appear before the cut: no model can rank them.
    """
    cut = temporal_cutoff(indexed_events, test_fraction)
    before = F.unix_timestamp(tb.EVENT_TIME) <= F.lit(cut)
    train = aggregate(indexed_events.filter(before), tb.USER_IDX, tb.ITEM_IDX)
    later = aggregate(indexed_events.filter(~before), tb.USER_IDX, tb.ITEM_IDX)
    test = (
        later.join(train.select(tb.USER_IDX).distinct(), tb.USER_IDX, "left_semi")
        .join(train.select(tb.ITEM_IDX).distinct(), tb.ITEM_IDX, "left_semi")
        .join(train.select(tb.USER_IDX, tb.ITEM_IDX), [tb.USER_IDX, tb.ITEM_IDX], "left_anti")
    )
    return train, test


def training_events(events: DataFrame, users_index: DataFrame, train: DataFrame, test: DataFrame,
                    split: str) -> DataFrame:
    """The raw events a model trained on ``split`` may learn from.

    Features built from every event (activity counts, recency, item popularity) would tell a model about
    the test period it is scored on. ``temporal``: the events at or before the latest train interaction
    (the global cut). ``leave_last_out``: each user's events before the first event on their test item;
    users without a test item keep all of theirs. ``train``/``test`` are that split's rows.
    """
    if split == TEMPORAL:
        cut = train.agg(F.max(tb.LAST_TS)).first()[0]
        return events if cut is None else events.filter(F.col(tb.EVENT_TIME) <= F.lit(cut))
    if split != LEAVE_LAST_OUT:
        raise ValueError(f"unknown split {split!r}; known: {LEAVE_LAST_OUT}, {TEMPORAL}")
    cuts = test.join(users_index, tb.USER_IDX).groupBy(tb.USER_ID).agg(F.min(tb.FIRST_TS).alias("_cut"))
    return (events.join(cuts, tb.USER_ID, "left")
            .filter(F.col("_cut").isNull() | (F.col(tb.EVENT_TIME) < F.col("_cut"))).drop("_cut"))


def session_periods(sessions: DataFrame, test_fraction: float) -> tuple[DataFrame, DataFrame]:
    """(train, test) rows of ``silver/sessions`` around the temporal split's cut: test sessions start after
    it, train sessions end at or before it; sessions that straddle the cut are in neither.

    The cut is the temporal split's (``test_fraction`` of the events after it), recomputed from the
    sessions, which hold the same indexed events.
    """
    cut = temporal_cutoff(sessions, test_fraction)
    seconds = F.unix_timestamp(tb.EVENT_TIME)
    bounds = sessions.groupBy(tb.SESSION_ID).agg(F.min(seconds).alias("_start"), F.max(seconds).alias("_end"))
    train = sessions.join(bounds.filter(F.col("_end") <= F.lit(cut)).select(tb.SESSION_ID), tb.SESSION_ID,
                          "left_semi")
    test = sessions.join(bounds.filter(F.col("_start") > F.lit(cut)).select(tb.SESSION_ID), tb.SESSION_ID,
                         "left_semi")
    return train, test
