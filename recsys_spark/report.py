"""A one-page HTML report of a pipeline run, drawn from the warehouse's Delta tables.

``write_report`` aggregates on Spark and collects only the aggregates (a few hundred rows at most: one
per metric, per day and event type, per power-of-two bucket), reads the training histories of the run's
deep models from their ``model.json``, draws the plots with matplotlib's Agg canvas (no pyplot, no
display, no global backend switch) and writes, into ``out_dir``:

- ``report.html``: one self-contained page (CSS inline, every plot embedded as a base64 PNG);
- one PNG per plot, the same images;
- ``report.json``: the numbers behind every plot and table.

The page has these sections: the metrics table; metrics at K, one small plot per ranking metric;
training loss per epoch of the deep models; catalogue coverage and mean popularity of the
recommendations per model; a data profile (events per type per day, distinct users and items per day,
distributions of interactions per user and per item on log scales).

Examples
--------
>>> path = write_report(spark, "warehouse", "report")          # doctest: +SKIP
>>> path
'report/report.html'
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys_spark import metrics as M
from recsys_spark import tables as tb
from recsys_spark.errors import RecsysError
from recsys_spark.evaluate import COVERAGE, DISPLAY_NAMES, MEAN_POPULARITY, N_USERS

log = logging.getLogger(__name__)

# Section titles, in page order (the tests look for each).
SECTION_METRICS_TABLE = "Metrics"
SECTION_METRICS_AT_K = "Metrics at K"
SECTION_TRAINING = "Training loss"
SECTION_COVERAGE = "Coverage and popularity"
SECTION_PROFILE = "Data profile"
SECTIONS = (SECTION_METRICS_TABLE, SECTION_METRICS_AT_K, SECTION_TRAINING, SECTION_COVERAGE, SECTION_PROFILE)

# One small plot per ranking metric, in this order.
PLOTTED_METRICS = (M.NDCG, M.HR, M.RECALL, M.PRECISION, M.MAP, M.MRR)
# Metrics where a higher value is better: the table marks the best model in their columns.
HIGHER_IS_BETTER = {*M.RANKING_METRICS, COVERAGE}

# The PNG files, by plot.
PNG_METRICS = "metrics_at_k.png"
PNG_TRAINING = "training_loss.png"
PNG_COVERAGE = "coverage_popularity.png"
PNG_EVENTS = "events_per_day.png"
PNG_ACTIVE = "users_items_per_day.png"
PNG_COUNTS = "interaction_counts.png"
HTML_NAME = "report.html"
JSON_NAME = "report.json"

_DPI = 100
_MODEL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf")
_BUCKET = "bucket"
_BEST = ' class="best"'
_COUNT = "count"


@dataclass
class ReportData:
    """Everything the report shows, already small: pandas frames of aggregates and plain dicts."""

    warehouse: str
    run_id: str
    metrics: pd.DataFrame                                   # run_date, model, split, metric, k, value
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)   # model -> epochs
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
            "metrics": records(self.metrics), "histories": self.histories,
            "recommendations": records(self.recommendations), "events_per_day": records(self.events_per_day),
            "active_per_day": records(self.active_per_day), "interactions_per_user": records(self.user_buckets),
            "interactions_per_item": records(self.item_buckets), "profile": self.profile, "notes": self.notes,
        }


# -- entry point -----------------------------------------------------------------------------------

def write_report(spark: SparkSession, warehouse: str, out_dir: str, run_id: str | None = None) -> str:
    """Write the report of run ``run_id`` (default: the latest run in gold/metrics) into ``out_dir``.

    Parameters
    ----------
    spark : the session; the tables are read from ``warehouse``.
    warehouse : the warehouse root. ``gold/metrics`` must exist; the other sections say so on the page
        when their tables (gold/recommendations, bronze/events, silver/interactions) are missing.
    out_dir : a local directory, created when missing; files of an earlier report there are replaced.
    run_id : the run to report; None picks the latest (greatest run date, then run id).

    Returns
    -------
    The path of ``report.html``.
    """
    if "://" in out_dir and not out_dir.startswith("file:"):
        raise RecsysError(f"the report is written to a local directory, not {out_dir}")
    out_dir = out_dir.removeprefix("file://")
    data = collect(spark, warehouse, run_id)
    os.makedirs(out_dir, exist_ok=True)
    images = render(data)
    for name, png in images.items():
        with open(os.path.join(out_dir, name), "wb") as fh:
            fh.write(png)
    with open(os.path.join(out_dir, JSON_NAME), "w") as fh:
        json.dump(data.to_json(), fh, indent=1, default=str)
    path = os.path.join(out_dir, HTML_NAME)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(to_html(data, images))
    log.info("report of run %s written to %s (%d plots)", data.run_id, path, len(images))
    return path


# -- the numbers, aggregated on Spark --------------------------------------------------------------

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
    data.histories = _histories(warehouse, metrics)

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
            events.groupBy(tb.EVENT_DATE, tb.EVENT_TYPE).agg(F.count(F.lit(1)).alias(_COUNT))
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
            "events": int(per_day[_COUNT].sum()), "users": int(totals[0]), "items": int(totals[1]),
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
            "interaction_users": int(data.user_buckets[_COUNT].sum()),
            "interaction_items": int(data.item_buckets[_COUNT].sum()),
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
            .agg(F.count(F.lit(1)).alias(_COUNT), F.sum("n").alias("total"))
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


def model_dir(warehouse: str, model: str, run_date: dt.date | str) -> str:
    """Where the pipeline saves a model (``pipeline.model_path``): ``<warehouse>/models/<model>/<run_date>``."""
    day = run_date.isoformat() if isinstance(run_date, dt.date) else str(run_date)
    return tb.table_path(warehouse, f"models/{model}/{day}")


def _histories(warehouse: str, metrics: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    """The per-epoch history in each run model's ``model.json`` (deep models have one; others do not)."""
    histories = {}
    for model, rows in metrics.groupby(tb.MODEL, sort=False):
        path = os.path.join(model_dir(warehouse, str(model), rows[tb.RUN_DATE].max()), "model.json")
        if "://" in path and not path.startswith("file:"):
            continue  # models are saved with plain file IO (shared FS); nothing to read on object storage
        try:
            with open(path.removeprefix("file://")) as fh:
                history = json.load(fh).get("history")
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            log.warning("cannot read the history of %s at %s: %s", model, path, exc)
            continue
        if isinstance(history, list) and history:
            histories[str(model)] = history
    return histories


# -- the plots -------------------------------------------------------------------------------------

def render(data: ReportData) -> dict[str, bytes]:
    """PNG bytes of every plot the data allow, by file name."""
    colors = {m: _MODEL_COLORS[i % len(_MODEL_COLORS)] for i, m in enumerate(data.models)}
    plots = {
        PNG_METRICS: _plot_metrics_at_k(data, colors),
        PNG_TRAINING: _plot_training(data, colors) if data.histories else None,
        PNG_COVERAGE: _plot_coverage(data, colors),
        PNG_EVENTS: _plot_events(data) if data.events_per_day is not None and len(data.events_per_day) else None,
        PNG_ACTIVE: _plot_active(data) if data.active_per_day is not None and len(data.active_per_day) else None,
        PNG_COUNTS: _plot_counts(data) if data.user_buckets is not None and len(data.user_buckets) else None,
    }
    return {name: png for name, png in plots.items() if png is not None}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _style(ax, title: str | None = None) -> None:
    if title:
        ax.set_title(title, fontsize=11, fontweight="bold", loc="left")
    ax.grid(True, color="#e6e6e6", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=9)


def _series_label(model: str, split: str, splits: int) -> str:
    return f"{model} ({split})" if splits > 1 else model


def _plot_metrics_at_k(data: ReportData, colors: dict[str, str]) -> bytes | None:
    frame = data.metrics[data.metrics[tb.METRIC].isin(PLOTTED_METRICS)]
    if frame.empty:
        return None
    shown = [m for m in PLOTTED_METRICS if m in set(frame[tb.METRIC])]
    ks = sorted(int(k) for k in frame[tb.K].unique())
    splits = frame[tb.SPLIT].nunique()
    primary = frame[tb.SPLIT].iloc[0]  # solid lines; other splits (e.g. sessions) dashed
    cols = 3
    rows = math.ceil(len(shown) / cols)
    fig = _figure(12, 2.75 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, metric in zip(axes, shown, strict=False):
        part = frame[frame[tb.METRIC] == metric]
        for (model, split), line in part.groupby([tb.MODEL, tb.SPLIT], sort=False):
            line = line.sort_values(tb.K)
            ax.plot(line[tb.K], line[tb.VALUE], marker="o", markersize=4, linewidth=1.6,
                    color=colors[model], linestyle="-" if split == primary else "--",
                    label=_series_label(model, split, splits))
        _style(ax, f"{DISPLAY_NAMES.get(metric, metric)}@K")
        if len(ks) > 1 and ks[-1] / ks[0] >= 5:
            ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("K", fontsize=9)
        ax.set_ylim(bottom=0)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 8), frameon=False, fontsize=10)
    return _png(fig)


def _loss_key(history: list[dict[str, Any]]) -> str | None:
    for key in ("train_loss", "loss"):
        if any(key in row for row in history):
            return key
    return None


def _validation_key(history: list[dict[str, Any]]) -> str | None:
    keys = [k for k in history[0] if "@" in k]
    preferred = [k for k in keys if k.startswith("ndcg@")]
    return (preferred or keys or [None])[0]


def _plot_training(data: ReportData, colors: dict[str, str]) -> bytes | None:
    models = [m for m, h in data.histories.items() if _loss_key(h)]
    if not models:
        return None
    cols = min(len(models), 3)
    rows = math.ceil(len(models) / cols)
    fig = _figure(12 if cols > 1 else 7, 3.0 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, model in zip(axes, models, strict=False):
        history = data.histories[model]
        loss = _loss_key(history)
        epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
        ax.plot(epochs, [row.get(loss) for row in history], marker="o", markersize=3, color=colors.get(model),
                linewidth=1.8, label=loss)
        _style(ax, model)
        ax.set_xlabel("epoch", fontsize=9)
        ax.set_ylabel(loss, fontsize=9)
        val = _validation_key(history)
        if val:
            twin = ax.twinx()
            twin.plot(epochs, [row.get(val) for row in history], color="#555555", linestyle="--",
                      linewidth=1.2, marker=".", label=f"validation {val}")
            twin.set_ylabel(f"validation {val}", fontsize=9, color="#555555")
            twin.tick_params(labelsize=9, colors="#555555")
            twin.spines["top"].set_visible(False)
            lines = ax.get_lines() + twin.get_lines()
            ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, frameon=False, loc="center right")
        if len(epochs) < 12:
            ax.set_xticks(epochs)
    for ax in axes[len(models):]:
        ax.set_visible(False)
    return _png(fig)


def _grouped_bars(ax, frame: pd.DataFrame, models: list[str], colors: dict[str, str], fmt: str) -> None:
    """Bars per model (x), one bar per K, shaded from light (small K) to the model's colour (large K)."""
    from matplotlib.colors import to_rgba

    ks = sorted(int(k) for k in frame[tb.K].unique())
    width = 0.8 / max(len(ks), 1)
    for j, k in enumerate(ks):
        at_k = frame[frame[tb.K] == k].groupby(tb.MODEL)[tb.VALUE].mean()
        xs = [i + (j - (len(ks) - 1) / 2) * width for i in range(len(models))]
        values = [at_k.get(m, float("nan")) for m in models]
        alpha = 0.35 + 0.65 * (j + 1) / len(ks)
        bars = ax.bar(xs, values, width * 0.92, color=[to_rgba(colors[m], alpha) for m in models],
                      edgecolor=[colors[m] for m in models], linewidth=0.6)
        ax.bar_label(bars, labels=[f"@{k}" for _ in models], fontsize=7, padding=2, color="#444444")
        if j == len(ks) - 1:
            ax.bar_label(bars, labels=[fmt.format(v) if v == v else "" for v in values], fontsize=7,
                         label_type="center", color="#111111", rotation=90)
    ax.set_xticks(range(len(models)), models, fontsize=9)
    ax.margins(y=0.12)


def _plot_coverage(data: ReportData, colors: dict[str, str]) -> bytes | None:
    frame = data.metrics[data.metrics[tb.METRIC].isin([COVERAGE, MEAN_POPULARITY])]
    if frame.empty:
        return None
    splits = list(dict.fromkeys(frame[tb.SPLIT]))
    frame = frame[frame[tb.SPLIT] == splits[0]]  # one split: bars of different test sets do not compare
    suffix = f" ({splits[0]})" if len(set(data.metrics[tb.SPLIT])) > 1 else ""
    parts = [(COVERAGE, f"catalogue coverage@K{suffix}", "{:.1%}"),
             (MEAN_POPULARITY, f"mean popularity@K{suffix}", "{:.3f}")]
    parts = [p for p in parts if (frame[tb.METRIC] == p[0]).any()]
    fig = _figure(12, 3.3)
    axes = fig.subplots(1, len(parts), squeeze=False).ravel()
    for ax, (metric, title, fmt) in zip(axes, parts, strict=True):
        _grouped_bars(ax, frame[frame[tb.METRIC] == metric], data.models, colors, fmt)
        _style(ax, title)
        if metric == COVERAGE:
            from matplotlib.ticker import PercentFormatter

            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    return _png(fig)


def _dates(values: pd.Series) -> pd.Series:
    return pd.to_datetime(values)


def _date_axis(ax) -> None:
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator(maxticks=10)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))


def _plot_events(data: ReportData) -> bytes:
    frame = data.events_per_day
    wide = frame.pivot_table(index=tb.EVENT_DATE, columns=tb.EVENT_TYPE, values=_COUNT, aggfunc="sum").fillna(0)
    wide = wide[wide.sum().sort_values(ascending=False).index]
    fig = _figure(6, 3.3)
    ax = fig.subplots()
    days = _dates(pd.Series(wide.index))
    for event_type in wide.columns:
        ax.plot(days, wide[event_type].to_numpy(), marker="o" if len(days) <= 60 else None, markersize=3,
                linewidth=1.6, label=f"{event_type} ({int(wide[event_type].sum()):,})")
    _style(ax, "events per day, by type")
    if (wide.to_numpy() > 0).any():
        ax.set_yscale("log")
    _date_axis(ax)
    ax.set_ylabel("events (log scale)", fontsize=9)
    fig.legend(fontsize=8, frameon=False, loc="outside lower center", ncols=min(len(wide.columns), 4))
    return _png(fig)


def _plot_active(data: ReportData) -> bytes:
    frame = data.active_per_day
    fig = _figure(6, 3.3)
    ax = fig.subplots()
    days = _dates(frame[tb.EVENT_DATE])
    for column, color in (("users", "#1f77b4"), ("items", "#ff7f0e")):
        ax.plot(days, frame[column], marker="o" if len(days) <= 60 else None, markersize=3, linewidth=1.6,
                color=color, label=f"distinct {column}")
    _style(ax, "distinct users and items per day")
    ax.set_ylim(bottom=0)
    _date_axis(ax)
    fig.legend(fontsize=8, frameon=False, loc="outside lower center", ncols=2)
    return _png(fig)


def _plot_counts(data: ReportData) -> bytes:
    fig = _figure(12, 3.3)
    axes = fig.subplots(1, 2).ravel()
    for ax, frame, who, color in ((axes[0], data.user_buckets, "user", "#1f77b4"),
                                  (axes[1], data.item_buckets, "item", "#ff7f0e")):
        lo = frame["lo"].to_numpy(dtype=float)
        ax.bar(lo, frame[_COUNT], width=lo, align="edge", color=color, alpha=0.8, edgecolor="white")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _style(ax, f"interactions per {who} ({int(frame[_COUNT].sum()):,} {who}s)")
        ax.set_xlabel(f"distinct {'items' if who == 'user' else 'users'} per {who} (log2 buckets)", fontsize=9)
        ax.set_ylabel(f"{who}s", fontsize=9)
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    return _png(fig)


# -- the page --------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1d1d1f;
       margin: 0; background: #f6f7f9; }
main { max-width: 1220px; margin: 0 auto; padding: 24px 28px 48px; }
header { border-bottom: 1px solid #d9dce1; margin-bottom: 8px; padding-bottom: 10px; }
h1 { font-size: 24px; margin: 0 0 6px; }
h2 { font-size: 18px; margin: 28px 0 10px; padding-top: 6px; border-top: 1px solid #e3e5e8; }
h3 { font-size: 14px; margin: 16px 0 6px; color: #444; }
.meta { color: #5a5f66; font-size: 13px; }
.meta span { margin-right: 18px; white-space: nowrap; }
section { background: #fff; border: 1px solid #e3e5e8; border-radius: 8px; padding: 4px 18px 16px;
          margin: 16px 0; }
section h2 { border-top: none; margin-top: 14px; }
img { max-width: 100%; height: auto; display: block; margin: 6px 0; }
table { border-collapse: collapse; font-size: 12.5px; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
th, td { padding: 3px 9px; border-bottom: 1px solid #eceef1; text-align: right; white-space: nowrap; }
th { background: #f1f3f5; font-weight: 600; position: sticky; top: 0; }
td:first-child, th:first-child { text-align: left; }
tr:hover td { background: #fafbfc; }
td.best { font-weight: 700; color: #0b6e2e; }
table.metrics td, table.metrics th { min-width: 74px; }
tr.group td { border-top: 1px solid #c9cdd3; }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }
.columns { display: flex; flex-wrap: wrap; gap: 28px; align-items: flex-start; }
.note { color: #6b7078; font-size: 13px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0 4px; }
.card { background: #f6f7f9; border: 1px solid #e3e5e8; border-radius: 6px; padding: 6px 12px; min-width: 110px; }
.card b { display: block; font-size: 17px; }
.card small { color: #5a5f66; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _img(images: dict[str, bytes], name: str, alt: str) -> str:
    png = images.get(name)
    if png is None:
        return ""
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _fmt(metric: str, value: float) -> str:
    if value != value:  # NaN
        return ""
    if metric == N_USERS:
        return f"{int(value):,}"
    if metric == COVERAGE:
        return f"{value:.1%}"
    return f"{value:.4f}"


def _metrics_table(metrics: pd.DataFrame) -> str:
    """Rows: each metric at each K (NDCG first, as ``format_table``); columns: the models, best first.

    A tall table stays readable with any number of metrics and Ks; the best model of each row of a
    higher-is-better metric is in bold.
    """
    order = {m: i for i, m in enumerate(DISPLAY_NAMES)}
    keys = (metrics[[tb.METRIC, tb.K]].drop_duplicates()
            .assign(_o=lambda f: f[tb.METRIC].map(lambda m: order.get(m, len(order))))
            .sort_values(["_o", tb.METRIC, tb.K]))
    keys = [(m, int(k)) for m, k in zip(keys[tb.METRIC], keys[tb.K], strict=True)]
    splits = metrics[tb.SPLIT].nunique()
    columns = list(dict.fromkeys(zip(metrics[tb.MODEL], metrics[tb.SPLIT], strict=True)))
    cells = {(r[tb.MODEL], r[tb.SPLIT], r[tb.METRIC], int(r[tb.K])): float(r[tb.VALUE])
             for _, r in metrics.iterrows()}
    head = "".join(f"<th>{_esc(_series_label(m, s, splits))}</th>" for m, s in columns)
    body, previous = [], None
    for metric, k in keys:
        values = [cells.get((m, s, metric, k), float("nan")) for m, s in columns]
        finite = [v for v in values if v == v]
        best = max(finite) if metric in HIGHER_IS_BETTER and finite and len(columns) > 1 else None
        tds = "".join(f"<td{_BEST if best is not None and v == best else ''}>{_fmt(metric, v)}</td>" for v in values)
        label = DISPLAY_NAMES.get(metric, metric) + ("" if metric == N_USERS else f"@{k}")
        group = ' class="group"' if previous is not None and metric != previous else ""
        body.append(f"<tr{group}><td>{_esc(label)}</td>{tds}</tr>")
        previous = metric
    return (f'<div class="scroll"><table class="metrics"><thead><tr><th>metric</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _simple_table(frame: pd.DataFrame, columns: list[str]) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_esc(f'{v:,}' if isinstance(v, int) else v)}</td>"
                         for v in (_plain(row[c]) for c in columns)) + "</tr>"
        for _, row in frame.iterrows()
    )
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _plain(value: Any) -> Any:
    return int(value) if hasattr(value, "dtype") and "int" in str(value.dtype) else value


def _cards(items: list[tuple[str, Any]]) -> str:
    cards = "".join(f'<div class="card"><b>{_esc(f"{v:,}" if isinstance(v, int) else v)}</b>'
                    f"<small>{_esc(label)}</small></div>" for label, v in items if v is not None)
    return f'<div class="cards">{cards}</div>'


def to_html(data: ReportData, images: dict[str, bytes]) -> str:
    """The self-contained page: inline CSS, images as data URIs, no scripts, no external resources."""
    metrics = data.metrics
    run_dates = sorted({str(d) for d in metrics[tb.RUN_DATE]})
    splits = sorted(set(metrics[tb.SPLIT]))
    meta = [("run date", ", ".join(run_dates)), ("split", ", ".join(splits)),
            ("models", ", ".join(data.models)), ("warehouse", data.warehouse),
            ("generated", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"))]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>recsys-spark report: run {_esc(data.run_id)}</title><style>{_CSS}</style></head><body><main>",
        f"<header><h1>recsys-spark report: run {_esc(data.run_id)}</h1><div class=\"meta\">"
        + "".join(f"<span><b>{_esc(k)}</b>: {_esc(v)}</span>" for k, v in meta) + "</div></header>",
    ]
    for note in data.notes:
        parts.append(f'<p class="note">{_esc(note)}</p>')

    ks = sorted({int(k) for k in metrics.loc[metrics[tb.METRIC] != N_USERS, tb.K]})
    parts.append(f"<section><h2>{SECTION_METRICS_TABLE}</h2>"
                 f'<p class="note">Full-catalogue ranking on the test split, train items filtered out, K in '
                 f'{", ".join(map(str, ks))}; models from best to worst NDCG@{ks[0] if ks else "K"}, the best '
                 f'value of each row in bold.</p><div class="columns"><div>{_metrics_table(metrics)}</div>')
    if data.recommendations is not None and len(data.recommendations):
        parts.append("<div><h3>Recommendations written (gold/recommendations)</h3>"
                     + _simple_table(data.recommendations, [tb.MODEL, tb.SPLIT, "users", "rows", "items"])
                     + "</div>")
    parts.append("</div></section>")

    parts.append(f"<section><h2>{SECTION_METRICS_AT_K}</h2>"
                 + (_img(images, PNG_METRICS, "ranking metrics at K per model")
                    or '<p class="note">no ranking metrics in this run</p>') + "</section>")

    training = _img(images, PNG_TRAINING, "training loss per epoch")
    if training:
        training = ('<p class="note">Per-epoch training loss (solid) and the validation metric used for early '
                    "stopping (dashed, right axis), from each deep model's model.json.</p>" + training)
    else:
        training = '<p class="note">No deep models in this run: ALS, item-kNN and popularity keep no epochs.</p>'
    parts.append(f"<section><h2>{SECTION_TRAINING}</h2>{training}</section>")

    parts.append(f"<section><h2>{SECTION_COVERAGE}</h2>"
                 '<p class="note">Catalogue coverage: share of the catalogue that appears in anyone\'s top-K. '
                 "Mean popularity: mean share of train users who interacted with a recommended item (lower is "
                 "less popularity-biased). Bars per model from light to dark: K = "
                 f"{', '.join(map(str, ks))}.</p>"
                 + (_img(images, PNG_COVERAGE, "catalogue coverage and mean popularity per model")
                    or '<p class="note">no coverage or popularity metrics in this run</p>') + "</section>")

    profile = data.profile
    days = f"{profile['first_day']} to {profile['last_day']}" if profile.get("first_day") else None
    cards = _cards([("events (bronze)", profile.get("events")), ("rejected rows", profile.get("rejected")),
                    ("users (bronze)", profile.get("users")), ("items (bronze)", profile.get("items")),
                    ("interactions (silver)", profile.get("interactions")),
                    ("users (silver)", profile.get("interaction_users")),
                    ("items (silver)", profile.get("interaction_items")), ("days", days)])
    profile_html = "".join([
        cards,
        '<div class="grid2">',
        _img(images, PNG_EVENTS, "events per day by type"),
        _img(images, PNG_ACTIVE, "distinct users and items per day"),
        "</div>",
        _img(images, PNG_COUNTS, "distribution of interactions per user and per item"),
    ])
    parts.append(f"<section><h2>{SECTION_PROFILE}</h2>{profile_html}</section>")
    parts.append("</main></body></html>")
    return "\n".join(parts)
