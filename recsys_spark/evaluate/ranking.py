"""Offline evaluation on Spark: ranking metrics, catalogue coverage, popularity (the protocol is in
docs/ARCHITECTURE.md, "Data flow").

Per-user metrics are the functions of ``recsys_spark.metrics``, run inside ``mapInPandas`` on the
executors; each partition sends only its per-metric sums on, so no recommendation list ever reaches
the driver. Every model of a run is scored by this one function, which is what makes their rows in
``gold/metrics`` comparable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from functools import partial, reduce

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from recsys_spark import metrics as M
from recsys_spark import tables as tb
from recsys_spark.errors import RecsysError
from recsys_spark.tables import require_columns

log = logging.getLogger(__name__)

COVERAGE = "coverage"
MEAN_POPULARITY = "mean_popularity"
N_USERS = "n_users"

METRICS_SCHEMA = f"{tb.METRIC} string, {tb.K} int, {tb.VALUE} double"

# How format_table names and orders the metrics.
DISPLAY_NAMES = {
    M.NDCG: "NDCG",
    M.HR: "HR",
    M.RECALL: "Recall",
    M.PRECISION: "Precision",
    M.MAP: "MAP",
    M.MRR: "MRR",
    COVERAGE: "coverage",
    MEAN_POPULARITY: "popularity",
    N_USERS: "users",
}

# Working column names, private to this module.
_RANKED = "_ranked"
_RELEVANT = "_relevant"
_TOTAL = "_total"
_COUNT = "_count"
_POPULARITY = "_popularity"
_ROW = "_row"


def evaluate(recs: DataFrame, test: DataFrame, train: DataFrame, ks: list[int], n_items: int) -> DataFrame:
    """Score recommendations against held-out items: a small frame of (metric, k, value).

    Parameters
    ----------
    recs : (user_idx, item_idx, score, rank) rows, rank 1 the best, at least ``max(ks)`` per user for
        the deeper cut-offs to mean anything; only ``rank`` orders a list (score ties were already broken
        by the recommender). Rows past ``max(ks)`` are ignored.
    test : (user_idx, item_idx) held-out items; other columns are ignored.
    train : (user_idx, item_idx) training interactions, used only for item popularity.
    ks : cut-offs, e.g. [10, 20, 100].
    n_items : catalogue size, the denominator of coverage.

    Returns
    -------
    DataFrame (metric string, k int, value double) with, at each k:

    - ``hr``, ``recall``, ``precision``, ``ndcg``, ``map``, ``mrr``: averages over the users with at
      least one test item. Such a user without recommendations counts with 0 (a model that cannot
      serve a user is penalised, not excused); users with recommendations but no test items are left
      out, since nothing can be found for them.
    - ``coverage``: distinct items in the top-k of all users in ``recs`` / ``n_items``.
    - ``mean_popularity``: mean, over all (user, item) pairs in the top-k of ``recs``, of the item's
      train popularity (share of train users who interacted with it; 0 for items absent from train).

    and one row ``n_users`` at ``k = 0`` (it does not depend on k): the number of users averaged over.
    Values are null when there is nothing to average (no test users, or no recommendations).
    """
    require_columns(recs, [tb.USER_IDX, tb.ITEM_IDX, tb.RANK], "recommendations")
    require_columns(test, [tb.USER_IDX, tb.ITEM_IDX], "test interactions")
    require_columns(train, [tb.USER_IDX, tb.ITEM_IDX], "train interactions")
    try:
        cutoffs = sorted({int(k) for k in M.check_ks(ks)})
    except ValueError as err:
        raise RecsysError(str(err)) from err
    if n_items <= 0:
        raise RecsysError(f"n_items must be positive, got {n_items}")
    log.info("evaluating at k in %s over a catalogue of %d items", cutoffs, n_items)

    top = recs.filter(F.col(tb.RANK) <= max(cutoffs)).select(tb.USER_IDX, tb.ITEM_IDX, tb.RANK)
    frames = [*_ranking_metrics(top, test, cutoffs), _catalogue_metrics(top, train, cutoffs, n_items)]
    return reduce(DataFrame.unionByName, frames)


def _ranking_metrics(top: DataFrame, test: DataFrame, ks: list[int]) -> list[DataFrame]:
    """Per-user metrics averaged over test users, and how many test users there are."""
    by_rank = F.sort_array(F.collect_list(F.struct(tb.RANK, tb.ITEM_IDX)))
    ranked = top.groupBy(tb.USER_IDX).agg(F.transform(by_rank, lambda r: r[tb.ITEM_IDX]).alias(_RANKED))
    relevant = (
        test.select(tb.USER_IDX, tb.ITEM_IDX)
        .distinct()
        .groupBy(tb.USER_IDX)
        .agg(F.collect_list(tb.ITEM_IDX).alias(_RELEVANT))
    )
    # Left join from the test side: test users without recommendations stay, with a null list.
    per_user = relevant.join(ranked, tb.USER_IDX, "left").select(_RANKED, _RELEVANT)
    sums = per_user.mapInPandas(
        partial(_sum_user_metrics, ks=tuple(ks)),
        f"{tb.METRIC} string, {tb.K} int, {_TOTAL} double, {_COUNT} long",
    )
    means = sums.groupBy(tb.METRIC, tb.K).agg((F.sum(_TOTAL) / F.sum(_COUNT)).alias(tb.VALUE))
    n_users = relevant.agg(
        F.lit(N_USERS).alias(tb.METRIC),
        F.lit(0).cast("int").alias(tb.K),
        F.count(F.lit(1)).cast("double").alias(tb.VALUE),
    )
    return [means, n_users]


def _sum_user_metrics(batches: Iterator[pd.DataFrame], ks: tuple[int, ...]) -> Iterator[pd.DataFrame]:
    """One partition's sum of each metric at each k over its users, and its user count."""
    totals = {name: np.zeros(len(ks)) for name in M.RANKING_METRICS}
    n_users = 0
    for batch in batches:
        for ranked, relevant in zip(batch[_RANKED], batch[_RELEVANT], strict=True):
            scores = M.user_metrics([] if ranked is None else ranked, relevant, ks)
            for name in M.RANKING_METRICS:
                totals[name] += scores[name]
            n_users += 1
    yield pd.DataFrame(
        {
            tb.METRIC: [name for name in M.RANKING_METRICS for _ in ks],
            tb.K: np.array([k for _ in M.RANKING_METRICS for k in ks], dtype=np.int32),
            _TOTAL: np.concatenate([totals[name] for name in M.RANKING_METRICS]),
            _COUNT: np.full(len(M.RANKING_METRICS) * len(ks), n_users, dtype=np.int64),
        }
    )


def _catalogue_metrics(top: DataFrame, train: DataFrame, ks: list[int], n_items: int) -> DataFrame:
    """Coverage and mean train popularity of the top-k of every user, all ks in one aggregation."""
    pairs = train.select(tb.USER_IDX, tb.ITEM_IDX).distinct()
    n_train_users = pairs.agg(F.countDistinct(tb.USER_IDX).alias("_n_train_users"))
    popularity = (
        pairs.groupBy(tb.ITEM_IDX)
        .agg(F.count(F.lit(1)).alias("_item_users"))
        .crossJoin(n_train_users)
        .select(tb.ITEM_IDX, (F.col("_item_users") / F.col("_n_train_users")).alias(_POPULARITY))
    )
    scored = top.join(popularity, tb.ITEM_IDX, "left").fillna(0.0, subset=[_POPULARITY])
    aggs = []
    for k in ks:
        in_top = F.col(tb.RANK) <= k
        aggs.append(F.countDistinct(F.when(in_top, F.col(tb.ITEM_IDX))).alias(f"_coverage_{k}"))
        aggs.append(F.avg(F.when(in_top, F.col(_POPULARITY))).alias(f"_popularity_{k}"))
    rows = []
    for k in ks:
        for metric, value in [
            (COVERAGE, F.col(f"_coverage_{k}") / F.lit(float(n_items))),
            (MEAN_POPULARITY, F.col(f"_popularity_{k}")),
        ]:
            rows.append(
                F.struct(
                    F.lit(metric).alias(tb.METRIC),
                    F.lit(k).cast("int").alias(tb.K),
                    value.cast("double").alias(tb.VALUE),
                )
            )
    return scored.agg(*aggs).select(F.explode(F.array(*rows)).alias(_ROW)).select(f"{_ROW}.*")


def with_run_info(metrics: DataFrame, run_id: str, run_date, model: str, split: str) -> DataFrame:
    """The ``gold/metrics`` row shape: (run_id, run_date, model, split, metric, k, value).

    ``run_date`` is a ``datetime.date`` or an ISO date string; it is stored as a date.
    """
    return metrics.select(
        F.lit(run_id).alias(tb.RUN_ID),
        F.lit(run_date).cast("date").alias(tb.RUN_DATE),
        F.lit(model).alias(tb.MODEL),
        F.lit(split).alias(tb.SPLIT),
        tb.METRIC,
        tb.K,
        tb.VALUE,
    )


# The terminal's default view: the headline metrics at the smallest K plus recall/coverage further down.
SUMMARY_COLUMNS = ["ndcg@10", "hr@10", "recall@20", "map@10", "mrr@10", "ndcg@100", "coverage@10",
                   "mean_popularity@10", "n_users@0"]


def summary_columns(metrics: pd.DataFrame) -> list[str]:
    """SUMMARY_COLUMNS that ``metrics`` (a long frame of metric, k, value) actually holds."""
    present = {f"{m}@{int(k)}" for m, k in zip(metrics[tb.METRIC], metrics[tb.K], strict=True)}
    return [c for c in SUMMARY_COLUMNS if c in present]


def format_table(metrics: Mapping[str, DataFrame | pd.DataFrame] | DataFrame | pd.DataFrame,
                 columns: list[str] | None = None, digits: int = 4) -> str:
    """A plain-text comparison table for the terminal, one row per model.

    Parameters
    ----------
    metrics : ``{model: metrics frame}`` (Spark or pandas, as ``evaluate`` returns), or one frame with a
        ``model`` column (e.g. rows of ``gold/metrics``). Spark frames are small here and are collected.
    columns : ``"metric@k"`` names to show, e.g. ``["ndcg@10", "hr@10"]``; by default every metric
        present, NDCG first, each at every k, then the user count.
    digits : decimals of the values.

    Examples
    --------
    >>> frame = pd.DataFrame({"model": ["als"], "metric": ["hr"], "k": [10], "value": [0.25]})
    >>> print(format_table(frame))
    model   HR@10
    -----  ------
    als    0.2500
    """
    long = _long_pandas(metrics)
    cells = {(row[tb.MODEL], f"{row[tb.METRIC]}@{int(row[tb.K])}"): row[tb.VALUE] for _, row in long.iterrows()}
    if columns is None:
        order = list(DISPLAY_NAMES)
        present = long[[tb.METRIC, tb.K]].drop_duplicates()
        present = present.assign(
            _order=[order.index(m) if m in order else len(order) for m in present[tb.METRIC]]
        ).sort_values(["_order", tb.METRIC, tb.K])
        columns = [f"{m}@{int(k)}" for m, k in zip(present[tb.METRIC], present[tb.K], strict=True)]

    header = [tb.MODEL, *(_label(c) for c in columns)]
    rows = []
    for model in pd.unique(long[tb.MODEL]):
        rows.append([str(model), *(_cell(cells.get((model, c)), c, digits) for c in columns)])
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def line(values: list[str]) -> str:
        first = values[0].ljust(widths[0])
        rest = [v.rjust(w) for v, w in zip(values[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _long_pandas(metrics: Mapping[str, DataFrame | pd.DataFrame] | DataFrame | pd.DataFrame) -> pd.DataFrame:
    """(model, metric, k, value) as pandas, whichever of the accepted inputs was given."""
    if isinstance(metrics, Mapping):
        parts = [_to_pandas(frame).assign(**{tb.MODEL: model}) for model, frame in metrics.items()]
        long = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[tb.MODEL])
    else:
        long = _to_pandas(metrics)
    missing = [c for c in (tb.MODEL, tb.METRIC, tb.K, tb.VALUE) if c not in long.columns]
    if missing:
        raise RecsysError(f"metrics lack column(s) {missing}; they have {list(long.columns)}")
    return long


def _to_pandas(frame: DataFrame | pd.DataFrame) -> pd.DataFrame:
    if isinstance(frame, pd.DataFrame):
        return frame
    log.info("collecting a metrics frame to the driver for display")
    return frame.toPandas()


def _label(column: str) -> str:
    metric, k = column.rsplit("@", 1)
    if metric == N_USERS:
        return DISPLAY_NAMES[N_USERS]
    return f"{DISPLAY_NAMES.get(metric, metric)}@{k}"


def _cell(value, column: str, digits: int) -> str:
    if value is None or pd.isna(value):
        return "-"
    if column.startswith(f"{N_USERS}@"):
        return str(int(value))
    return f"{value:.{digits}f}"
