"""Input presets: how each public event-log format maps onto the canonical event schema.

A reader returns every input row as strings, beside its raw text (``_raw``) and the path it came from
(``_source``), so that validation can quarantine a bad row with its original content.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_spark import tables as tb
from recsys_spark.errors import InputError

log = logging.getLogger(__name__)

RAW = "_raw"
SOURCE = "_source"
MALFORMED = "_malformed"  # a reader's own reason a row is unreadable (too many fields, not JSON), or null
FORMATS = ("csv", "json", "parquet", "delta")
BOM = "\ufeff"


@dataclass(frozen=True)
class Preset:
    """Where each canonical field comes from in one source format.

    ``columns`` names the fields of a headerless file in order; files with a header must contain the
    source columns this preset maps from. ``time_unit`` is ``s``/``ms`` (epoch numbers), ``iso``
    (date-time strings) or ``auto``.
    """

    name: str
    description: str
    format: str | None  # None: inferred from the path
    user: str
    item: str
    time: str
    time_unit: str
    sep: str = ","
    header: bool = True
    columns: tuple[str, ...] = ()
    event_type: str | None = None
    default_event_type: str | None = None
    session: str | None = None
    value: str | None = None
    category: str | None = None
    price: str | None = None
    time_offset_ms: str | None = None  # Diginetica: a day plus milliseconds into it
    optional: tuple[str, ...] = field(default=())  # mapped columns that may be absent

    def mapped(self) -> dict[str, str | None]:
        return {
            tb.USER_ID: self.user, tb.ITEM_ID: self.item, tb.EVENT_TIME: self.time,
            tb.EVENT_TYPE: self.event_type, tb.SESSION_ID: self.session, tb.VALUE: self.value,
            tb.CATEGORY: self.category, tb.PRICE: self.price, "time_offset_ms": self.time_offset_ms,
        }

    def required(self) -> list[str]:
        return [c for c in self.mapped().values() if c is not None and c not in self.optional]


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "canonical", "generic events: user_id, item_id, event_type, event_time "
            "[, session_id, value, category, price]; CSV with header, Parquet, JSON lines or Delta",
            None, "user_id", "item_id", "event_time", "auto", event_type="event_type",
            session="session_id", value="value", category="category", price="price",
            optional=("session_id", "value", "category", "price"),
        ),
        Preset(
            "movielens-100k", "MovieLens u.data: user, item, rating, unix time, tab-separated",
            "csv", "user", "item", "ts", "s", sep="\t", header=False,
            columns=("user", "item", "rating", "ts"), default_event_type="rating", value="rating",
        ),
        Preset(
            "movielens-1m", "MovieLens ratings.dat: UserID::MovieID::Rating::Timestamp",
            "csv", "user", "item", "ts", "s", sep="::", header=False,
            columns=("user", "item", "rating", "ts"), default_event_type="rating", value="rating",
        ),
        Preset(
            "movielens-latest", "MovieLens ratings.csv: userId,movieId,rating,timestamp with header",
            "csv", "userId", "movieId", "timestamp", "s", default_event_type="rating", value="rating",
        ),
        Preset(
            "taobao", "Taobao UserBehavior.csv: user, item, category, behavior (pv/cart/fav/buy), unix time",
            "csv", "user_id", "item_id", "timestamp", "s", header=False,
            columns=("user_id", "item_id", "category_id", "behavior", "timestamp"),
            event_type="behavior", category="category_id",
        ),
        Preset(
            "rees46", "REES46 eCommerce behavior: event_time, event_type, product_id, ..., user_session",
            "csv", "user_id", "product_id", "event_time", "iso", event_type="event_type",
            session="user_session", category="category_id", price="price",
        ),
        Preset(
            "retailrocket", "RetailRocket events.csv: timestamp (ms), visitorid, event, itemid, transactionid",
            "csv", "visitorid", "itemid", "timestamp", "ms", event_type="event",
        ),
        Preset(
            "yoochoose", "Yoochoose clicks, GRU4Rec-preprocessed TSV: SessionId, ItemId, Time (unix s)",
            "csv", "SessionId", "ItemId", "Time", "s", sep="\t", default_event_type="view",
            session="SessionId",
        ),
        Preset(
            "yoochoose-clicks", "Yoochoose yoochoose-clicks.dat: session, ISO time, item, category",
            "csv", "session", "item", "time", "iso", header=False,
            columns=("session", "time", "item", "category"), default_event_type="view",
            session="session", category="category",
        ),
        Preset(
            "otto", "OTTO JSON lines: {session, events: [{aid, ts (ms), type}]}",
            "json", "session", "aid", "ts", "ms", event_type="type", session="session",
        ),
        Preset(
            "diginetica", "Diginetica train-item-views.csv: session_id;user_id;item_id;timeframe;eventdate",
            "csv", "session_id", "item_id", "eventdate", "iso", sep=";", default_event_type="view",
            session="session_id", time_offset_ms="timeframe",
        ),
    ]
}
ALIASES = {"movielens": None, "generic": "canonical"}  # movielens: chosen by the file's name

OTTO_SCHEMA = T.StructType(
    [
        T.StructField("session", T.StringType()),
        T.StructField(
            "events",
            T.ArrayType(
                T.StructType(
                    [T.StructField("aid", T.StringType()), T.StructField("ts", T.StringType()),
                     T.StructField("type", T.StringType())]
                )
            ),
        ),
    ]
)


def resolve_preset(name: str, path: str) -> Preset:
    """Return the preset named ``name``; ``movielens`` picks the variant from the file name."""
    key = name.lower()
    if key == "movielens":
        base = path.rstrip("/").rsplit("/", 1)[-1]
        key = {".data": "movielens-100k", ".dat": "movielens-1m", ".csv": "movielens-latest"}.get(
            base[base.rfind("."):] if "." in base else "", "movielens-100k"
        )
    key = ALIASES.get(key) or key
    if key not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose one of: {', '.join(sorted([*PRESETS, *ALIASES]))}")
    return PRESETS[key]


def _hadoop_glob(spark: SparkSession, path: str) -> list[str]:
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(path)
    fs = hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    statuses = fs.globStatus(hpath)
    return [s.getPath().toString() for s in statuses] if statuses else []


def infer_format(spark: SparkSession, path: str, preset: Preset, fmt: str | None) -> str:
    """The explicit ``--format``, else the preset's, else one guessed from the path."""
    matches = _hadoop_glob(spark, path)
    if not matches:
        raise InputError(f"input path does not exist: {path}")
    if fmt:
        if fmt not in FORMATS:
            raise InputError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return fmt
    if preset.format:
        return preset.format
    if _hadoop_glob(spark, path.rstrip("/") + "/_delta_log"):
        return "delta"
    lowered = path.lower().rstrip("/")
    for suffixes, guess in [
        ((".csv", ".tsv", ".txt", ".csv.gz"), "csv"),
        ((".parquet",), "parquet"),
        ((".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz"), "json"),
    ]:
        if lowered.endswith(suffixes):
            return guess
    if _hadoop_glob(spark, path.rstrip("/") + "/*.parquet"):
        return "parquet"
    raise InputError(f"cannot infer the format of {path}; pass --format with one of {', '.join(FORMATS)}")


def read_raw(spark: SparkSession, path: str, preset: Preset, fmt: str | None = None,
             sep: str | None = None) -> DataFrame:
    """Every input row as strings, plus ``_raw`` (its original text) and ``_source`` (the input path)."""
    fmt = infer_format(spark, path, preset, fmt)
    if fmt == "csv":
        df = _read_csv(spark, path, preset, sep or preset.sep)
    elif fmt == "json":
        df = _read_otto(spark, path) if preset.name == "otto" else _read_json(spark, path, preset)
    else:
        df = _read_table(spark, path, preset, fmt)
    return df.withColumn(SOURCE, F.lit(path))


def _text_lines(spark: SparkSession, path: str) -> tuple[DataFrame, str]:
    """The non-blank lines of a text file and its first one. A byte-order mark (U+FEFF) starting a line
    is dropped: Hadoop's reader drops the file's own, but not one that starts a later line (files
    concatenated), where it would glue itself to the first field and make user "1" two users."""
    value = F.col("value")
    text = spark.read.text(path).select(
        F.when(value.startswith(BOM), F.expr("substring(value, 2)")).otherwise(value).alias("value"))
    lines = text.filter(F.trim(F.col("value")) != "")
    with reading(path):
        first = lines.limit(1).collect()
    if not first:
        raise InputError(f"input is empty: {path}")
    return lines, first[0]["value"]


# The JVM's words for a file whose bytes cannot be read at all: a corrupt or mislabelled compressed file.
_UNREADABLE = re.compile(r"(?:java\.io|java\.util\.zip)\.(\w+(?:Exception|Error)): ([^\n]*)")


@contextmanager
def reading(path: str) -> Iterator[None]:
    """Turn Spark's failure to read the bytes of ``path`` (a ``.gz`` that is not gzip, a truncated
    archive) into one line naming the file and the cause, instead of a stage failure's stack trace."""
    try:
        yield
    except Exception as exc:
        found = _UNREADABLE.search(str(exc)) or _UNREADABLE.search(str(getattr(exc, "java_exception", "")))
        if found is None:
            raise
        raise InputError(f"{path}: cannot be read: {found.group(2).strip() or found.group(1)} "
                         f"({found.group(1)})") from None


def _split_line(line: str, sep: str) -> list[str]:
    """The fields of one line (the header, or the first row that tells the file's shape)."""
    if len(sep) == 1:
        try:
            return next(csv.reader(io.StringIO(line), delimiter=sep))
        except csv.Error:  # a field over the csv module's 128 KiB limit: count fields without quoting rules
            pass
    return line.split(sep)


def _delimiter_hint(line: str, sep: str, expected: int) -> str:
    for other in [",", "\t", ";", "|", "::"]:
        if other != sep and len(_split_line(line, other)) >= expected:
            return f"; the file looks {other!r}-separated (pass --sep {other!r} or another preset)"
    return ""


def _read_csv(spark: SparkSession, path: str, preset: Preset, sep: str) -> DataFrame:
    lines, first = _text_lines(spark, path)
    if preset.header:
        columns = [c.strip() for c in _split_line(first, sep)]
        missing = [c for c in preset.required() if c not in columns]
        if missing:
            raise InputError(
                f"{path}: missing column {missing[0]!r} required by preset {preset.name!r} "
                f"(found columns: {columns}){_delimiter_hint(first, sep, len(preset.required()))}"
            )
        lines = lines.filter(F.col("value") != first)
    else:
        columns = list(preset.columns)
        found = len(_split_line(first, sep))
        if found < len(columns):
            raise InputError(
                f"{path}: preset {preset.name!r} expects {len(columns)} fields separated by {sep!r}, "
                f"the first line has {found}{_delimiter_hint(first, sep, len(columns))}"
            )
    schema = T.StructType([T.StructField(f"_c{i}", T.StringType()) for i in range(len(columns) + 1)])
    parsed = F.from_csv(F.col("value"), schema.simpleString(), {"sep": sep, "mode": "PERMISSIVE"})
    fields = [parsed[f"_c{i}"].alias(name) for i, name in enumerate(columns)]
    extra = parsed[f"_c{len(columns)}"]  # a token beyond the expected fields: the row has too many
    malformed = F.when(extra.isNotNull() & (extra != ""), F.lit("malformed_row"))
    return lines.select(F.col("value").alias(RAW), *fields, malformed.alias(MALFORMED))


def _not_json(text: Column) -> Column:
    """True for a line that is not one JSON object (from_json alone yields a struct of nulls)."""
    return F.get_json_object(text, "$").isNull()


def _read_json(spark: SparkSession, path: str, preset: Preset) -> DataFrame:
    lines, _ = _text_lines(spark, path)
    names = [c for c in preset.mapped().values() if c]
    schema = T.StructType([T.StructField(n, T.StringType()) for n in names])
    parsed = F.from_json(F.col("value"), schema)
    return lines.select(
        F.col("value").alias(RAW),
        *[parsed[n].alias(n) for n in names],
        F.when(_not_json(F.col("value")), F.lit("malformed_json")).alias(MALFORMED),
    )


def _read_otto(spark: SparkSession, path: str) -> DataFrame:
    """One input row per event: a session line is exploded; a malformed line stays one row."""
    lines, _ = _text_lines(spark, path)
    sessions = lines.select(F.col("value").alias(RAW), F.from_json("value", OTTO_SCHEMA).alias("s"))
    events = sessions.select(
        RAW, F.col("s.session").alias("session"), (_not_json(F.col(RAW)) | F.col("s.events").isNull()).alias("_bad"),
        F.explode_outer("s.events").alias("e"),
    )
    return events.select(
        F.when(F.col("_bad"), F.col(RAW))
        .otherwise(F.to_json(F.struct(F.col("session"), F.col("e")))).alias(RAW),
        "session",
        F.col("e.aid").alias("aid"),
        F.col("e.ts").alias("ts"),
        F.col("e.type").alias("type"),
        F.when(F.col("_bad"), F.lit("malformed_json")).alias(MALFORMED),
    )


def _read_table(spark: SparkSession, path: str, preset: Preset, fmt: str) -> DataFrame:
    df = spark.read.format(fmt).load(path)
    missing = [c for c in preset.required() if c not in df.columns]
    if missing:
        raise InputError(
            f"{path}: missing column {missing[0]!r} required by preset {preset.name!r} (found columns: {df.columns})"
        )
    names = [c for c in preset.mapped().values() if c and c in df.columns]
    return df.select(
        F.to_json(F.struct(*[F.col(c) for c in df.columns])).alias(RAW),
        *[F.col(c).cast("string").alias(c) for c in names],
        F.lit(None).cast("string").alias(MALFORMED),
    )


def source_column(df: DataFrame, name: str | None) -> Column:
    """A mapped source column, or null when the preset does not map it or the file lacks it."""
    if name is None or name not in df.columns:
        return F.lit(None).cast("string")
    return F.col(name)
