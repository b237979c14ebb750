"""Per-user item sequences and inactivity-gap sessions, and sessions as fixed-length item arrays (the
inputs of the sequence models)."""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.tables import require_columns


def user_sequences(train: DataFrame, max_length: int) -> DataFrame:
    """Each user's train items in time order (first interaction), the last ``max_length`` kept,
    left-padded with ``PAD_IDX`` to exactly ``max_length``.

    Columns: user_idx, items (array<int>, length max_length), length (real items, <= max_length).
    """
    ordered = F.sort_array(F.collect_list(F.struct(tb.FIRST_TS, tb.ITEM_IDX)))
    seqs = train.groupBy(tb.USER_IDX).agg(ordered.alias("_pairs"))
    items = F.transform("_pairs", lambda p: p[tb.ITEM_IDX])
    n = F.size(items)
    tail = F.slice(items, F.greatest(n - max_length + 1, F.lit(1)), max_length)
    padded = F.concat(F.array_repeat(F.lit(tb.PAD_IDX), F.greatest(max_length - n, F.lit(0))), tail)
    return seqs.select(
        tb.USER_IDX,
        padded.cast("array<int>").alias(tb.ITEMS),
        F.least(n, F.lit(max_length)).cast("int").alias(tb.LENGTH),
    )


def sessions(indexed_events: DataFrame, gap_minutes: float) -> DataFrame:
    """Events cut into sessions: a new session starts after ``gap_minutes`` of inactivity, or when the
    source's own session id changes.

    Columns: session_id (``<user_idx>-<n>``), user_idx, item_idx, event_time, position (0-based).
    """
    key = F.coalesce(F.col(tb.SESSION_ID), F.lit(""))
    by_user = Window.partitionBy(tb.USER_IDX).orderBy(tb.EVENT_TIME, tb.ITEM_IDX)
    previous_time = F.lag(tb.EVENT_TIME).over(by_user)
    previous_key = F.lag(key).over(by_user)
    starts = (
        previous_time.isNull()
        | ((F.unix_timestamp(tb.EVENT_TIME) - F.unix_timestamp(previous_time)) > gap_minutes * 60)
        | (key != previous_key)
    )
    numbered = (
        indexed_events.withColumn("_start", starts.cast("int"))
        .withColumn("_n", F.sum("_start").over(by_user.rowsBetween(Window.unboundedPreceding, 0)))
        .withColumn(tb.SESSION_ID, F.concat_ws("-", F.col(tb.USER_IDX).cast("string"), F.col("_n")))
    )
    in_session = Window.partitionBy(tb.SESSION_ID).orderBy(tb.EVENT_TIME, tb.ITEM_IDX)
    return numbered.select(
        tb.SESSION_ID, tb.USER_IDX, tb.ITEM_IDX, tb.EVENT_TIME,
        (F.row_number().over(in_session) - 1).alias("position"),
    )


def session_item_arrays(sessions: DataFrame, min_length: int = 2, max_length: int | None = None) -> DataFrame:
    """``silver/sessions`` rows -> one row per session: (session_id, items array<int> in position order,
    length). Sessions shorter than ``min_length`` are dropped. With ``max_length``, the last
    ``max_length`` items are kept and ``items`` is right-padded with PAD to exactly that length (a fixed-
    length column for Petastorm: a session model's training rows)."""
    require_columns(sessions, [tb.SESSION_ID, tb.ITEM_IDX, tb.POSITION], "sessions")
    ordered = F.sort_array(F.collect_list(F.struct(tb.POSITION, tb.ITEM_IDX)))
    lists = sessions.groupBy(tb.SESSION_ID).agg(F.transform(ordered, lambda p: p[tb.ITEM_IDX]).alias(tb.ITEMS))
    n = F.size(tb.ITEMS)
    lists = lists.filter(n >= min_length)
    items = F.col(tb.ITEMS)
    if max_length is not None:
        tail = F.slice(items, F.greatest(n - max_length + 1, F.lit(1)), max_length)
        items = F.concat(tail, F.array_repeat(F.lit(tb.PAD_IDX), F.greatest(max_length - n, F.lit(0))))
    return lists.select(tb.SESSION_ID, items.cast("array<int>").alias(tb.ITEMS),
                        (F.least(n, F.lit(max_length)) if max_length else n).cast("int").alias(tb.LENGTH))
