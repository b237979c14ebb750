"""The table contract (README "Tables"): names, locations, schemas and idempotent Delta writes.

Every table lives at ``<warehouse>/<layer>/<name>``. Writes are single Delta commits, so a failed job
leaves no partial output visible, and each write is keyed so that a re-run for the same inputs leaves
the table as it was.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from delta import exceptions as dx
from delta.tables import DeltaTable
from pyspark.errors import AnalysisException, IllegalArgumentException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_spark.errors import MissingTableError, RecsysError

log = logging.getLogger(__name__)

# Column names, declared once.
EVENT_ID = "event_id"
USER_ID = "user_id"
ITEM_ID = "item_id"
EVENT_TYPE = "event_type"
EVENT_TIME = "event_time"
EVENT_DATE = "event_date"
SESSION_ID = "session_id"
VALUE = "value"
CATEGORY = "category"
PRICE = "price"
SOURCE = "source"
USER_IDX = "user_idx"
ITEM_IDX = "item_idx"
WEIGHT = "weight"
N_EVENTS = "n_events"
FIRST_TS = "first_ts"
LAST_TS = "last_ts"
SPLIT = "split"
ITEMS = "items"
LENGTH = "length"
RUN_ID = "run_id"
RUN_DATE = "run_date"
MODEL = "model"
RANK = "rank"
SCORE = "score"
METRIC = "metric"
K = "k"
POSITION = "position"
EMBEDDING = "embedding"  # array<float> in the factor frames and gold/*_embeddings
SIMILAR_ITEM_IDX = "similar_item_idx"
SIMILAR_ITEM_ID = "similar_item_id"
# An item's place in id order: integer ids by their numeric value, then the others as strings. The
# tie-break between a user's items at one timestamp, so no split depends on how ids are spelled.
ITEM_ORDER = "item_order"

# Feature tables (recsys_spark.data.features): the vocabulary's columns, the assembled feature-model input, and
# the names of the built-in feature fields. Side-file columns keep their own names as field names.
FIELD = "field"
VOCAB_INDEX = "index"
FIELDS = "fields"
AGE_BUCKET = "age_bucket"
GENDER = "gender"
OCCUPATION = "occupation"
ZIP_REGION = "zip_region"
RELEASE_DECADE = "release_decade"
GENRE_PREFIX = "genre_"
ACTIVITY_PREFIX = "activity_"
RECENCY = "recency"
FAVOURITE_CATEGORY = "favourite_category"
PRICE_BUCKET = "price_bucket"
POPULARITY_BUCKET = "popularity_bucket"
HOUR_OF_DAY = "hour_of_day"
DAY_OF_WEEK = "day_of_week"

# Sequences are left-padded with this index (item indices themselves are 0..n_items-1).
PAD_IDX = -1

# Table names, by layer.
BRONZE_EVENTS = "bronze/events"
BRONZE_REJECTED = "bronze/events_rejected"
USER_INDEX = "silver/user_index"
ITEM_INDEX = "silver/item_index"
INTERACTIONS = "silver/interactions"
TRAIN = "silver/train"
TEST = "silver/test"
SEQUENCES = "silver/sequences"
SESSIONS = "silver/sessions"
USER_FEATURES = "silver/user_features"
ITEM_FEATURES = "silver/item_features"
FEATURE_VOCAB = "silver/feature_vocab"
USER_EMBEDDINGS = "gold/user_embeddings"
ITEM_EMBEDDINGS = "gold/item_embeddings"
RECOMMENDATIONS = "gold/recommendations"
SIMILAR_ITEMS = "gold/similar_items"
METRICS = "gold/metrics"

# Which command writes which table: named in errors when a table is missing.
PRODUCER = {
    BRONZE_EVENTS: "ingest",
    BRONZE_REJECTED: "ingest",
    USER_INDEX: "interactions",
    ITEM_INDEX: "interactions",
    INTERACTIONS: "interactions",
    TRAIN: "interactions",
    TEST: "interactions",
    SEQUENCES: "interactions",
    SESSIONS: "interactions",
    USER_FEATURES: "features",
    ITEM_FEATURES: "features",
    FEATURE_VOCAB: "features",
    USER_EMBEDDINGS: "train",
    ITEM_EMBEDDINGS: "train",
    RECOMMENDATIONS: "recommend",
    SIMILAR_ITEMS: "similar-items",
    METRICS: "evaluate",
}
# Every table of the contract, in pipeline order: what `recsys-spark maintain` walks.
TABLES = tuple(PRODUCER)
# Delta operations that commit but change no rows (compaction, vacuum's log entries).
MAINTENANCE_OPERATIONS = ("OPTIMIZE", "VACUUM START", "VACUUM END")

EVENTS_SCHEMA = T.StructType(
    [
        T.StructField(EVENT_ID, T.StringType(), False),
        T.StructField(USER_ID, T.StringType(), False),
        T.StructField(ITEM_ID, T.StringType(), False),
        T.StructField(EVENT_TYPE, T.StringType(), False),
        T.StructField(EVENT_TIME, T.TimestampType(), False),
        T.StructField(SESSION_ID, T.StringType(), True),
        T.StructField(VALUE, T.DoubleType(), True),
        T.StructField(CATEGORY, T.StringType(), True),
        T.StructField(PRICE, T.DoubleType(), True),
        T.StructField(SOURCE, T.StringType(), True),
        T.StructField(EVENT_DATE, T.DateType(), False),
    ]
)


def require_columns(df: DataFrame, columns: list[str], what: str) -> None:
    """Stop with one line naming the missing columns of ``df`` (``what`` says which frame it is)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise RecsysError(f"{what} lacks column(s) {missing}; it has {df.columns}")


def item_tie(df: DataFrame) -> Column:
    """What orders a user's items that share a timestamp (later = larger): ``item_order`` when ``df`` has
    it (the silver tables do), else ``item_idx`` (frames built by hand, whose indices are the ids)."""
    return F.col(ITEM_ORDER) if ITEM_ORDER in df.columns else F.col(ITEM_IDX)


def table_path(warehouse: str, name: str) -> str:
    """Absolute location of a table; local paths are made absolute, URIs (s3a://, abfss://) kept."""
    root = warehouse if "://" in warehouse else os.path.abspath(warehouse)
    return f"{root.rstrip('/')}/{name}"


# What may go into a Delta predicate's string literal or a path unescaped. Model names (and split names)
# are spliced into replaceWhere conditions, which Delta takes only as SQL text, and into model paths. Run
# ids only ever travel as values (gold rows, MLflow tags, the report), but come from the command line, so
# they are held to a safe alphabet too (``+`` and ``:`` for Airflow's, e.g. scheduled__2026-01-02T00:00:00+00:00).
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9._:+-]{1,128}")


def check_name(value: str, what: str) -> str:
    """``value`` when it is a plain name (letters, digits, ``_``, ``-``), else a one-line RecsysError:
    the guard for every name that reaches SQL text or a path."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise RecsysError(f"{what} {value!r} is not a plain name (letters, digits, '_', '-'; at most 64)")
    return value


def check_run_id(run_id: str) -> str:
    """``run_id`` when it matches ``RUN_ID_PATTERN``, else a one-line RecsysError."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise RecsysError(f"run id {run_id!r} must be 1-128 of letters, digits and . _ : + -")
    return run_id


def model_dir(warehouse: str, model: str, run_date: dt.date | str) -> str:
    """Where the pipeline saves a model trained for a run date: ``<warehouse>/models/<model>/<run_date>``.

    ``model`` must be a plain name (``check_name``): ``../x`` would leave the models directory."""
    day = run_date.isoformat() if isinstance(run_date, dt.date) else check_name(str(run_date), "run date")
    return table_path(warehouse, f"models/{check_name(model, 'model name')}/{day}")


def exists(spark: SparkSession, warehouse: str, name: str) -> bool:
    return DeltaTable.isDeltaTable(spark, table_path(warehouse, name))


def read(spark: SparkSession, warehouse: str, name: str) -> DataFrame:
    """Read a table, or say which command creates it."""
    if not exists(spark, warehouse, name):
        raise MissingTableError(
            f"table {name} not found under {warehouse}: run `recsys-spark {PRODUCER.get(name, '?')}` first"
        )
    return spark.read.format("delta").load(table_path(warehouse, name))


def overwrite(df: DataFrame, warehouse: str, name: str, partition_by: list[str] | None = None) -> int:
    """Replace a whole table in one commit (schema included); return the rows written."""
    tag = _commit_tag()
    writer = (df.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
              .option("userMetadata", tag))
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    path = table_path(warehouse, name)
    writer.save(path)
    return _rows_written(df, path, tag)


def _commit_tag() -> str:
    """A commit's ``userMetadata``: which of the table's commits is this write's (``_rows_written``), and,
    in ``DESCRIBE HISTORY``, which commits recsys-spark made."""
    return f"recsys-spark {uuid.uuid4().hex}"


# How many of the newest commits ``_rows_written`` reads before the whole history: more than the writers
# that commit to one table at once (the DAG's model tasks), so one read nearly always finds the commit.
_RECENT_COMMITS = 16


def _rows_written(df: DataFrame, path: str, tag: str) -> int:
    """The rows of ``df`` that the commit tagged ``tag`` wrote, from its Delta commit metrics
    (``numOutputRows``); ``df.count()`` where commit metrics are switched off
    (``spark.databricks.delta.history.metricsEnabled``).

    Why not read the table back and count: that rebuilds the new snapshot and scans it, about 1 s per
    table on 2 cores, where these metrics are in the commit file the write just made. The tag finds the
    commit even when other writers committed after it."""
    table = DeltaTable.forPath(df.sparkSession, path)
    for history in (table.history(_RECENT_COMMITS), table.history()):
        found = history.filter(F.col("userMetadata") == tag).select("operationMetrics").collect()
        if found:
            metrics = found[0][0] or {}
            return int(metrics["numOutputRows"]) if "numOutputRows" in metrics else df.count()
    raise RecsysError(f"{path}: the commit of this write ({tag}) is not in the table's history")


# Delta's commit conflicts: another writer committed first. Retried (the write is re-planned against the
# new snapshot), so parallel jobs into one table all land; see ``_retrying``.
COMMIT_CONFLICTS = (dx.DeltaConcurrentModificationException, dx.ConcurrentWriteException,
                    dx.MetadataChangedException, dx.ProtocolChangedException, dx.ConcurrentAppendException,
                    dx.ConcurrentDeleteReadException, dx.ConcurrentDeleteDeleteException,
                    dx.ConcurrentTransactionException)
CONFLICT_RETRIES = 8


def _retrying(write, what: str, also: tuple[type[Exception], ...] = ()):
    """``write()``, again after a short random pause each time Delta reports a commit conflict (or one
    of ``also``).

    Why: jobs of one run date write to the same tables in parallel (the DAG's model tasks, two ingests of
    overlapping files). Each write below is idempotent (a ``replaceWhere`` of its own rows, a merge that
    inserts only missing keys), so doing it again against the winner's snapshot is exactly right."""
    for attempt in range(1, CONFLICT_RETRIES + 1):
        try:
            return write()
        except COMMIT_CONFLICTS + also as exc:
            if attempt == CONFLICT_RETRIES:
                raise RecsysError(f"{what}: still conflicting with other writers after {attempt} tries: "
                                  f"{str(exc).splitlines()[0]}") from exc
            pause = random.uniform(0.2, 1.0) * attempt
            log.info("%s: another writer committed first (%s); retrying in %.1f s", what, type(exc).__name__,
                     pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


class _LogWithoutCommit(Exception):
    """A ``_delta_log`` folder that holds no commit yet: another writer is between making the folder and
    committing version 0, or one was killed there."""


def _remove_if_empty(spark: SparkSession, folder: str) -> None:
    """Delete ``folder`` if it holds nothing. Hadoop refuses a non-recursive delete of a folder with files,
    so a writer whose commit lands meanwhile keeps it (its commit recreates a removed folder)."""
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(folder)
    fs = hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    if fs.exists(hpath) and not fs.listStatus(hpath):
        fs.delete(hpath, False)


def _create_if_missing(df: DataFrame, path: str, partition_by: list[str] | None) -> None:
    """An empty table with ``df``'s schema at ``path`` unless one is there: one commit, so writers racing
    to create it end with one table (the losers' conflict is retried and finds it), and the rows always
    go in by the keyed writes below, never by a blind overwrite of a table someone just created.

    Delta's ``createIfNotExists`` fails with DELTA_TABLE_NOT_FOUND on a ``_delta_log`` folder without a
    commit (CI met it: two first-day ``recommend`` jobs). After a pause, a folder still empty is a killed
    creator's and is removed; either way the creation is tried again."""
    spark = df.sparkSession
    nullable = T.StructType([T.StructField(f.name, f.dataType, True, f.metadata) for f in df.schema])
    builder = DeltaTable.createIfNotExists(spark).location(path).addColumns(nullable)
    if partition_by:
        builder = builder.partitionedBy(*partition_by)

    def create() -> None:
        if DeltaTable.isDeltaTable(spark, path):
            return
        try:
            builder.execute()
        except AnalysisException as exc:
            if "DELTA_TABLE_NOT_FOUND" not in (exc.getErrorClass() or ""):
                raise
            time.sleep(1.0)
            if not DeltaTable.isDeltaTable(spark, path):
                _remove_if_empty(spark, path.rstrip("/") + "/_delta_log")
            raise _LogWithoutCommit(str(exc)) from exc

    _retrying(create, f"creating {path}", also=(_LogWithoutCommit,))


def replace_where(df: DataFrame, warehouse: str, name: str, condition: str,
                  partition_by: list[str] | None = None) -> int:
    """Atomically replace the rows matching ``condition`` and touch nothing else; return the rows written.

    This is how a re-run of a model for the same run date replaces only its own rows, and how two models'
    jobs write the same table at once (each its own partition; a conflict is retried).
    """
    path = table_path(warehouse, name)
    _create_if_missing(df, path, partition_by)
    tag = _commit_tag()
    _retrying(lambda: df.write.format("delta").mode("overwrite").option("replaceWhere", condition)
              .option("userMetadata", tag).save(path), f"writing {name}")
    return _rows_written(df, path, tag)


def insert_new(df: DataFrame, warehouse: str, name: str, key: str,
               partition_by: list[str] | None = None) -> int:
    """Insert the rows whose ``key`` is not in the table yet; return how many were inserted.

    ``df`` must already be unique on ``key``. With a partition column, the merge condition names it
    too, so Delta only scans the partitions the new rows fall in. Two writers of overlapping rows: the
    second merge conflicts, is retried against the first one's rows and inserts only what is still missing.
    The count comes from the merge's own result, not the table history (another writer may have
    committed since).
    """
    spark = df.sparkSession
    path = table_path(warehouse, name)
    _create_if_missing(df, path, partition_by)
    on = " AND ".join(f"t.`{c}` = s.`{c}`" for c in [*(partition_by or []), key])
    view = f"_insert_new_{uuid.uuid4().hex}"
    df.createOrReplaceTempView(view)
    try:
        result = _retrying(lambda: spark.sql(
            f"MERGE INTO delta.`{path}` AS t USING {view} AS s ON {on} WHEN NOT MATCHED THEN INSERT *").first(),
            f"inserting into {name}")
    finally:
        spark.catalog.dropTempView(view)
    return int(result["num_inserted_rows"])


def last_commit_time(spark: SparkSession, warehouse: str, name: str):
    """When the table's rows last changed: its newest Delta commit that is not maintenance. None when the
    table does not exist, or when its retained history (30 days by default) holds only maintenance.

    Why not simply the newest commit: OPTIMIZE and VACUUM commit too, so after `recsys-spark maintain`
    every table would look newer than the tables built from it, and the pipeline's resume rule would
    rebuild them all. None makes the callers rerun, the safe side.
    """
    if not exists(spark, warehouse, name):
        return None
    history = DeltaTable.forPath(spark, table_path(warehouse, name)).history()
    changed = history.filter(~F.col("operation").isin(*MAINTENANCE_OPERATIONS))
    return changed.agg(F.max("timestamp")).first()[0]


def is_current(spark: SparkSession, warehouse: str, output: str | list[str], inputs: list[str],
               where: str | None = None) -> bool:
    """True when ``output`` (each of them, for a list) has rows (matching ``where``) written after the last
    change of every input.

    The pipeline's resume rule: a step whose output is missing or older than its inputs runs again.
    """
    changed = [last_commit_time(spark, warehouse, name) for name in inputs]
    if any(t is None for t in changed):
        return False
    for name in [output] if isinstance(output, str) else output:
        written = last_commit_time(spark, warehouse, name)
        if written is None or any(t > written for t in changed):
            return False
        rows = read(spark, warehouse, name)
        if (rows.filter(where) if where else rows).limit(1).count() == 0:
            return False
    return True


def check_table_names(names: list[str]) -> list[str]:
    """``names``, each a table of the contract (``silver/train``), else stop with one line naming the others."""
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise RecsysError(f"unknown table(s) {unknown}; known: {', '.join(TABLES)}")
    return names


def _num_files(table: DeltaTable) -> int:
    """Data files in the table's current version (DESCRIBE DETAIL's numFiles)."""
    return int(table.detail().select("numFiles").first()[0])


LISTING_PARALLELISM = "spark.sql.sources.parallelPartitionDiscovery.parallelism"


@contextmanager
def listing_parallelism(spark: SparkSession) -> Iterator[None]:
    """VACUUM lists a table's files in ``LISTING_PARALLELISM`` tasks per stage. Spark's default, 10,000,
    made a tiny table's vacuum about 100,000 tasks, and the DAG's maintain task (14 small tables,
    spark-submit on 2 cores) 5 minutes; twice the cluster's cores lists as fast as the cluster can. A
    value already set (at launch, or by an enclosing ``listing_parallelism``) is kept."""
    set_here = spark.conf.get(LISTING_PARALLELISM, None) is None
    if set_here:
        spark.conf.set(LISTING_PARALLELISM, str(2 * spark.sparkContext.defaultParallelism))
    try:
        yield
    finally:
        if set_here:
            spark.conf.unset(LISTING_PARALLELISM)


def compact_and_vacuum(spark: SparkSession, warehouse: str, name: str, retention_hours: int) -> dict[str, int | None]:
    """OPTIMIZE (bin-packing compaction) then VACUUM one table; files before and after, and vacuumed.

    Why: every daily ``replace_where`` and merge adds small files, and reads slow down with their number;
    the files they replaced stay on storage for time travel until VACUUM deletes those older than
    ``retention_hours``. Compaction rewrites files without changing a row (a ``dataChange=false``
    commit), so a writer that commits meanwhile only conflicts when it replaced the same files, and the
    compaction is then planned again on the new snapshot (``_retrying``); our writers retry theirs too.

    The retention is passed to Delta as it is and Delta's own check stays on: it refuses a retention
    below the table's ``delta.deletedFileRetentionDuration`` (7 days unless set on the table), because
    VACUUM could then delete the files of a write still in progress. That refusal is raised as one line.
    ``files_vacuumed`` comes from Delta's VACUUM END commit (files and directories deleted); None where
    the storage's log store does not record vacuums.
    """
    table = DeltaTable.forPath(spark, table_path(warehouse, name))
    before = _num_files(table)
    _retrying(lambda: table.optimize().executeCompaction(), f"compacting {name}")
    after = _num_files(table)
    last_version = table.history(1).select("version").first()[0]
    try:
        with listing_parallelism(spark):
            table.vacuum(retention_hours)
    except IllegalArgumentException as exc:
        if "retention" not in str(exc):
            raise
        raise RecsysError(
            f"Delta refuses to VACUUM {name} with a retention of {retention_hours} h, below the table's "
            "delta.deletedFileRetentionDuration (default 168 h): raise maintenance.vacuum_retention_hours "
            "(spark.databricks.delta.retentionDurationCheck.enabled=false skips the check; only safe when "
            "nothing writes the table meanwhile)") from None
    vacuum_end = (table.history().filter((F.col("version") > last_version) & (F.col("operation") == "VACUUM END"))
                  .orderBy("version").select(F.col("operationMetrics")["numDeletedFiles"]).first())
    vacuumed = int(vacuum_end[0]) if vacuum_end is not None and vacuum_end[0] is not None else None
    return {"files_before": before, "files_after": after, "files_vacuumed": vacuumed}
