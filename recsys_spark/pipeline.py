"""The pipeline's steps, each a function of (spark, config) that reads and writes warehouse tables.

The CLI, the spark-submit jobs and the Airflow DAG all call these; none holds logic of its own.
"""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.config import PipelineConfig
from recsys_spark.data import events as ev
from recsys_spark.data import indexing, interactions, sequences, splits
from recsys_spark.errors import RecsysError

log = logging.getLogger(__name__)


def run_ingest(spark: SparkSession, config: PipelineConfig, path: str, preset: str,
               fmt: str | None = None, sep: str | None = None) -> ev.IngestSummary:
    return ev.ingest(spark, path, preset, config.warehouse, config.ingest, fmt=fmt, sep=sep)


def _tagged(frames: dict[str, DataFrame]) -> DataFrame:
    tagged = [df.withColumn(tb.SPLIT, F.lit(name)) for name, df in frames.items()]
    out = tagged[0]
    for df in tagged[1:]:
        out = out.unionByName(df)
    return out.select(tb.SPLIT, *[c for c in out.columns if c != tb.SPLIT])


def run_interactions(spark: SparkSession, config: PipelineConfig) -> dict[str, int]:
    """bronze/events -> index tables, interactions, both splits, sequences and sessions.

    Everything but the index tables is derived whole from bronze/events and overwritten, so a re-run
    leaves the same rows; the index tables only ever gain rows.
    """
    wh, ic = config.warehouse, config.interactions
    weighted = interactions.weighted_events(tb.read(spark, wh, tb.BRONZE_EVENTS), ic).persist()
    try:
        pairs = interactions.filter_min_activity(
            interactions.aggregate(weighted), ic.min_user_interactions, ic.min_item_interactions,
            ic.max_filter_rounds,
        )
        if pairs.limit(1).count() == 0:
            raise RecsysError("no interactions left after the activity filters: lower "
                             "interactions.min_user_interactions / min_item_interactions")
        users = indexing.update_index(spark, pairs, wh, tb.USER_INDEX, tb.USER_ID, tb.USER_IDX)
        items = indexing.update_index(spark, pairs, wh, tb.ITEM_INDEX, tb.ITEM_ID, tb.ITEM_IDX)
        indexed = (
            weighted.join(pairs.select(tb.USER_ID).distinct(), tb.USER_ID, "left_semi")
            .join(pairs.select(tb.ITEM_ID).distinct(), tb.ITEM_ID, "left_semi")
            .join(users, tb.USER_ID)
            .join(items, tb.ITEM_ID)
            .persist()
        )
        table = interactions.aggregate(indexed, tb.USER_IDX, tb.ITEM_IDX)
        tb.overwrite(table, wh, tb.INTERACTIONS)
        table = tb.read(spark, wh, tb.INTERACTIONS)
        by_split = {
            splits.LEAVE_LAST_OUT: splits.leave_last_out(table),
            splits.TEMPORAL: splits.temporal(indexed, ic.test_fraction),
        }
        tb.overwrite(_tagged({k: v[0] for k, v in by_split.items()}), wh, tb.TRAIN, partition_by=[tb.SPLIT])
        tb.overwrite(_tagged({k: v[1] for k, v in by_split.items()}), wh, tb.TEST, partition_by=[tb.SPLIT])
        train = tb.read(spark, wh, tb.TRAIN)
        seqs = {
            name: sequences.user_sequences(train.filter(F.col(tb.SPLIT) == name), ic.max_sequence_length)
            for name in by_split
        }
        tb.overwrite(_tagged(seqs), wh, tb.SEQUENCES, partition_by=[tb.SPLIT])
        tb.overwrite(sequences.sessions(indexed, ic.session_gap_minutes), wh, tb.SESSIONS)
        indexed.unpersist()
    finally:
        weighted.unpersist()
    written = [tb.USER_INDEX, tb.ITEM_INDEX, tb.INTERACTIONS, tb.TRAIN, tb.TEST, tb.SEQUENCES, tb.SESSIONS]
    return {name: tb.read(spark, wh, name).count() for name in written}


def synthetic_input(spark: SparkSession, config: PipelineConfig) -> str:
    """Generate the demo's event log under the warehouse (deterministic per seed) and return its path."""
    from recsys_spark.data import synthetic

    path = tb.table_path(config.warehouse, "raw/synthetic_events")
    synthetic.write_events(synthetic.generate_events(spark, config.generate), path)
    return path


def run_pipeline(spark: SparkSession, config: PipelineConfig, path: str | None, preset: str,
                 fmt: str | None = None, sep: str | None = None, run_date=None, echo=print) -> dict:
    """ingest -> interactions -> train -> recommend -> evaluate, stopping at the first failure."""
    if path is None:
        path, preset = synthetic_input(spark, config), "canonical"
        echo(f"generated a synthetic event log at {path}")
    summary = run_ingest(spark, config, path, preset, fmt=fmt, sep=sep)
    echo("\n".join(summary.lines()))
    counts = run_interactions(spark, config)
    echo(f"tables under {config.warehouse}:")
    for name, n in counts.items():
        echo(f"  {name:<28}{n:>12,} rows")
    return {"inputs": [path], "rows_in": summary.rows_read, "rows_out": counts}
