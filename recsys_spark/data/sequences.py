"""Per-user item sequences and inactivity-gap sessions, and sessions as fixed-length item arrays (the
inputs of the sequence models)."""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.tables import require_columns

_ITEMS = "_items"


def user_sequences(train: DataFrame, max_length: int) -> DataFrame:
    """Each user's train items in time order (first interaction; ties in id order), the last
    ``max_length`` kept, left-padded with ``PAD_IDX`` to exactly ``max_length``.

    Columns: user_idx, items (array<int>, length max_length), length (real items, <= max_length).
    """
    seqs = _histories(train)
    items = F.col(_ITEMS)
    n = F.size(items)
    tail = F.slice(items, F.greatest(n - max_length + 1, F.lit(1)), max_length)
    padded = F.concat(F.array_repeat(F.lit(tb.PAD_IDX), F.greatest(max_length - n, F.lit(0))), tail)
    return seqs.select(
        tb.USER_IDX,
        padded.cast("array<int>").alias(tb.ITEMS),
        F.least(n, F.lit(max_length)).cast("int").alias(tb.LENGTH),
    )


def _histories(train: DataFrame) -> DataFrame:
    """(user_idx, _items): each user's train items in time order (first interaction; ties in id order)."""
    ordered = F.sort_array(F.collect_list(F.struct(tb.FIRST_TS, tb.item_tie(train).alias("_tie"), tb.ITEM_IDX)))
    return train.groupBy(tb.USER_IDX).agg(F.transform(ordered, lambda p: p[tb.ITEM_IDX]).alias(_ITEMS))


def user_histories(train: DataFrame) -> DataFrame:
    """(user_idx, items array<int>): each user's whole train history in time order (first interaction;
    ties in id order), unpadded: the "sentences" of item2vec."""
    return _histories(train).select(tb.USER_IDX, F.col(_ITEMS).cast("array<int>").alias(tb.ITEMS))


def user_windows(train: DataFrame, max_length: int) -> DataFrame:
    """Every transition of each user's train history as training rows: :func:`windows` of the
    time-ordered history (first interaction; ties in id order). Columns: user_idx, items, length."""
    return windows(_histories(train), tb.USER_IDX, max_length)


def windows(histories: DataFrame, key: str, max_length: int) -> DataFrame:
    """``histories`` (key, ``_items``: each key's items in order) as training rows: windows of
    ``max_length`` items cut from the end, each overlapping the next by one item, so that each (item, next
    item) pair is in exactly one window; windows are left-padded with ``PAD_IDX``.

    A history of n items gives ceil((n - 1) / (max_length - 1)) windows (one for n <= max_length, then
    the same row as ``user_sequences``). Columns: key, items (array<int>, length max_length), length.
    """
    items = F.col(_ITEMS)
    n = F.size(items)
    ends = F.sequence(n, F.lit(2), F.lit(-(max_length - 1)))  # 1-based end of each window, the last first
    cut = histories.filter(n >= 1).select(key, _ITEMS, F.explode(F.when(n >= 2, ends).otherwise(F.array(n)))
                                          .alias("_end"))
    start = F.greatest(F.col("_end") - max_length + 1, F.lit(1))
    length = F.col("_end") - start + 1
    padded = F.concat(F.array_repeat(F.lit(tb.PAD_IDX), max_length - length), F.slice(items, start, length))
    return cut.select(key, padded.cast("array<int>").alias(tb.ITEMS), length.cast("int").alias(tb.LENGTH))


def session_windows(sessions: DataFrame, max_length: int) -> DataFrame:
    """Every transition of every session of ``silver/sessions`` rows (session_id, item_idx, position) as
    :func:`windows`, left-padded. Columns: session_id, items, length."""
    require_columns(sessions, [tb.SESSION_ID, tb.ITEM_IDX, tb.POSITION], "sessions")
    ordered = F.sort_array(F.collect_list(F.struct(tb.POSITION, tb.ITEM_IDX)))
    histories = sessions.groupBy(tb.SESSION_ID).agg(F.transform(ordered, lambda p: p[tb.ITEM_IDX]).alias(_ITEMS))
    return windows(histories, tb.SESSION_ID, max_length)


def sessions(indexed_events: DataFrame, gap_minutes: float) -> DataFrame:
    """Events cut into sessions: a new session starts after ``gap_minutes`` of inactivity, or when the
    source's own session id changes.

    Columns: session_id (``<user_idx>-<n>``), user_idx, item_idx, event_time, position (0-based).
    """
    key = F.coalesce(F.col(tb.SESSION_ID), F.lit(""))
    by_user = Window.partitionBy(tb.USER_IDX).orderBy(tb.EVENT_TIME, tb.item_tie(indexed_events))
    so_far = by_user.rowsBetween(Window.unboundedPreceding, 0)
    previous_time = F.lag(tb.EVENT_TIME).over(by_user)
    previous_key = F.lag(key).over(by_user)
    starts = (
        previous_time.isNull()
        | ((F.unix_timestamp(tb.EVENT_TIME) - F.unix_timestamp(previous_time)) > gap_minutes * 60)
        | (key != previous_key)
    )
    # One sort per user serves all: a session is a run of the user's time order, so an event's position
    # is its row number among the user's events less the row number where its session starts.
    row = F.row_number().over(by_user)
    numbered = (
        indexed_events.withColumn("_start", starts.cast("int"))
        .withColumn("_row", row)
        .withColumn("_n", F.sum("_start").over(so_far))
        .withColumn("_first", F.max(F.when(F.col("_start") == 1, F.col("_row"))).over(so_far))
    )
    return numbered.select(
        F.concat_ws("-", F.col(tb.USER_IDX).cast("string"), F.col("_n")).alias(tb.SESSION_ID),
        tb.USER_IDX, tb.ITEM_IDX, tb.EVENT_TIME,
        (F.col("_row") - F.col("_first")).alias("position"),
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
