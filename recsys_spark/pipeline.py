"""The pipeline's steps, each a function of (spark, config) that reads and writes warehouse tables.

The CLI, the spark-submit jobs and the Airflow DAG all call these; none holds logic of its own.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.config import PipelineConfig
from recsys_spark.data import events as ev
from recsys_spark.data import features, indexing, interactions, sequences, splits, synthetic
from recsys_spark.data.sequences import session_item_arrays
from recsys_spark.errors import RecsysError
from recsys_spark.evaluate import probe as pr
from recsys_spark.evaluate.ranking import METRICS_SCHEMA, evaluate, format_table, summary_columns, with_run_info
from recsys_spark.evaluate.sessions import BASELINES, N_QUERIES, SessionScorer, evaluate_sessions
from recsys_spark.models import registry
from recsys_spark.models.base import META_FILE, Recommender
from recsys_spark.recommend import recommend_with_fallback, to_original_ids
from recsys_spark.tracking import Tracker

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


# What run_interactions writes, in this order: the index tables (which only gain rows), then the tables
# derived whole from bronze/events (overwritten).
INDEX_TABLES = (tb.USER_INDEX, tb.ITEM_INDEX)
DERIVED_TABLES = (tb.INTERACTIONS, tb.TRAIN, tb.TEST, tb.SEQUENCES, tb.SESSIONS)


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
        # Ties at one timestamp follow the ids' order, not the index's (tables.ITEM_ORDER).
        order = indexing.id_order(items, tb.ITEM_ID, tb.ITEM_IDX, tb.ITEM_ORDER).persist()
        indexed = (
            weighted.join(pairs.select(tb.USER_ID).distinct(), tb.USER_ID, "left_semi")
            .join(pairs.select(tb.ITEM_ID).distinct(), tb.ITEM_ID, "left_semi")
            .join(users, tb.USER_ID)
            .join(items, tb.ITEM_ID)
            .join(order, tb.ITEM_IDX)
            .persist()
        )
        # The filtered pairs are already the table, by ids: the k-core drops a pair only with its user or
        # item, so the events of its users and items aggregate to the same rows (one join, no new shuffle
        # of the events).
        table = (pairs.join(users, tb.USER_ID).join(items, tb.ITEM_ID).join(order, tb.ITEM_IDX)
                 .select(tb.ITEM_IDX, tb.USER_IDX, tb.WEIGHT, tb.N_EVENTS, tb.FIRST_TS, tb.LAST_TS, tb.ITEM_ORDER))
        written = {tb.INTERACTIONS: tb.overwrite(table, wh, tb.INTERACTIONS)}
        table = tb.read(spark, wh, tb.INTERACTIONS)
        temporal = splits.temporal(indexed, ic.test_fraction)
        by_split = {
            splits.LEAVE_LAST_OUT: splits.leave_last_out(table),
            splits.TEMPORAL: tuple(part.join(order, tb.ITEM_IDX) for part in temporal),
        }
        written[tb.TRAIN] = tb.overwrite(_tagged({k: v[0] for k, v in by_split.items()}), wh, tb.TRAIN,
                                         partition_by=[tb.SPLIT])
        written[tb.TEST] = tb.overwrite(_tagged({k: v[1] for k, v in by_split.items()}), wh, tb.TEST,
                                        partition_by=[tb.SPLIT])
        train = tb.read(spark, wh, tb.TRAIN)
        seqs = {
            name: sequences.user_sequences(train.filter(F.col(tb.SPLIT) == name), ic.max_sequence_length)
            for name in by_split
        }
        written[tb.SEQUENCES] = tb.overwrite(_tagged(seqs), wh, tb.SEQUENCES, partition_by=[tb.SPLIT])
        written[tb.SESSIONS] = tb.overwrite(sequences.sessions(indexed, ic.session_gap_minutes), wh, tb.SESSIONS)
        indexed.unpersist()
        order.unpersist()
    finally:
        weighted.unpersist()
    # The index tables hold earlier days' ids too, so they are counted; the others' rows are their writes'.
    return {**{name: tb.read(spark, wh, name).count() for name in INDEX_TABLES}, **written}


def interactions_are_current(spark: SparkSession, config: PipelineConfig) -> bool:
    """The resume rule for ``run_interactions``: every table it derives is newer than bronze/events.

    Checking one of them is not enough: a job killed after writing silver/interactions but before
    silver/train would leave the previous day's split beside today's interactions. (The index tables
    need no check: they are written first, and only ever gain rows.)
    """
    return tb.is_current(spark, config.warehouse, list(DERIVED_TABLES), [tb.BRONZE_EVENTS])


def run_features(spark: SparkSession, config: PipelineConfig, side_users: str | None = None,
                 side_items: str | None = None) -> dict[str, int]:
    """bronze/events + index tables (+ side files) -> silver/user_features, silver/item_features and
    silver/feature_vocab (``recsys_spark.data.features``), what the feature models train on.

    Features grow only from the events of ``config.split``'s training period (``splits.training_events``):
    the models are scored on what follows it, so later activity must not reach their inputs.

    ``side_users`` / ``side_items`` default to ``features.users_file`` / ``items_file``; with ``features.format``
    ``movielens`` they are MovieLens-100K's ``u.user`` / ``u.item``. Returns the tables' row counts.
    """
    fc = config.features
    paths = {"users": side_users or fc.users_file, "items": side_items or fc.items_file}
    named = {side: path for side, path in paths.items() if path}
    if named and fc.format == "none":
        raise RecsysError(f"side files {sorted(named.values())} given with features.format=none: "
                          "set features.format=movielens")
    readers = {"users": features.read_movielens_users, "items": features.read_movielens_items}
    side = {name: readers[name](spark, path) for name, path in named.items()}
    wh = config.warehouse
    visible = splits.training_events(
        tb.read(spark, wh, tb.BRONZE_EVENTS), tb.read(spark, wh, tb.USER_INDEX),
        read_split(spark, config, tb.TRAIN, config.split), read_split(spark, config, tb.TEST, config.split),
        config.split,
    )
    return features.build_features(spark, wh, side=side, update_vocab=True, events=visible)


def synthetic_input(spark: SparkSession, config: PipelineConfig) -> str:
    """Generate the demo's event log under the warehouse (deterministic per seed) and return its path."""
    path = tb.table_path(config.warehouse, "raw/synthetic_events")
    synthetic.write_events(synthetic.generate_events(spark, config.generate), path)
    return path


# Gold tables are partitioned by run date and model: a re-run (or a parallel task of another model)
# replaces only its own partition, so concurrent writers of different models never conflict.
GOLD_PARTITIONS = [tb.RUN_DATE, tb.MODEL]


@dataclass(frozen=True)
class Run:
    """Identifies one scheduled run: its logical date, its id, and the split models train on."""

    run_date: dt.date
    run_id: str
    split: str

    def __post_init__(self) -> None:
        if not isinstance(self.run_date, dt.date):
            raise RecsysError(f"run date must be a date, got {self.run_date!r}")
        tb.check_run_id(self.run_id)
        tb.check_name(self.split, "split")

    @classmethod
    def of(cls, config: PipelineConfig, run_date: dt.date | None = None, run_id: str | None = None) -> Run:
        day = run_date or dt.datetime.now(dt.UTC).date()
        return cls(day, run_id or day.isoformat(), config.split)

    def where(self, *models: str) -> str:
        """The rows this run owns for these models in a gold table: replaced whole by a re-run.

        SQL text, because Delta's replaceWhere takes nothing else; safe because every part is checked:
        the date is a ``dt.date``, the split a plain name (``__post_init__``), the models too (here; a
        name read back from a table passes this check as well)."""
        if not models:
            raise ValueError("Run.where needs at least one model")
        names = [f"'{tb.check_name(model, 'model name')}'" for model in models]
        which = f"= {names[0]}" if len(names) == 1 else f"IN ({', '.join(names)})"
        return f"{tb.RUN_DATE} = DATE'{self.run_date.isoformat()}' AND {tb.MODEL} {which}"


def read_split(spark: SparkSession, config: PipelineConfig, table: str, split: str) -> DataFrame:
    """The rows of ``split`` (e.g. ``leave_last_out``) of silver/train or silver/test, split column dropped:
    what the steps below train and score on, and what the benchmarks read of a prepared warehouse."""
    return tb.read(spark, config.warehouse, table).filter(F.col(tb.SPLIT) == split).drop(tb.SPLIT)


def _attach(model: Recommender, config: PipelineConfig, run: Run) -> Recommender:
    """Give ``model`` what the run knows: where it may work, the warehouse, the run date, the block size."""
    model.workdir = tb.model_dir(config.warehouse, model.name, run.run_date)  # where it is saved, checkpoints too
    model.warehouse, model.run_date = config.warehouse, run.run_date
    model.users_per_block = config.recommend.users_per_block
    return model


def _with_run(df: DataFrame, run: Run, model: str) -> DataFrame:
    return df.select(
        F.lit(run.run_id).alias(tb.RUN_ID), F.lit(model).alias(tb.MODEL), F.lit(run.split).alias(tb.SPLIT),
        *df.columns, F.lit(run.run_date).alias(tb.RUN_DATE),
    )


def run_train(spark: SparkSession, config: PipelineConfig, model_name: str, run: Run) -> dict[str, Any]:
    """Fit a model on the run's train split, save it, and export its embeddings to gold."""
    train = read_split(spark, config, tb.TRAIN, run.split)
    model = _attach(registry.build(model_name, config), config, run)
    model.fit(train)
    model.save(model.workdir)
    exported = {}
    for table, factors, index, idx_col in [
        (tb.USER_EMBEDDINGS, model.user_factors(), tb.USER_INDEX, tb.USER_IDX),
        (tb.ITEM_EMBEDDINGS, model.item_factors(), tb.ITEM_INDEX, tb.ITEM_IDX),
    ]:
        if factors is None:
            continue
        ids = tb.read(spark, config.warehouse, index)
        rows = _with_run(factors.join(ids, idx_col), run, model_name)
        exported[table] = tb.replace_where(rows, config.warehouse, table, run.where(model_name), GOLD_PARTITIONS)
    return {"model": model_name, "path": model.workdir, "embeddings": exported}


def _load_model(spark: SparkSession, config: PipelineConfig, model_name: str, run: Run) -> Recommender:
    registry.entry(model_name)  # an unknown name says so before the path does
    path = tb.model_dir(config.warehouse, model_name, run.run_date)
    if not os.path.exists(path) and "://" not in path:
        raise RecsysError(f"no trained {model_name} model for run date {run.run_date} at {path}: "
                          f"run `recsys-spark train --model {model_name} --run-date {run.run_date}` first")
    return _attach(registry.load(model_name, spark, path), config, run)


def saved_model_dates(warehouse: str, model_name: str) -> list[dt.date]:
    """The run dates with a complete saved model of ``model_name`` (its ``model.json`` there) under
    ``<warehouse>/models/<model>/``, ascending. Models are written with plain file IO, so this lists a
    local (or ``file://``) directory; on another URI it says it cannot."""
    root = os.path.dirname(tb.model_dir(warehouse, model_name, dt.date.min)).removeprefix("file://")
    if "://" in root:
        raise RecsysError(f"cannot list the saved models under {root}: models live on a file system path")
    dates = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        try:
            day = dt.date.fromisoformat(name)
        except ValueError:
            continue
        if os.path.exists(os.path.join(root, name, META_FILE)):  # a save killed half-way has none
            dates.append(day)
    return sorted(dates)


def latest_model_date(warehouse: str, model_name: str, run_date: dt.date) -> dt.date | None:
    """The run date of the newest complete saved model of ``model_name`` on or before ``run_date`` (a
    backfill never uses a model fitted on later data), or None."""
    return max((d for d in saved_model_dates(warehouse, model_name) if d <= run_date), default=None)


def kept_model_date(config: PipelineConfig, model_name: str, run: Run, refit_every_days: int) -> dt.date | None:
    """The cadence of ``train --refit-every-days N``: the date of the saved model this run keeps instead of
    refitting, or None when it must refit. It keeps the newest complete model of the ``N - 1`` days before
    the run date; with none (the first run, a gap, a save that never finished) it refits, and a model of
    the run date itself is refitted, as a re-run of train always does. Only models that fold in new users
    may skip refits: the days in between, ``recommend --fold-in`` serves the users the kept model never saw.
    """
    if refit_every_days < 1:
        raise RecsysError(f"refit every N days needs N >= 1, got {refit_every_days}")
    registry.require_fold_in(model_name, "skipping refits")
    latest = latest_model_date(config.warehouse, model_name, run.run_date - dt.timedelta(days=1))
    if latest is None or (run.run_date - latest).days >= refit_every_days:
        return None
    return latest


def _load_latest_model(spark: SparkSession, config: PipelineConfig, model_name: str,
                       run: Run) -> tuple[Recommender, dt.date]:
    """The newest saved model on or before the run date, and its date; a clear error when there is none."""
    day = latest_model_date(config.warehouse, model_name, run.run_date)
    if day is None:
        root = os.path.dirname(tb.model_dir(config.warehouse, model_name, run.run_date))
        raise RecsysError(f"no saved {model_name} model on or before {run.run_date} under {root}: "
                          f"run `recsys-spark train --model {model_name}` first")
    path = tb.model_dir(config.warehouse, model_name, day)
    log.info("%s: folding in with the model of %s (%s)", model_name, day, path)
    return _attach(registry.load(model_name, spark, path), config, run), day


def run_recommend(spark: SparkSession, config: PipelineConfig, model_name: str, run: Run,
                  k: int | None = None, user_ids: list[str] | None = None,
                  exclude_item_ids: list[str] | None = None, fold_in: bool = False) -> dict[str, Any]:
    """Top-k for every user (or ``user_ids``) into gold/recommendations, train items filtered out.

    Users the model cannot score get the popularity model's top-k. A re-run for the same run date and
    model replaces exactly its own rows in one commit.

    ``fold_in``: use the newest saved model on or before the run date (not only the run date's own),
    and first fold in the users of this run's silver/train (the run's split) that its fit never saw,
    from their train rows. Why silver/train and not silver/interactions: it is what a refit of the day
    would train on, and the evaluation's test rows stay out of the factors as they do for a fit. Users
    the model knew keep their learnt factors; users without a positive row on a known item get the
    fallback like any user the model cannot score.
    """
    k = k or config.recommend.k
    wh = config.warehouse
    if fold_in:
        registry.require_fold_in(model_name)
        model, model_date = _load_latest_model(spark, config, model_name, run)
    else:
        model, model_date = _load_model(spark, config, model_name, run), run.run_date
    train = read_split(spark, config, tb.TRAIN, run.split)
    seen = train.select(tb.USER_IDX, tb.ITEM_IDX)
    folded = model.fold_in_users(train.select(tb.USER_IDX, tb.ITEM_IDX, tb.WEIGHT)).count() if fold_in else 0
    if fold_in:
        log.info("%s: folded in %d users the model of %s never saw", model_name, folded, model_date)
    users_index, items_index = tb.read(spark, wh, tb.USER_INDEX), tb.read(spark, wh, tb.ITEM_INDEX)
    users = users_index
    if user_ids:
        users = users_index.filter(F.col(tb.USER_ID).isin(user_ids))
        unknown = sorted(set(user_ids) - {r[0] for r in users.select(tb.USER_ID).collect()})
        if unknown:
            log.warning("%d requested users are not in silver/user_index, e.g. %s", len(unknown), unknown[:5])
    exclude = []
    if exclude_item_ids:
        exclude = [r[0] for r in items_index.filter(F.col(tb.ITEM_ID).isin(exclude_item_ids))
                   .select(tb.ITEM_IDX).collect()]
    fallback = registry.model_class("popularity")().fit(train)
    recs = recommend_with_fallback(model, users.select(tb.USER_IDX), k, seen, exclude, fallback)
    rows = _with_run(to_original_ids(recs, users_index, items_index), run, model_name).select(
        tb.RUN_ID, tb.MODEL, tb.SPLIT, tb.USER_ID, tb.RANK, tb.ITEM_ID, tb.SCORE, tb.RUN_DATE
    )
    n = tb.replace_where(rows, wh, tb.RECOMMENDATIONS, run.where(model_name), GOLD_PARTITIONS)
    out = {"model": model_name, "rows_out": n}
    return {**out, "model_date": model_date.isoformat(), "folded_in": folded} if fold_in else out


def run_similar_items(spark: SparkSession, config: PipelineConfig, model_name: str, run: Run,
                      k: int = 20) -> dict[str, Any]:
    """Item-to-item top-k into gold/similar_items (item_id, similar_item_id, score, rank)."""
    wh = config.warehouse
    model = _load_model(spark, config, model_name, run)
    items = tb.read(spark, wh, tb.ITEM_INDEX)
    similar = (
        model.similar_items(k)
        .join(items, tb.ITEM_IDX)
        .join(items.select(F.col(tb.ITEM_IDX).alias(tb.SIMILAR_ITEM_IDX),
                           F.col(tb.ITEM_ID).alias(tb.SIMILAR_ITEM_ID)), tb.SIMILAR_ITEM_IDX)
        .select(tb.ITEM_ID, tb.SIMILAR_ITEM_ID, tb.SCORE, tb.RANK)
    )
    n = tb.replace_where(_with_run(similar, run, model_name), wh, tb.SIMILAR_ITEMS, run.where(model_name),
                         GOLD_PARTITIONS)
    return {"model": model_name, "rows_out": n}


def run_evaluate(spark: SparkSession, config: PipelineConfig, run: Run,
                 models: list[str] | None = None, echo=log.info) -> pd.DataFrame:
    """Score each model's rows of gold/recommendations for this run date on the run's test split.

    ``models``: these, each of which must have recommendations for the run date; None: every model that
    has some, named through ``echo`` with the configured models it skipped. Reads the recommendations
    back from Delta, so the metrics are those of what consumers see. Returns the metrics (model, metric,
    k, value) as a small pandas frame; rows go to gold/metrics.
    """
    wh = config.warehouse
    recs_all = tb.read(spark, wh, tb.RECOMMENDATIONS)
    day = recs_all.filter((F.col(tb.RUN_DATE) == F.lit(run.run_date)) & (F.col(tb.SPLIT) == run.split))
    present = {r[0] for r in day.select(tb.MODEL).distinct().collect()}
    if models is None:
        models = _models_with_recommendations(present, config, run, echo)
    for model_name in models:
        if model_name not in present:
            raise RecsysError(f"no recommendations of {model_name} for run date {run.run_date} in "
                              f"{tb.RECOMMENDATIONS}: run `recsys-spark recommend --model {model_name}` first")
    train = read_split(spark, config, tb.TRAIN, run.split)
    test = read_split(spark, config, tb.TEST, run.split)
    users, items = tb.read(spark, wh, tb.USER_INDEX), tb.read(spark, wh, tb.ITEM_INDEX)
    n_items = items.count()
    frames, rows = [], None
    for model_name in models:
        recs = (
            day.filter(F.col(tb.MODEL) == model_name)
            .join(users, tb.USER_ID).join(items, tb.ITEM_ID)
            .select(tb.USER_IDX, tb.ITEM_IDX, tb.SCORE, tb.RANK)
        )
        # Computed once, to the driver (a few rows per metric), and written from there: writing the lazy
        # frame and then collecting it would score every list twice.
        values = evaluate(recs, test, train, config.evaluate.ks, n_items).toPandas()
        local = [(m, int(k), None if pd.isna(v) else float(v))  # null stays null, not NaN
                 for m, k, v in zip(values[tb.METRIC], values[tb.K], values[tb.VALUE], strict=True)]
        scored = with_run_info(spark.createDataFrame(local, METRICS_SCHEMA), run.run_id, run.run_date, model_name,
                               run.split)
        rows = scored if rows is None else rows.unionByName(scored)
        frames.append(values.assign(model=model_name))
    # Every model's rows in one commit: readers never see a day's metrics half replaced, and each extra
    # model costs no extra Delta commit. Only this split's rows: the session protocol's (split 'sessions') stay.
    tb.replace_where(rows, wh, tb.METRICS, f"{run.where(*models)} AND {tb.SPLIT} = '{run.split}'", GOLD_PARTITIONS)
    return pd.concat(frames, ignore_index=True)


def _models_with_recommendations(present: set[str], config: PipelineConfig, run: Run, echo) -> list[str]:
    """The models of ``present`` (those with rows of this run date and split in gold/recommendations):
    configured ones first, in their order; says which configured models it skips."""
    if not present:
        raise RecsysError(f"no recommendations for run date {run.run_date} ({run.split} split) in "
                          f"{tb.RECOMMENDATIONS}: run `recsys-spark recommend --model <name>` first")
    models = [m for m in config.models if m in present] + sorted(present - set(config.models))
    skipped = [m for m in config.models if m not in present]
    echo(f"evaluating {', '.join(models)}: the models with recommendations for {run.run_date}"
         + (f" (skipped {', '.join(skipped)}: none for this run date)" if skipped else ""))
    return models


SESSIONS_SPLIT = "sessions"  # the split column of the session protocol's rows in gold/metrics


def _session_scorers(spark: SparkSession, config: PipelineConfig, run: Run, models: list[str],
                     train: DataFrame, n_items: int) -> Iterator[tuple[str, SessionScorer]]:
    """(name, scorer) of the protocol's baselines, fitted on the train sessions, then of every model of
    ``models`` that has a session form (``fit_session_scorer``; saved under its model directory's
    ``sessions/``)."""
    lists = session_item_arrays(train, min_length=1).select(tb.ITEMS).collect()
    log.info("session baselines: collected %d train sessions to the driver", len(lists))
    sessions = [row[0] for row in lists]
    for name, fit in BASELINES.items():
        yield name, fit(sessions, n_items)
    for name in models:
        model = _attach(registry.build(name, config), config, run)
        model.workdir = f"{tb.model_dir(config.warehouse, name, run.run_date)}/sessions"
        scorer = model.fit_session_scorer(train, n_items)
        if scorer is None:
            log.info("%s has no session form: left out of the session protocol", name)
            continue
        model.save(model.workdir)
        yield name, scorer


def run_evaluate_sessions(spark: SparkSession, config: PipelineConfig, run: Run,
                          models: list[str] | None = None) -> pd.DataFrame:
    """The session protocol (``recsys_spark.evaluate.sessions``): next-item recall, MRR and NDCG at
    ``evaluate.ks`` over the sessions of the temporal test period, for the protocol's baselines
    (``session_pop``, ``session_itemknn``) and every model among ``models`` (default: the configured
    ones) that has a session form, each trained here on the train period's sessions. Rows go to
    gold/metrics with split ``sessions`` (plus ``n_queries`` at k = 0); returns them as a small pandas frame.
    """
    wh = config.warehouse
    train, test = splits.session_periods(tb.read(spark, wh, tb.SESSIONS), config.interactions.test_fraction)
    train, test = train.persist(), test.persist()
    n_items = tb.read(spark, wh, tb.ITEM_INDEX).agg(F.max(tb.ITEM_IDX)).first()[0] + 1
    frames = []
    try:
        for name, scorer in _session_scorers(spark, config, run, models or config.models, train, n_items):
            values = evaluate_sessions(spark, test, scorer, ks=config.evaluate.ks)
            if not values[N_QUERIES]:
                raise RecsysError("no session of two or more events starts after the temporal cut: "
                                  "the session protocol has nothing to score")
            rows = [(metric, int(k), float(v)) for key, v in values.items() if key != N_QUERIES
                    for metric, k in [key.split("@")]]
            pdf = pd.DataFrame([*rows, (N_QUERIES, 0, float(values[N_QUERIES]))],
                               columns=[tb.METRIC, tb.K, tb.VALUE])
            frame = spark.createDataFrame(pdf, f"{tb.METRIC} string, {tb.K} int, {tb.VALUE} double")
            out = with_run_info(frame, run.run_id, run.run_date, name, SESSIONS_SPLIT)
            tb.replace_where(out, wh, tb.METRICS, f"{run.where(name)} AND {tb.SPLIT} = '{SESSIONS_SPLIT}'",
                             GOLD_PARTITIONS)
            frames.append(pdf.assign(model=name))
    finally:
        train.unpersist()
        test.unpersist()
    return pd.concat(frames, ignore_index=True)


def run_probe(spark: SparkSession, config: PipelineConfig, run: Run, model_name: str, target: str,
              entity: str = "user", positive: str | None = None, folds: int = 5, seed: int = 0,
              reg_param: float = 0.01) -> pr.ProbeResult:
    """Probe a model's embeddings of this run date for a feature column (``recsys_spark.evaluate.probe``)
    and write the scores to gold/metrics (split ``probe``).

    Reads ``gold/<entity>_embeddings`` (the model's rows of this run date and split) and
    ``silver/<entity>_features`` with ``silver/feature_vocab``. A re-run of the same probe (model, entity,
    target) replaces exactly its own rows; other probes' and the ranking rows stay.
    """
    registry.entry(model_name)
    emb_table, feat_table, key, _ = pr.check_entity(entity)
    tb.check_name(target, "target column")
    wh = config.warehouse
    labels, classes, name = pr.target_labels(tb.read(spark, wh, feat_table), entity, target,
                                             features.Vocabulary.read(spark, wh), positive)
    embeddings = tb.read(spark, wh, emb_table)
    mine = embeddings.filter(run.where(model_name)).filter(F.col(tb.SPLIT) == run.split)
    if mine.limit(1).count() == 0:
        day = F.col(tb.RUN_DATE) == F.lit(run.run_date)
        present = sorted(r[0] for r in embeddings.filter(day).select(tb.MODEL).distinct().collect())
        raise RecsysError(f"no {entity} embeddings of {model_name} for run date {run.run_date} in {emb_table} "
                          f"(models with some that day: {', '.join(present) or 'none'}): run `recsys-spark "
                          f"train --model {model_name} --run-date {run.run_date}` first, with a model that "
                          "learns embeddings")
    result = pr.probe(mine.select(key, tb.EMBEDDING), labels, key, classes, entity=entity, target=name,
                      folds=folds, seed=seed, reg_param=reg_param)
    frame = spark.createDataFrame(result.rows(), f"{tb.METRIC} string, {tb.K} int, {tb.VALUE} double")
    rows = with_run_info(frame, run.run_id, run.run_date, model_name, pr.PROBE_SPLIT)
    # Every stat's name, written or not: a binary probe re-run as multi-class loses its stale AUC rows.
    names = ", ".join("'" + pr.metric_name(s, entity, name).replace("'", "''") + "'" for s in pr.STATS)
    tb.replace_where(rows, wh, tb.METRICS,
                     f"{run.where(model_name)} AND {tb.SPLIT} = '{pr.PROBE_SPLIT}' AND {tb.METRIC} IN ({names})",
                     GOLD_PARTITIONS)
    return result


def run_maintain(spark: SparkSession, config: PipelineConfig, names: list[str] | None = None) -> dict[str, Any]:
    """OPTIMIZE then VACUUM each table of ``names`` (default: every table of the contract) that exists.

    Returns ``{"tables": {name: {files_before, files_after, files_vacuumed}}, "missing": [names not in
    the warehouse]}``. ``maintenance.parallel_tables`` tables are done at once (Spark runs the jobs of
    several threads side by side): on a warehouse of small tables each step is a few short Spark jobs
    that leave most cores idle. A missing table is skipped, so an empty warehouse is a no-op. Safe beside
    other jobs (see ``tables.compact_and_vacuum``), but the DAG runs it after the day's publish so that it
    does not slow the day's writes.
    """
    names = tb.check_table_names(names) if names is not None else list(tb.TABLES)
    hours = config.maintenance.vacuum_retention_hours
    present = [name for name in names if tb.exists(spark, config.warehouse, name)]
    missing = [name for name in names if name not in present]

    def maintain(name: str) -> dict[str, int | None]:
        log.info("%s: compacting, then vacuuming files replaced more than %d h ago", name, hours)
        done = tb.compact_and_vacuum(spark, config.warehouse, name, hours)
        log.info("%s: %d -> %d files, %s vacuumed", name, done["files_before"], done["files_after"],
                 done["files_vacuumed"])
        return done

    # One setting of the listing parallelism for all the threads (each vacuum would otherwise set and
    # unset it under the others).
    with tb.listing_parallelism(spark), ThreadPoolExecutor(config.maintenance.parallel_tables) as pool:
        done = dict(zip(present, pool.map(maintain, present), strict=True))
    if missing:
        log.info("not in the warehouse, skipped: %s", ", ".join(missing))
    return {"tables": done, "missing": missing}


def tracker_for(config: PipelineConfig) -> Tracker:
    t = config.tracking
    return Tracker.for_warehouse(config.warehouse, enabled=t.enabled, uri=t.uri, experiment=t.experiment)


def model_is_current(spark: SparkSession, config: PipelineConfig, model_name: str, run: Run) -> bool:
    """The resume rule for a model: its saved model is newer than silver/train, and this run's
    recommendations of it were written after the model."""
    meta = os.path.join(tb.model_dir(config.warehouse, model_name, run.run_date), "model.json")
    train_changed = tb.last_commit_time(spark, config.warehouse, tb.TRAIN)
    recs_written = tb.last_commit_time(spark, config.warehouse, tb.RECOMMENDATIONS)
    if "://" in meta or not os.path.exists(meta) or train_changed is None or recs_written is None:
        return False
    saved = dt.datetime.fromtimestamp(os.path.getmtime(meta), dt.UTC).replace(tzinfo=None)
    train_changed = train_changed.replace(tzinfo=None)
    recs_written = recs_written.replace(tzinfo=None)
    has_rows = tb.read(spark, config.warehouse, tb.RECOMMENDATIONS).filter(run.where(model_name)).limit(1).count()
    return saved > train_changed and recs_written >= saved and has_rows > 0


def run_pipeline(spark: SparkSession, config: PipelineConfig, path: str | None, preset: str,
                 fmt: str | None = None, sep: str | None = None, run: Run | None = None,
                 echo=print, force: bool = False, tracker=None) -> dict[str, Any]:
    """ingest -> interactions -> train -> recommend -> evaluate, stopping at the first failure.

    A re-run resumes: interactions are rebuilt only when bronze/events changed after them, and a
    model is trained and recommended again only when its outputs for the run date are missing or older
    than silver/train. ``force`` reruns every step.
    """
    run = run or Run.of(config)
    tracker = tracker or tracker_for(config)
    params = {"run_date": run.run_date.isoformat(), "split": run.split, "models": ",".join(config.models),
              "input": path or "synthetic", "preset": preset,
              "interactions": config.interactions.model_dump(mode="json"), "evaluate.ks": config.evaluate.ks}
    with tracker.pipeline_run(run.run_id, params):
        if path is None:
            path, preset = synthetic_input(spark, config), "canonical"
            echo(f"generated a synthetic event log at {path}")
        summary = run_ingest(spark, config, path, preset, fmt=fmt, sep=sep)
        echo("\n".join(summary.lines()))
        if not force and interactions_are_current(spark, config):
            echo("interactions: up to date with bronze/events, kept")
            counts = {name: tb.read(spark, config.warehouse, name).count() for name in (tb.INTERACTIONS, tb.TRAIN)}
        else:
            counts = run_interactions(spark, config)
        if registry.need_features(config.models):
            counts.update(run_features(spark, config))
        echo(f"tables under {config.warehouse}:")
        for name, n in counts.items():
            echo(f"  {name:<28}{n:>12,} rows")
        tracker.log_metrics({"rows_read": summary.rows_read, "rows_accepted": summary.accepted,
                             **{f"rows.{name}": n for name, n in counts.items()}})
        models = registry.recommend_order(config.models, config.model_params)  # re-rankers after their input
        for model_name in models:
            if not force and model_is_current(spark, config, model_name, run):
                echo(f"{model_name}: model and recommendations for {run.run_date} are up to date, kept")
                continue
            started = time.monotonic()
            with tracker.model_run(model_name, config.model_params.get(model_name, {}), run_id=run.run_id):
                trained = run_train(spark, config, model_name, run)
                tracker.log_model_dir(trained["path"])
                recs = run_recommend(spark, config, model_name, run)
                tracker.log_metrics({"train_recommend_seconds": time.monotonic() - started,
                                     "recommendations": recs["rows_out"]})
            echo(f"{model_name}: trained and wrote {recs['rows_out']:,} recommendations "
                 f"({time.monotonic() - started:.1f} s)")
        metrics = run_evaluate(spark, config, run, models)
        tracker.log_evaluation(metrics)
        echo(f"\nmetrics on the {run.split} split (run {run.run_id}):")
        echo(format_table(metrics, summary_columns(metrics) or None))
        if config.evaluate.sessions:
            session_metrics = run_evaluate_sessions(spark, config, run, models)
            echo(f"\nnext-item metrics on the sessions after the temporal cut (run {run.run_id}):")
            echo(format_table(session_metrics))
    return {"inputs": [path], "rows_in": summary.rows_read, "rows_out": counts, "models": config.models}
