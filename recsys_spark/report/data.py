"""The report's numbers: aggregated on Spark from the warehouse's Delta tables, collected to the driver.

``collect`` reads gold/metrics for one run (``latest_run_id`` picks the latest), and, where they exist,
gold/recommendations, bronze/events and silver/interactions, and brings back only the aggregates (a few
hundred rows at most: one per metric, per day and event type, per power-of-two bucket from
``count_buckets``) plus the training histories of the run's deep models, all held in a ``ReportData``. It
is kept apart from the plots and the page so that the report runs Spark jobs in this module only; everything
downstream works on pandas frames and dicts.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys_spark import metrics as M
from recsys_spark import tables as tb
from recsys_spark.errors import RecsysError
from recsys_spark.models.base import training_record

log = logging.getLogger(__name__)

_BUCKET = "bucket"
# The torch models' training summary (model.json "training"), as the report's table shows it.
TRAINING_COLUMNS = ["epochs_run", "best_epoch", "steps_to_best", "steps_per_epoch", "stopped_early", "train_seconds"]
COUNT = "count"  # the count column of the collected aggregates (events, users, items per bucket)


@dataclass
class ReportData:
    """Everything the report shows, already small: pandas frames of aggregates and plain dicts."""

    warehouse: str
    run_id: str
    metrics: pd.DataFrame                                   # run_date, model, split, metric, k, value
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)   # model -> epochs
    training: pd.DataFrame | None = None                    # model, epochs_run, best_epoch, steps_to_best, ...
    recommendations: pd.DataFrame | None = None             # model, split, users, rows, items
    events_per_day: pd.DataFrame | None = None              # event_date, event_type, count
    active_per_day: pd.DataFrame | None = None              # event_date, users, items
    user_buckets: pd.DataFrame | None = None                # bucket, count, lo, hi (interactions per user)
    item_buckets: pd.DataFrame | None = None                # bucket, count, lo, hi (interactions per item)
    profile: dict[str, Any] = field(default_factory=dict)   # totals: events, users, items, dates, rejected
    notes: list[str] = field(default_factory=list)          # tables that were missing, and so on

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(self.metrics[tb.MODEL]))

    def to_json(self) -> dict[str, Any]:
        def records(frame: pd.DataFrame | None) -> list[dict[str, Any]] | None:
            return None if frame is None else json.loads(frame.to_json(orient="records", date_format="iso"))

        return {
            "warehouse": self.warehouse, "run_id": self.run_id, "models": self.models,
            "metrics": records(self.metrics), "histories": self.histories, "training": records(self.training),
            "recommendations": records(self.recommendations), "events_per_day": records(self.events_per_day),
            "active_per_day": records(self.active_per_day), "interactions_per_user": records(self.user_buckets),
            "interactions_per_item": records(self.item_buckets), "profile": self.profile, "notes": self.notes,
        }


def collect(spark: SparkSession, warehouse: str, run_id: str | None = None) -> ReportData:
    """Aggregate the report's numbers on Spark and bring back only the aggregates."""
    if not tb.exists(spark, warehouse, tb.METRICS):
        raise RecsysError(
            f"no {tb.METRICS} table under {warehouse}: nothing to report; run `recsys-spark pipeline` "
            f"(or train, recommend and evaluate) with --warehouse {warehouse} first"
        )
    all_metrics = tb.read(spark, warehouse, tb.METRICS)
    run_id = run_id or latest_run_id(all_metrics)
    metrics = _collect(
        all_metrics.filter(F.col(tb.RUN_ID) == run_id)
        .select(tb.RUN_DATE, tb.MODEL, tb.SPLIT, tb.METRIC, tb.K, tb.VALUE), f"{tb.METRICS} of run {run_id}"
    )
    if metrics.empty:
        recent = [r[tb.RUN_ID] for r in _recent_runs(all_metrics, 10)]
        raise RecsysError(f"run {run_id!r} has no rows in {tb.METRICS}; recent runs: {', '.join(recent)}")
    rank = {m: i for i, m in enumerate(_model_order(metrics))}
    metrics = (metrics.assign(_rank=metrics[tb.MODEL].map(rank))
               .sort_values(["_rank", tb.SPLIT, tb.METRIC, tb.K]).drop(columns="_rank").reset_index(drop=True))
    data = ReportData(warehouse=warehouse, run_id=run_id, metrics=metrics)
    data.histories, data.training = _training(warehouse, metrics)

    if _have(spark, warehouse, tb.RECOMMENDATIONS, data):
        recs = tb.read(spark, warehouse, tb.RECOMMENDATIONS).filter(F.col(tb.RUN_ID) == run_id)
        data.recommendations = _collect(
            recs.groupBy(tb.MODEL, tb.SPLIT).agg(
                F.countDistinct(tb.USER_ID).alias("users"), F.count(F.lit(1)).alias("rows"),
                F.countDistinct(tb.ITEM_ID).alias("items"),
            ).orderBy(tb.MODEL, tb.SPLIT), f"{tb.RECOMMENDATIONS} summary",
        )
    if _have(spark, warehouse, tb.BRONZE_EVENTS, data):
        events = tb.read(spark, warehouse, tb.BRONZE_EVENTS)
        data.events_per_day = _collect(
            events.groupBy(tb.EVENT_DATE, tb.EVENT_TYPE).agg(F.count(F.lit(1)).alias(COUNT))
            .orderBy(tb.EVENT_DATE, tb.EVENT_TYPE), "events per day and type",
        )
        data.active_per_day = _collect(
            events.groupBy(tb.EVENT_DATE).agg(F.countDistinct(tb.USER_ID).alias("users"),
                                              F.countDistinct(tb.ITEM_ID).alias("items"))
            .orderBy(tb.EVENT_DATE), "distinct users and items per day",
        )
        totals = events.agg(F.countDistinct(tb.USER_ID), F.countDistinct(tb.ITEM_ID)).first()
        per_day = data.events_per_day
        data.profile.update({
            "events": int(per_day[COUNT].sum()), "users": int(totals[0]), "items": int(totals[1]),
            "first_day": str(per_day[tb.EVENT_DATE].min()) if len(per_day) else None,
            "last_day": str(per_day[tb.EVENT_DATE].max()) if len(per_day) else None,
        })
        if tb.exists(spark, warehouse, tb.BRONZE_REJECTED):
            rejected = tb.read(spark, warehouse, tb.BRONZE_REJECTED).agg(F.sum("n_rows")).first()[0]
            data.profile["rejected"] = int(rejected or 0)
    if _have(spark, warehouse, tb.INTERACTIONS, data):
        pairs = tb.read(spark, warehouse, tb.INTERACTIONS)
        data.user_buckets = _collect(count_buckets(pairs, tb.USER_IDX), "interactions per user, by bucket")
        data.item_buckets = _collect(count_buckets(pairs, tb.ITEM_IDX), "interactions per item, by bucket")
        data.profile.update({
            "interactions": int(data.user_buckets["total"].sum()),
            "interaction_users": int(data.user_buckets[COUNT].sum()),
            "interaction_items": int(data.item_buckets[COUNT].sum()),
        })
    return data


def latest_run_id(metrics: DataFrame) -> str:
    """The run with the greatest run date in gold/metrics (ties: the greatest run id)."""
    latest = _recent_runs(metrics, 1)
    if not latest:
        raise RecsysError(f"{tb.METRICS} is empty: nothing to report")
    return latest[0][tb.RUN_ID]


def _recent_runs(metrics: DataFrame, n: int) -> list:
    return (metrics.groupBy(tb.RUN_ID).agg(F.max(tb.RUN_DATE).alias(tb.RUN_DATE))
            .orderBy(F.desc(tb.RUN_DATE), F.desc(tb.RUN_ID)).limit(n).collect())


def count_buckets(pairs: DataFrame, key: str) -> DataFrame:
    """How many ``key`` values (users or items) have 1, 2-3, 4-7, ... interactions: power-of-two buckets.

    Returns (bucket, count, total, lo, hi): bucket b holds keys with 2**b <= interactions < 2**(b+1);
    ``total`` sums their interactions; lo/hi are the bucket's bounds.
    """
    per_key = pairs.groupBy(key).agg(F.count(F.lit(1)).alias("n"))
    bucket = F.length(F.bin(F.col("n"))) - 1   # floor(log2(n)), exactly: the bit length of n, minus one
    return (per_key.groupBy(bucket.alias(_BUCKET))
            .agg(F.count(F.lit(1)).alias(COUNT), F.sum("n").alias("total"))
            .withColumn("lo", F.pow(F.lit(2), F.col(_BUCKET)).cast("long"))
            .withColumn("hi", (F.pow(F.lit(2), F.col(_BUCKET) + 1) - 1).cast("long"))
            .orderBy(_BUCKET))


def _collect(df: DataFrame, what: str) -> pd.DataFrame:
    """An explicit, logged collect of a small aggregate."""
    frame = df.toPandas()
    log.info("collected %d rows to the driver: %s", len(frame), what)
    return frame


def _have(spark: SparkSession, warehouse: str, name: str, data: ReportData) -> bool:
    if tb.exists(spark, warehouse, name):
        return True
    data.notes.append(f"{name} not found under {warehouse} (written by `recsys-spark "
                      f"{tb.PRODUCER.get(name, '?')}`): its section is left out")
    return False


def _model_order(metrics: pd.DataFrame) -> list[str]:
    """Models by their best NDCG at the smallest K, best first (alphabetical without NDCG)."""
    models = sorted(set(metrics[tb.MODEL]))
    ndcg = metrics[metrics[tb.METRIC] == M.NDCG]
    if ndcg.empty:
        return models
    first = ndcg[ndcg[tb.K] == ndcg[tb.K].min()].groupby(tb.MODEL)[tb.VALUE].max()
    return sorted(models, key=lambda m: (-first.get(m, -math.inf), m))


def _training(warehouse: str, metrics: pd.DataFrame) -> tuple[dict[str, list[dict[str, Any]]], pd.DataFrame | None]:
    """Each run model's per-epoch history and its training summary (torch models keep both; others do not)."""
    histories, rows = {}, []
    for model, run_rows in metrics.groupby(tb.MODEL, sort=False):
        history, summary = training_record(tb.model_dir(warehouse, str(model), run_rows[tb.RUN_DATE].max()))
        if history:
            histories[str(model)] = history
        if summary:
            rows.append({tb.MODEL: str(model), **{k: summary.get(k) for k in TRAINING_COLUMNS}})
    return histories, (pd.DataFrame(rows, columns=[tb.MODEL, *TRAINING_COLUMNS]) if rows else None)
