"""Validation and quarantine of raw events, and their idempotent merge into ``bronze/events``.

Every input row ends in exactly one place: accepted into ``bronze/events``, quarantined in
``bronze/events_rejected`` with the first reason it failed, or skipped as a duplicate of an event
already accepted. ``rows_read == accepted + rejected + duplicates`` holds for every run.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.config import IngestConfig
from recsys_spark.data import sources
from recsys_spark.data.sources import MALFORMED, RAW, SOURCE, Preset, source_column

log = logging.getLogger(__name__)

REASON = "reason"
N_ROWS = "n_rows"
REJECT_ID = "reject_id"
INGESTED_AT = "ingested_at"

# Source vocabularies mapped onto the canonical event types.
EVENT_TYPE_SYNONYMS = {
    "view": "view", "pv": "view", "click": "view", "clicks": "view", "detail": "view",
    "cart": "cart", "carts": "cart", "addtocart": "cart", "add_to_cart": "cart",
    "fav": "fav", "favorite": "fav", "wishlist": "fav",
    "purchase": "purchase", "buy": "purchase", "transaction": "purchase", "order": "purchase",
    "orders": "purchase",
    "rating": "rating",
    "remove": "remove", "remove_from_cart": "remove",
}

_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"


@dataclass
class IngestSummary:
    source: str
    preset: str
    rows_read: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def balanced(self) -> bool:
        return self.rows_read == self.accepted + self.rejected_total + self.duplicates

    def lines(self) -> list[str]:
        out = [
            f"ingest {self.source} (preset {self.preset})",
            f"  rows read           {self.rows_read:>12,}",
            f"  accepted (new)      {self.accepted:>12,}",
            f"  duplicates skipped  {self.duplicates:>12,}",
            f"  rejected            {self.rejected_total:>12,}",
        ]
        out += [f"    {reason:<26}{n:>10,}" for reason, n in sorted(self.rejected.items())]
        return out


def _blank(col: Column) -> Column:
    return col.isNull() | (F.trim(col) == "")


def parse_time(raw: Column, unit: str) -> Column:
    """Event time from epoch seconds/milliseconds or an ISO-8601 string; null when unparseable."""
    text = F.trim(raw)
    number = text.cast("double")
    iso = F.regexp_replace(text, r"\s*UTC$", "").cast("timestamp")
    if unit == "s":
        return F.when(text.rlike(_NUMBER), F.timestamp_seconds(number))
    if unit == "ms":
        return F.when(text.rlike(_NUMBER), F.timestamp_millis(number.cast("long")))
    if unit == "iso":
        return iso
    # auto: numbers above 1e11 are milliseconds (1e11 s is the year 5138)
    return (
        F.when(text.rlike(_NUMBER) & (F.abs(number) > 1e11), F.timestamp_millis(number.cast("long")))
        .when(text.rlike(_NUMBER), F.timestamp_seconds(number))
        .otherwise(iso)
    )


def utf8_checked(text: Column) -> Column:
    """The text with undecodable bytes replaced by U+FFFD (the JVM keeps raw bytes until decoded)."""
    return F.decode(F.encode(text, "UTF-8"), "UTF-8")


def canonical_type(raw: Column) -> Column:
    key = F.lower(F.trim(raw))
    mapping = F.create_map(*[F.lit(x) for pair in EVENT_TYPE_SYNONYMS.items() for x in pair])
    return mapping[key]


def validate(raw: DataFrame, preset: Preset, config: IngestConfig, now: dt.datetime) -> DataFrame:
    """Canonical columns plus ``reason`` (null for a valid row) for every raw row; ``_raw`` (the row's
    original text) on rejected rows only, null on valid ones, which are cached without it."""
    col = lambda name: source_column(raw, name)  # noqa: E731
    user, item, time_raw = F.trim(col(preset.user)), F.trim(col(preset.item)), col(preset.time)
    type_raw = col(preset.event_type) if preset.event_type else F.lit(preset.default_event_type)
    value_raw, price_raw = F.trim(col(preset.value)), F.trim(col(preset.price))
    event_time = parse_time(time_raw, preset.time_unit)
    if preset.time_offset_ms:
        event_time = event_time + F.make_dt_interval(secs=col(preset.time_offset_ms).cast("double") / 1000)
    max_time = now + dt.timedelta(days=config.max_future_days)
    event_type = canonical_type(type_raw)

    # Undecodable bytes are looked for in the fields an event keeps, not in ``_raw``: for a table input
    # ``_raw`` is the whole row serialised (to_json), which only a rejected row needs.
    kept = F.concat_ws("\u001f", *[col(name) for name in preset.mapped().values() if name])
    reason = (
        F.when(F.col(MALFORMED).isNotNull(), F.col(MALFORMED))
        .when(utf8_checked(kept).contains("\ufffd"), F.lit("invalid_utf8"))
        .when(_blank(user), F.lit("missing_user_id"))
        .when(_blank(item), F.lit("missing_item_id"))
        .when(_blank(time_raw), F.lit("missing_event_time"))
        .when(event_time.isNull(), F.lit("unparseable_event_time"))
        .when((event_time < F.lit(config.min_event_time)) | (event_time > F.lit(max_time)),
              F.lit("event_time_out_of_range"))
        .when(_blank(type_raw), F.lit("missing_event_type"))
        .when(event_type.isNull(), F.lit("unknown_event_type"))
        .when(~_blank(value_raw) & ~value_raw.rlike(_NUMBER), F.lit("bad_value"))
        .when(~_blank(price_raw) & (~price_raw.rlike(_NUMBER) | (price_raw.cast("double") < 0)),
              F.lit("bad_price"))
    )
    session = F.trim(col(preset.session))
    category = F.trim(col(preset.category))
    checked = raw.select(
        F.col(RAW),
        F.col(SOURCE),
        reason.alias(REASON),
        user.alias(tb.USER_ID),
        item.alias(tb.ITEM_ID),
        event_type.alias(tb.EVENT_TYPE),
        event_time.alias(tb.EVENT_TIME),
        F.when(~_blank(session), session).alias(tb.SESSION_ID),
        value_raw.cast("double").alias(tb.VALUE),
        F.when(~_blank(category), category).alias(tb.CATEGORY),
        price_raw.cast("double").alias(tb.PRICE),
    )
    # A second projection, so that ``reason`` is computed once (the optimizer does not inline an
    # expression used twice): the raw text is kept for the quarantine only.
    return checked.withColumn(RAW, F.when(F.col(REASON).isNotNull(), utf8_checked(F.col(RAW))))


def event_id() -> Column:
    """Content hash of an event: the same event read twice, from one file or two, is one event."""
    parts = [
        F.col(tb.USER_ID), F.col(tb.ITEM_ID), F.col(tb.EVENT_TYPE),
        F.unix_micros(F.col(tb.EVENT_TIME)).cast("string"),
        F.coalesce(F.col(tb.SESSION_ID), F.lit("")),
        F.coalesce(F.col(tb.VALUE).cast("string"), F.lit("")),
    ]
    return F.substring(F.sha2(F.concat_ws("\u001f", *parts), 256), 1, 32)


def accepted_events(checked: DataFrame) -> DataFrame:
    """Valid rows in the bronze schema, unique on ``event_id``."""
    valid = checked.filter(F.col(REASON).isNull())
    return (
        valid.withColumn(tb.EVENT_ID, event_id())
        .withColumn(tb.EVENT_DATE, F.to_date(tb.EVENT_TIME))
        .withColumn(tb.SOURCE, F.col(SOURCE))
        .dropDuplicates([tb.EVENT_ID])
        .select(*tb.EVENTS_SCHEMA.fieldNames())
    )


def quarantined_rows(checked: DataFrame, ingested_at: dt.datetime) -> DataFrame:
    """Invalid rows with their raw text and reason; identical bad lines are counted in ``n_rows``."""
    return (
        checked.filter(F.col(REASON).isNotNull())
        .groupBy(F.col(SOURCE).alias(tb.SOURCE), F.col(RAW).alias("raw"), REASON)
        .agg(F.count(F.lit(1)).alias(N_ROWS))
        .withColumn(REJECT_ID, F.sha2(F.concat_ws("\u001f", tb.SOURCE, "raw", REASON), 256))
        .withColumn(INGESTED_AT, F.lit(ingested_at))
        .select(REJECT_ID, tb.SOURCE, REASON, "raw", N_ROWS, INGESTED_AT)
    )


def ingest(spark: SparkSession, path: str, preset_name: str, warehouse: str, config: IngestConfig,
           fmt: str | None = None, sep: str | None = None) -> IngestSummary:
    """Read ``path`` with a preset, quarantine bad rows, merge new events into ``bronze/events``."""
    preset = sources.resolve_preset(preset_name, path)
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    raw = sources.read_raw(spark, path, preset, fmt=fmt, sep=sep)
    checked = validate(raw, preset, config, now).persist()
    try:
        summary = IngestSummary(source=path, preset=preset.name)
        with sources.reading(path):  # the first pass over the whole file: where a corrupt archive shows
            counts = checked.groupBy(REASON).count().collect()
        for row in counts:
            summary.rows_read += row["count"]
            if row[REASON] is not None:
                summary.rejected[row[REASON]] = row["count"]
        valid_rows = summary.rows_read - summary.rejected_total
        if summary.rejected:
            tb.insert_new(quarantined_rows(checked, now), warehouse, tb.BRONZE_REJECTED, key=REJECT_ID)
        if valid_rows:
            summary.accepted = tb.insert_new(
                accepted_events(checked), warehouse, tb.BRONZE_EVENTS, key=tb.EVENT_ID,
                partition_by=[tb.EVENT_DATE],
            )
        summary.duplicates = valid_rows - summary.accepted
    finally:
        checked.unpersist()
    if not summary.balanced():  # pragma: no cover - a broken invariant is a bug, never user error
        raise AssertionError(f"row accounting does not balance: {summary}")
    return summary
