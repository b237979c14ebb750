"""The report's numbers: aggregated on Spark from the warehouse's Delta tables, collected to the driver.

``collect`` reads gold/metrics for one run (``latest_run_id`` picks the latest), and, where they exist,
gold/recommendations, bronze/events, silver/interactions and gold/item_embeddings, and brings back only
the aggregates (a few hundred rows at most: one per metric, per day and event type, per power-of-two
bucket from ``count_buckets``), the training histories of the run's deep models, and each model's item
embeddings projected to 2-D by Spark MLlib's PCA (at most ``MAP_POINTS`` items per model, coloured by
genre or category: ``item_map``), all held in a ``ReportData``. The embedding probes' rows of
gold/metrics (split ``probe``, ``recsys_spark.evaluate.probe``) are kept apart from the ranking metrics. It
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
from recsys_spark.data.features import MOVIELENS_GENRES, UNKNOWN, Vocabulary
from recsys_spark.errors import RecsysError
from recsys_spark.evaluate import probe as pr
from recsys_spark.models.base import training_record

log = logging.getLogger(__name__)

_BUCKET = "bucket"
# The torch models' training summary (model.json "training"), as the report's table shows it.
TRAINING_COLUMNS = ["epochs_run", "best_epoch", "steps_to_best", "steps_per_epoch", "stopped_early", "train_seconds",
                    "seconds_to_best"]
COUNT = "count"  # the count column of the collected aggregates (events, users, items per bucket)
# The embedding probes' table: one row per model and target, these columns.
PROBE_COLUMNS = [tb.MODEL, "entity", "target", pr.AUC, pr.ACCURACY, pr.MAJORITY_ACCURACY, pr.N_ROWS,
                 pr.N_CLASSES, pr.N_FOLDS]
# The item maps: at most this many items per model (a hash sample, the same items for every model), the
# most frequent groups coloured, the rest "other"; the columns of each model's frame.
MAP_POINTS = 3000
MAP_GROUPS = 8
OTHER, NO_GROUP = "other", "unknown"
MAP_X, MAP_Y, MAP_GROUP = "x", "y", "group"


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
    probes: pd.DataFrame | None = None                      # PROBE_COLUMNS: the embedding probes' scores
    item_maps: dict[str, pd.DataFrame] = field(default_factory=dict)  # model -> item_id, x, y, group
    map_variance: dict[str, list[float]] = field(default_factory=dict)  # model -> variance share of PC1, PC2
    map_groups: str | None = None                           # what colours the maps (e.g. "first genre")

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
            "probes": records(self.probes), "item_maps": {m: records(f) for m, f in self.item_maps.items()},
            "map_variance": self.map_variance, "map_groups": self.map_groups,
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
    probes = metrics[metrics[tb.SPLIT] == pr.PROBE_SPLIT]
    metrics = metrics[metrics[tb.SPLIT] != pr.PROBE_SPLIT]
    rank = {m: i for i, m in enumerate(_model_order(metrics))}
    metrics = (metrics.assign(_rank=metrics[tb.MODEL].map(rank))
               .sort_values(["_rank", tb.SPLIT, tb.METRIC, tb.K]).drop(columns="_rank").reset_index(drop=True))
    data = ReportData(warehouse=warehouse, run_id=run_id, metrics=metrics, probes=probe_table(probes))
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
    if _have(spark, warehouse, tb.ITEM_EMBEDDINGS, data):
        _item_maps(spark, warehouse, tb.read(spark, warehouse, tb.ITEM_EMBEDDINGS).filter(F.col(tb.RUN_ID) == run_id),
                   data)
    return data


def probe_table(rows: pd.DataFrame) -> pd.DataFrame | None:
    """The probes' rows of gold/metrics (metric ``probe_<stat>.<entity>.<target>``) as one row per model,
    entity and target with a column per stat (PROBE_COLUMNS); None when there are none."""
    parsed = [(r[tb.MODEL], *pr.parse_metric(r[tb.METRIC]), r[tb.VALUE]) for _, r in rows.iterrows()
              if pr.parse_metric(r[tb.METRIC])]
    if not parsed:
        return None
    long = pd.DataFrame(parsed, columns=[tb.MODEL, "stat", "entity", "target", tb.VALUE])
    wide = long.pivot_table(index=[tb.MODEL, "entity", "target"], columns="stat", values=tb.VALUE,
                            aggfunc="first").reset_index()
    for column in PROBE_COLUMNS:
        if column not in wide.columns:
            wide[column] = float("nan")
    return wide[PROBE_COLUMNS].sort_values([tb.MODEL, "entity", "target"]).reset_index(drop=True)


def item_groups(spark: SparkSession, warehouse: str) -> tuple[DataFrame, str] | None:
    """(item_id, group) to colour the item maps, and what the group is: the item's first MovieLens genre
    (u.item's order, ``unknown`` skipped) when silver/item_features has the genre flags, else its category;
    None without the feature tables or either field."""
    if not (tb.exists(spark, warehouse, tb.ITEM_FEATURES) and tb.exists(spark, warehouse, tb.FEATURE_VOCAB)):
        return None
    features, vocab = tb.read(spark, warehouse, tb.ITEM_FEATURES), Vocabulary.read(spark, warehouse)
    flags = [(g, vocab.lookup(f"{tb.GENRE_PREFIX}{g}", "1")) for g in MOVIELENS_GENRES[1:]
             if f"{tb.GENRE_PREFIX}{g}" in features.columns]
    flags = [(g, index) for g, index in flags if index != UNKNOWN]
    if flags:
        first = F.coalesce(*[F.when(F.col(f"{tb.GENRE_PREFIX}{g}") == index, F.lit(g)) for g, index in flags])
        return features.select(tb.ITEM_ID, first.alias(MAP_GROUP)), "first genre"
    names = vocab.index.get(tb.CATEGORY, {})
    if tb.CATEGORY in features.columns and names:
        decode = F.create_map(*[F.lit(x) for value, index in sorted(names.items()) for x in (index, value)])
        return features.select(tb.ITEM_ID, decode[F.col(tb.CATEGORY)].alias(MAP_GROUP)), "category"
    return None


def _item_maps(spark: SparkSession, warehouse: str, embeddings: DataFrame, data: ReportData) -> None:
    """Each model's item embeddings of the run projected on their first two principal components (Spark
    MLlib's PCA, fitted on all its items), then a hash sample of at most MAP_POINTS items collected."""
    from pyspark.ml.feature import PCA
    from pyspark.ml.functions import array_to_vector, vector_to_array

    groups = item_groups(spark, warehouse)
    present = {r[0] for r in embeddings.select(tb.MODEL).distinct().collect()}
    models = [m for m in data.models if m in present] + sorted(present - set(data.models))
    for model in models:
        vectors = (embeddings.filter(F.col(tb.MODEL) == model)
                   .select(tb.ITEM_ID, array_to_vector(tb.EMBEDDING).alias("_vector")))
        if (embeddings.filter(F.col(tb.MODEL) == model).select(F.size(tb.EMBEDDING)).first()[0] or 0) < 2:
            data.notes.append(f"{model}'s item embeddings have fewer than 2 dimensions: no map")
            continue
        pca = PCA(k=2, inputCol="_vector", outputCol="_pc").fit(vectors)
        points = (pca.transform(vectors).select(tb.ITEM_ID, vector_to_array("_pc").alias("_pc"))
                  .orderBy(F.xxhash64(tb.ITEM_ID), tb.ITEM_ID).limit(MAP_POINTS))
        if groups is not None:
            points = points.join(groups[0], tb.ITEM_ID, "left")
        frame = _collect(points, f"{model}'s item map (2-D PCA, at most {MAP_POINTS} items)")
        frame[MAP_X] = [float(p[0]) for p in frame["_pc"]]
        frame[MAP_Y] = [float(p[1]) for p in frame["_pc"]]
        if MAP_GROUP not in frame.columns:
            frame[MAP_GROUP] = None
        data.item_maps[model] = frame[[tb.ITEM_ID, MAP_X, MAP_Y, MAP_GROUP]]
        data.map_variance[model] = [float(v) for v in pca.explainedVariance.toArray()]
    if not data.item_maps:
        return
    # One palette for every map: the groups most frequent over all the maps' items, the rest "other".
    every = pd.concat([f[MAP_GROUP] for f in data.item_maps.values()]).fillna(NO_GROUP)
    top = [g for g in every.value_counts().index if g not in (NO_GROUP, OTHER)][:MAP_GROUPS]
    for model, frame in data.item_maps.items():
        group = frame[MAP_GROUP].fillna(NO_GROUP)
        data.item_maps[model] = frame.assign(**{MAP_GROUP: group.where(group.isin([*top, NO_GROUP]), OTHER)})
    data.map_groups = groups[1] if groups is not None else None


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
