"""User, item and context feature tables for feature-aware models, built the same way at training and at
inference time (``recsys_spark.data.feature_spec`` turns them into a model's integer input).

Tables::

    bronze/events + silver/user_index + side users --> silver/user_features  (user_id, user_idx, <field>...)
    bronze/events + silver/item_index + side items --> silver/item_features  (item_id, item_idx, <field>...)
                                                   \\-> silver/feature_vocab  (field, value, index)

Every feature is categorical. A field's raw value is a string; ``silver/feature_vocab`` maps it to an int,
with **index 0 reserved for unknown or missing** values. The vocabulary is append-only, like the id
index tables: a build adds the values it has not seen before after the field's largest index and never
moves an existing one, so a model trained yesterday reads today's features with the same meaning. At
inference (``update_vocab=False``, or :func:`encode` with a saved :class:`Vocabulary`) a value the
vocabulary lacks maps to 0; so does a value whose index is past the cardinality a model was built with
(the feature networks clamp those to 0 themselves).

Numeric quantities are **bucketed with fixed edges** (documented at each ``*_EDGES`` constant), not
standardised: fixed edges need no statistics fitted on the training data, so the same function gives
the same bucket at training and inference; they are robust to the heavy tails of counts and prices; and
a bucket is just one more categorical value for the model's embeddings. Bucket labels are seeded into
the vocabulary in bucket order, so indices follow the order of the buckets.

Features, by where they come from:

- known before any activity (side files, e.g. MovieLens ``u.user``/``u.item`` through
  :func:`read_movielens_users`/:func:`read_movielens_items`, or any frame keyed by ``user_id``/``item_id``:
  every other column is a categorical field named after the column);
- growing with use (``bronze/events``): per user, the event count of each event type (log2 buckets),
  recency (days since the user's last event before the reference time, bucketed) and favourite category
  (the most frequent non-null category); per item, category (most frequent), price bucket (median
  price) and popularity bucket (distinct users, log2 buckets);
- of an event (:func:`context_features`): hour of day, day of week (UTC, the session time zone) and the
  event type.

Users present in a side file but absent from ``silver/user_index`` (no activity yet) are appended to the
index by :func:`build_features`: they are the cold-start users a feature model scores from their side
features alone. Side-only items keep a null ``item_idx`` (no model can recommend an item outside the
index). Features that grow with use are built from the events a model may see: the pipeline passes the
split's training period (``splits.training_events``), so no test-period activity leaks into training.

The vocabulary is small by construction (categorical values, not ids); :class:`Vocabulary` is its
in-memory form, collected once (logged) and used to encode with literal maps, no joins.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_spark import tables as tb
from recsys_spark.config import EVENT_TYPES
from recsys_spark.data import indexing
from recsys_spark.errors import RecsysError

log = logging.getLogger(__name__)

UNKNOWN = 0  # the index of a missing or unseen value in every field

# --- bucket edges (fixed, so training and inference agree without fitted statistics) -------------------

# Counts (events of a type per user, distinct users per item): "0", "1", "2-3", "4-7", ... "512+".
COUNT_EDGES = [2**k for k in range(10)]  # 1, 2, 4, ..., 512
# Days since the user's last event: < 1 day, 1-3, 3-7, 7-14, 14-30, 30-90, 90-180, 180-365, >= 365.
RECENCY_EDGES_DAYS = [1, 3, 7, 14, 30, 90, 180, 365]
NEVER = "never"  # recency of a user without events (a side-file user)
# Item price in the shop's currency, roughly log-spaced: < 1, 1-2, 2-5, 5-10, ..., >= 1000.
PRICE_EDGES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
# MovieLens-1M's age groups, applied to MovieLens-100K's exact ages.
AGE_EDGES = [18, 25, 35, 45, 50, 56]
AGE_LABELS = ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]

DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
# MovieLens u.genre, in the order of u.item's 19 flags.
MOVIELENS_GENRES = [
    "unknown", "action", "adventure", "animation", "childrens", "comedy", "crime", "documentary", "drama",
    "fantasy", "film_noir", "horror", "musical", "mystery", "romance", "sci_fi", "thriller", "war", "western",
]

ACTIVITY_FIELDS = [f"{tb.ACTIVITY_PREFIX}{t}" for t in EVENT_TYPES]
USER_EVENT_FIELDS = [*ACTIVITY_FIELDS, tb.RECENCY, tb.FAVOURITE_CATEGORY]
ITEM_EVENT_FIELDS = [tb.CATEGORY, tb.PRICE_BUCKET, tb.POPULARITY_BUCKET]
CONTEXT_FIELDS = [tb.HOUR_OF_DAY, tb.DAY_OF_WEEK, tb.EVENT_TYPE]

# Private working columns.
_ORDER = "_order"
_N = "_n"


def edge_labels(edges: Sequence[float], unit: str = "") -> list[str]:
    """Labels of the buckets ``(-inf, e0), [e0, e1), ..., [e_last, inf)``, e.g. ``<1``, ``1-2``, ``>=1000``."""
    fmt = lambda x: f"{x:g}{unit}"  # noqa: E731
    middle = [f"{fmt(a)}-{fmt(b)}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return [f"<{fmt(edges[0])}", *middle, f">={fmt(edges[-1])}"]


def count_labels() -> list[str]:
    """``0``, ``1``, ``2-3``, ``4-7``, ..., ``256-511``, ``512+``: the log2 buckets of a count."""
    labels = ["0"]
    for lo, hi in zip(COUNT_EDGES[:-1], COUNT_EDGES[1:], strict=True):
        labels.append(str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}")
    return [*labels, f"{COUNT_EDGES[-1]}+"]


RECENCY_LABELS = [*edge_labels(RECENCY_EDGES_DAYS, "d"), NEVER]
PRICE_LABELS = edge_labels(PRICE_EDGES)

# Fields whose values are known in advance: seeded into the vocabulary in this order.
DOMAINS: dict[str, list[str]] = {
    **{name: count_labels() for name in ACTIVITY_FIELDS},
    tb.RECENCY: RECENCY_LABELS,
    tb.PRICE_BUCKET: PRICE_LABELS,
    tb.POPULARITY_BUCKET: count_labels(),
    tb.AGE_BUCKET: AGE_LABELS,
    tb.HOUR_OF_DAY: [str(h) for h in range(24)],
    tb.DAY_OF_WEEK: DAYS,
    tb.EVENT_TYPE: list(EVENT_TYPES),
}


def bucket(value: Column, edges: Sequence[float], labels: Sequence[str]) -> Column:
    """The label of the bucket ``value`` falls in (``labels`` has ``len(edges) + 1`` entries); null stays null."""
    if len(labels) != len(edges) + 1:
        raise ValueError(f"{len(edges)} edges need {len(edges) + 1} labels, got {len(labels)}")
    out = F.lit(labels[-1])
    for edge, label in reversed(list(zip(edges, labels[:-1], strict=True))):
        out = F.when(value < F.lit(edge), F.lit(label)).otherwise(out)
    return F.when(value.isNull(), F.lit(None).cast("string")).otherwise(out)


def count_bucket(count: Column) -> Column:
    """Log2 bucket of a non-negative count (``count_labels``); null counts as 0."""
    n = F.coalesce(count, F.lit(0))
    return F.when(n <= 0, F.lit("0")).otherwise(bucket(n, COUNT_EDGES[1:], count_labels()[1:]))


# --- side files ----------------------------------------------------------------------------------------


def _read_pipe_separated(spark: SparkSession, path: str, columns: list[str]) -> DataFrame:
    schema = T.StructType([T.StructField(c, T.StringType(), True) for c in columns])
    return spark.read.csv(path, sep="|", schema=schema, encoding="ISO-8859-1", header=False, mode="PERMISSIVE")


def read_movielens_users(spark: SparkSession, path: str) -> DataFrame:
    """MovieLens-100K ``u.user`` (``user id | age | gender | occupation | zip code``) as side user features.

    Columns: user_id, age_bucket (MovieLens-1M's groups), gender, occupation, zip_region (the zip code's
    first character: the US postal region, or the letter of a Canadian code).
    """
    raw = _read_pipe_separated(spark, path, [tb.USER_ID, "age", tb.GENDER, tb.OCCUPATION, "zip"])
    return raw.select(
        F.trim(tb.USER_ID).alias(tb.USER_ID),
        bucket(F.col("age").cast("int"), AGE_EDGES, AGE_LABELS).alias(tb.AGE_BUCKET),
        F.upper(F.trim(tb.GENDER)).alias(tb.GENDER),
        F.lower(F.trim(tb.OCCUPATION)).alias(tb.OCCUPATION),
        F.upper(F.substring(F.trim(F.col("zip")), 1, 1)).alias(tb.ZIP_REGION),
    ).filter(F.col(tb.USER_ID).isNotNull() & (F.col(tb.USER_ID) != ""))


def read_movielens_items(spark: SparkSession, path: str) -> DataFrame:
    """MovieLens-100K ``u.item`` (``movie id | title | release date | video release date | IMDb URL |``
    19 genre flags; ISO-8859-1) as side item features.

    Columns: item_id, release_decade (e.g. ``1990s``; null when the date is missing) and one field per
    genre, ``genre_<name>`` with values ``0``/``1``.
    """
    genres = [f"{tb.GENRE_PREFIX}{g}" for g in MOVIELENS_GENRES]
    raw = _read_pipe_separated(spark, path, [tb.ITEM_ID, "title", "release", "video_release", "url", *genres])
    year = F.regexp_extract(F.col("release"), r"(\d{4})$", 1)
    decade = F.when(year != "", F.concat((F.floor(year.cast("int") / 10) * 10).cast("int").cast("string"),
                                         F.lit("s")))
    return raw.select(
        F.trim(tb.ITEM_ID).alias(tb.ITEM_ID),
        decade.alias(tb.RELEASE_DECADE),
        *[F.trim(F.col(g)).alias(g) for g in genres],
    ).filter(F.col(tb.ITEM_ID).isNotNull() & (F.col(tb.ITEM_ID) != ""))


def _side_fields(side: DataFrame | None, key: str) -> list[str]:
    if side is None:
        return []
    if key not in side.columns:
        raise RecsysError(f"side features need a {key} column; they have {side.columns}")
    return [c for c in side.columns if c != key]


def _as_strings(side: DataFrame, key: str) -> DataFrame:
    """A side frame with every column as a trimmed string (empty -> null), one row per key."""
    cols = [F.trim(F.col(c).cast("string")) for c in side.columns]
    out = side.select(*[F.when(c != "", c).alias(name) for c, name in zip(cols, side.columns, strict=True)])
    return out.filter(F.col(key).isNotNull()).dropDuplicates([key])


# --- raw (string) features -----------------------------------------------------------------------------


def _most_frequent(events: DataFrame, key: str, value: str) -> DataFrame:
    """Per ``key``, the most frequent non-null ``value`` (ties: the smallest value)."""
    counts = events.filter(F.col(value).isNotNull()).groupBy(key, value).agg(F.count(F.lit(1)).alias(_N))
    best = Window.partitionBy(key).orderBy(F.desc(_N), F.asc(value))
    return counts.withColumn(_ORDER, F.row_number().over(best)).filter(F.col(_ORDER) == 1).select(key, value)


def user_raw_features(events: DataFrame, users_index: DataFrame, side: DataFrame | None = None,
                      reference_time: Any = None) -> DataFrame:
    """One row per user of the index or the side frame: user_id, user_idx (null for side-only users) and
    the raw (string) value of each user field: ``USER_EVENT_FIELDS`` then the side columns.

    ``reference_time`` (a timestamp) is "now" for recency; default: the latest event time, so a re-run
    on the same events gives the same rows.
    """
    if reference_time is None:
        reference_time = events.agg(F.max(tb.EVENT_TIME)).first()[0]
    counts = events.groupBy(tb.USER_ID).pivot(tb.EVENT_TYPE, list(EVENT_TYPES)).agg(F.count(F.lit(1)))
    last = events.groupBy(tb.USER_ID).agg(F.max(tb.EVENT_TIME).alias(tb.LAST_TS))
    favourite = _most_frequent(events, tb.USER_ID, tb.CATEGORY).withColumnRenamed(tb.CATEGORY,
                                                                                   tb.FAVOURITE_CATEGORY)
    users = users_index.select(tb.USER_ID, tb.USER_IDX)
    side_cols = _side_fields(side, tb.USER_ID)
    if side is not None:
        side = _as_strings(side, tb.USER_ID)
        clash = sorted(set(side_cols) & {*USER_EVENT_FIELDS, *EVENT_TYPES, tb.LAST_TS})
        if clash:
            raise RecsysError(f"side user columns {clash} clash with event-derived user fields")
        users = users.join(side.select(tb.USER_ID), tb.USER_ID, "full_outer")
        users = users.join(side, tb.USER_ID, "left")
    joined = users.join(counts, tb.USER_ID, "left").join(last, tb.USER_ID, "left").join(favourite, tb.USER_ID,
                                                                                         "left")
    days = (F.unix_timestamp(F.lit(reference_time).cast("timestamp")) - F.unix_timestamp(tb.LAST_TS)) / 86400.0
    recency = F.coalesce(bucket(days, RECENCY_EDGES_DAYS, RECENCY_LABELS[:-1]), F.lit(NEVER))
    return joined.select(
        tb.USER_ID,
        F.col(tb.USER_IDX).cast("int").alias(tb.USER_IDX),
        *[count_bucket(F.col(t)).alias(name) for t, name in zip(EVENT_TYPES, ACTIVITY_FIELDS, strict=True)],
        recency.alias(tb.RECENCY),
        F.col(tb.FAVOURITE_CATEGORY),
        *[F.col(c) for c in side_cols],
    )


def item_raw_features(events: DataFrame, items_index: DataFrame, side: DataFrame | None = None) -> DataFrame:
    """One row per item of the index or the side frame: item_id, item_idx (null for side-only items) and
    the raw value of each item field: ``ITEM_EVENT_FIELDS`` then the side columns."""
    category = _most_frequent(events, tb.ITEM_ID, tb.CATEGORY)
    stats = events.groupBy(tb.ITEM_ID).agg(
        F.percentile_approx(tb.PRICE, 0.5).alias(tb.PRICE),
        F.countDistinct(tb.USER_ID).alias(_N),
    )
    items = items_index.select(tb.ITEM_ID, tb.ITEM_IDX)
    side_cols = _side_fields(side, tb.ITEM_ID)
    if side is not None:
        side = _as_strings(side, tb.ITEM_ID)
        clash = sorted(set(side_cols) & {*ITEM_EVENT_FIELDS, tb.PRICE, _N})
        if clash:
            raise RecsysError(f"side item columns {clash} clash with event-derived item fields")
        items = items.join(side.select(tb.ITEM_ID), tb.ITEM_ID, "full_outer").join(side, tb.ITEM_ID, "left")
    joined = items.join(category, tb.ITEM_ID, "left").join(stats, tb.ITEM_ID, "left")
    return joined.select(
        tb.ITEM_ID,
        F.col(tb.ITEM_IDX).cast("int").alias(tb.ITEM_IDX),
        F.col(tb.CATEGORY),
        bucket(F.col(tb.PRICE), PRICE_EDGES, PRICE_LABELS).alias(tb.PRICE_BUCKET),
        count_bucket(F.col(_N)).alias(tb.POPULARITY_BUCKET),
        *[F.col(c) for c in side_cols],
    )


def context_features(events: DataFrame) -> DataFrame:
    """``events`` plus the raw context fields of each event: hour_of_day (``0``..``23``), day_of_week
    (``Mon``..``Sun``), both in the session time zone (UTC); event_type is already a column.
    Encode them with :func:`encode` and ``CONTEXT_FIELDS``."""
    day = (F.dayofweek(tb.EVENT_TIME) + 5) % 7  # Spark: 1 = Sunday; here 0 = Monday
    days = F.array(*[F.lit(d) for d in DAYS])
    return events.withColumn(tb.HOUR_OF_DAY, F.hour(tb.EVENT_TIME).cast("string")).withColumn(
        tb.DAY_OF_WEEK, days[day]
    )


# --- vocabulary ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    """``silver/feature_vocab`` in memory: field -> value -> index (>= 1; 0 is unknown)."""

    index: dict[str, dict[str, int]]

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, str, int]]) -> Vocabulary:
        index: dict[str, dict[str, int]] = {}
        for name, value, idx in rows:
            index.setdefault(name, {})[value] = int(idx)
        return cls(index)

    @classmethod
    def read(cls, spark: SparkSession, warehouse: str) -> Vocabulary:
        rows = tb.read(spark, warehouse, tb.FEATURE_VOCAB).select(tb.FIELD, tb.VALUE, tb.VOCAB_INDEX).collect()
        log.info("collected the feature vocabulary to the driver: %d values", len(rows))
        return cls.from_rows((r[0], r[1], r[2]) for r in rows)

    def lookup(self, name: str, value: str | None) -> int:
        """The index of ``value`` in field ``name``; 0 for a missing or unseen value (or unknown field)."""
        if value is None:
            return UNKNOWN
        return self.index.get(name, {}).get(str(value), UNKNOWN)

    def cardinality(self, name: str) -> int:
        """Embedding rows the field needs: its largest index + 1 (1 for a field with no values)."""
        return max(self.index.get(name, {}).values(), default=0) + 1

    def encode_column(self, name: str, value: Column) -> Column:
        """A Spark expression: the index of ``value`` (cast to string) in field ``name``, 0 if unseen."""
        mapping = self.index.get(name, {})
        if not mapping:
            return F.lit(UNKNOWN).cast("int")
        literal = F.create_map(*[F.lit(x) for pair in sorted(mapping.items()) for x in pair])
        return F.coalesce(literal[value.cast("string")], F.lit(UNKNOWN)).cast("int")

    def to_json(self) -> str:
        return json.dumps(self.index, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        return cls({k: {v: int(i) for v, i in values.items()} for k, values in json.loads(text).items()})


def _observed_values(frames: Sequence[tuple[DataFrame, Sequence[str]]]) -> DataFrame:
    """Distinct (field, value) of every non-null value of the named columns, one pass per frame."""
    parts = []
    for df, names in frames:
        pairs = F.array(*[F.struct(F.lit(n).alias(tb.FIELD), F.col(n).cast("string").alias(tb.VALUE))
                          for n in names])
        parts.append(df.select(F.explode(pairs).alias("_pair")).select("_pair.*"))
    return reduce(DataFrame.unionByName, parts).filter(F.col(tb.VALUE).isNotNull()).distinct()


def extend_vocab(spark: SparkSession, warehouse: str, frames: Sequence[tuple[DataFrame, Sequence[str]]],
                 domains: Mapping[str, Sequence[str]] | None = None) -> Vocabulary:
    """Append the values of ``frames`` (pairs of a frame and the field columns it holds) that
    ``silver/feature_vocab`` lacks, and return the whole vocabulary.

    New values of a field are numbered after its largest index: first the values of ``domains[field]``
    (bucket labels, in bucket order), then the others in string order. Existing rows never change, and
    a build that finds nothing new writes nothing, so re-running leaves the table as it was.
    """
    domains = DOMAINS if domains is None else domains
    big = 1 << 30
    observed = _observed_values(frames).withColumn(_ORDER, F.lit(big))
    seeded_rows = [(name, value, i) for name, values in domains.items() for i, value in enumerate(values)]
    seeded = spark.createDataFrame(seeded_rows, f"{tb.FIELD} string, {tb.VALUE} string, {_ORDER} int")
    candidates = observed.unionByName(seeded).groupBy(tb.FIELD, tb.VALUE).agg(F.min(_ORDER).alias(_ORDER))
    if tb.exists(spark, warehouse, tb.FEATURE_VOCAB):
        existing = tb.read(spark, warehouse, tb.FEATURE_VOCAB)
        candidates = candidates.join(existing.select(tb.FIELD, tb.VALUE), [tb.FIELD, tb.VALUE], "left_anti")
        offsets = existing.groupBy(tb.FIELD).agg(F.max(tb.VOCAB_INDEX).alias(_N))
    else:
        offsets = spark.createDataFrame([], f"{tb.FIELD} string, {_N} int")
    order = Window.partitionBy(tb.FIELD).orderBy(_ORDER, tb.VALUE)
    new = (
        candidates.withColumn(tb.VOCAB_INDEX, F.row_number().over(order))
        .join(F.broadcast(offsets), tb.FIELD, "left")
        .select(tb.FIELD, tb.VALUE, (F.coalesce(F.col(_N), F.lit(0)) + F.col(tb.VOCAB_INDEX)).cast("int")
                .alias(tb.VOCAB_INDEX))
        .localCheckpoint()
    )
    n_new = new.count()
    if n_new:
        # Append: one commit that adds rows and touches none of the existing ones.
        new.write.format("delta").mode("append").save(tb.table_path(warehouse, tb.FEATURE_VOCAB))
    log.info("feature vocabulary: %d new values", n_new)
    return Vocabulary.read(spark, warehouse)


def encode(raw: DataFrame, vocab: Vocabulary, fields: Sequence[str]) -> DataFrame:
    """``raw`` with each of ``fields`` replaced by its index (int; 0 for null or unseen values)."""
    missing = [f for f in fields if f not in raw.columns]
    if missing:
        raise RecsysError(f"cannot encode fields {missing}: the frame has {raw.columns}")
    wanted = set(fields)
    return raw.select(*[vocab.encode_column(c, F.col(c)).alias(c) if c in wanted else F.col(c)
                        for c in raw.columns])


# --- the build -----------------------------------------------------------------------------------------


def build_features(spark: SparkSession, warehouse: str, side: Mapping[str, DataFrame] | None = None,
                   update_vocab: bool = True, reference_time: Any = None,
                   events: DataFrame | None = None) -> dict[str, int]:
    """Build ``silver/user_features`` and ``silver/item_features`` (and grow ``silver/feature_vocab``).

    Parameters
    ----------
    side : optional ``{"users": frame keyed by user_id, "items": frame keyed by item_id}``; every other
        column is a categorical field (cast to string). E.g. ``{"users": read_movielens_users(spark,
        "ml-100k/u.user"), "items": read_movielens_items(spark, "ml-100k/u.item")}``. Side users without
        an index row (no activity, or too little for the activity filters) are appended to
        ``silver/user_index``: every model then recommends for them (popularity for most, feature models from
        their features).
    update_vocab : False at inference: the vocabulary is read as it is and unseen values encode to 0.
        The context fields' fixed domains are seeded on the first training build.
    reference_time : "now" for recency; default the latest time of ``events`` (deterministic re-runs).
    events : the events the features grow from; default all of ``bronze/events``. The pipeline passes
        the split's training period (``splits.training_events``) so that no test-period activity leaks.

    Returns the row count of each table written. Both feature tables are overwritten whole (one commit
    each), so a re-run on the same inputs leaves them unchanged.
    """
    side = dict(side or {})
    unknown = sorted(set(side) - {"users", "items"})
    if unknown:
        raise RecsysError(f"side features are keyed 'users' and 'items', got {unknown}")
    if events is None:
        events = tb.read(spark, warehouse, tb.BRONZE_EVENTS)
    if "users" in side:
        _side_fields(side["users"], tb.USER_ID)  # names the missing key before Spark would
        indexing.update_index(spark, _as_strings(side["users"], tb.USER_ID), warehouse, tb.USER_INDEX,
                              tb.USER_ID, tb.USER_IDX)
    users_raw = user_raw_features(events, tb.read(spark, warehouse, tb.USER_INDEX), side.get("users"),
                                  reference_time).persist()
    items_raw = item_raw_features(events, tb.read(spark, warehouse, tb.ITEM_INDEX), side.get("items")).persist()
    try:
        user_fields = [c for c in users_raw.columns if c not in (tb.USER_ID, tb.USER_IDX)]
        item_fields = [c for c in items_raw.columns if c not in (tb.ITEM_ID, tb.ITEM_IDX)]
        if update_vocab:
            vocab = extend_vocab(spark, warehouse, [(users_raw, user_fields), (items_raw, item_fields)])
        else:
            vocab = Vocabulary.read(spark, warehouse)
        counts = {tb.USER_FEATURES: tb.overwrite(encode(users_raw, vocab, user_fields), warehouse, tb.USER_FEATURES),
                  tb.ITEM_FEATURES: tb.overwrite(encode(items_raw, vocab, item_fields), warehouse, tb.ITEM_FEATURES)}
    finally:
        users_raw.unpersist()
        items_raw.unpersist()
    return {**counts, tb.FEATURE_VOCAB: tb.read(spark, warehouse, tb.FEATURE_VOCAB).count()}
