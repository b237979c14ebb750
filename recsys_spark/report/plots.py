"""The report's plots: PNG bytes drawn with matplotlib's Agg canvas from a ``ReportData``.

``render`` draws every plot the data allow (metrics at K, training loss per epoch, coverage and
popularity, the item embedding maps, events and active users and items per day, interactions per user
and per item) and returns
them by file name (the ``PNG_*`` names). Figures are built on ``matplotlib.figure.Figure`` with an Agg
canvas: no pyplot, no display, no global backend switch. Nothing here runs on Spark; it only reads the
already collected aggregates, so the plots can be redrawn or tested without a session.
"""

from __future__ import annotations

import io
import math
from typing import Any

import pandas as pd

from recsys_spark import metrics as M
from recsys_spark import tables as tb
from recsys_spark.evaluate.ranking import COVERAGE, DISPLAY_NAMES, MEAN_POPULARITY
from recsys_spark.report.data import COUNT, MAP_GROUP, MAP_X, MAP_Y, NO_GROUP, OTHER, ReportData

# One small plot per ranking metric, in this order.
PLOTTED_METRICS = (M.NDCG, M.HR, M.RECALL, M.PRECISION, M.MAP, M.MRR)

# The PNG files, by plot.
PNG_METRICS = "metrics_at_k.png"
PNG_TRAINING = "training_loss.png"
PNG_COVERAGE = "coverage_popularity.png"
PNG_EVENTS = "events_per_day.png"
PNG_ACTIVE = "users_items_per_day.png"
PNG_COUNTS = "interaction_counts.png"
PNG_ITEM_MAPS = "item_embedding_maps.png"

_DPI = 100
_MODEL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf")
# The item maps' groups: the palette without its grey, which marks "other" and "unknown".
_GROUP_COLORS = tuple(c for c in _MODEL_COLORS if c != "#7f7f7f")
_GREYS = {OTHER: "#9a9a9a", NO_GROUP: "#d0d0d0"}


def render(data: ReportData) -> dict[str, bytes]:
    """PNG bytes of every plot the data allow, by file name."""
    colors = {m: _MODEL_COLORS[i % len(_MODEL_COLORS)] for i, m in enumerate(data.models)}
    plots = {
        PNG_METRICS: _plot_metrics_at_k(data, colors),
        PNG_TRAINING: _plot_training(data, colors) if data.histories else None,
        PNG_COVERAGE: _plot_coverage(data, colors),
        PNG_ITEM_MAPS: _plot_item_maps(data) if data.item_maps else None,
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
    keys = list(dict.fromkeys(k for row in history for k in row if "@" in k))  # not every epoch validates
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
            validated = [(e, row[val]) for e, row in zip(epochs, history, strict=True) if val in row]
            twin.plot([e for e, _ in validated], [v for _, v in validated], color="#555555", linestyle="--",
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


def _plot_item_maps(data: ReportData) -> bytes:
    """One scatter per model of its items on their first two principal components, coloured by group
    (the same colour for a group in every panel; "other" and "unknown" grey, drawn first, underneath)."""
    every = pd.concat([f[MAP_GROUP] for f in data.item_maps.values()])
    named = [g for g in every.value_counts().index if g not in _GREYS]
    palette = {**_GREYS, **{g: _GROUP_COLORS[i % len(_GROUP_COLORS)] for i, g in enumerate(named)}}
    order = [g for g in (NO_GROUP, OTHER) if g in set(every)] + named
    models = list(data.item_maps)
    cols = min(len(models), 3)
    rows = math.ceil(len(models) / cols)
    fig = _figure(12 if cols > 1 else 6.5, 3.8 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, model in zip(axes, models, strict=False):
        frame = data.item_maps[model]
        for group in order:
            part = frame[frame[MAP_GROUP] == group]
            if len(part):
                ax.scatter(part[MAP_X], part[MAP_Y], s=7, alpha=0.7, linewidths=0, color=palette[group],
                           label=group)
        pc1, pc2 = ([*data.map_variance.get(model, []), math.nan, math.nan])[:2]
        _style(ax, f"{model} ({len(frame):,} items)")
        ax.set_xlabel(f"PC1 ({pc1:.0%} of variance)", fontsize=9)
        ax.set_ylabel(f"PC2 ({pc2:.0%})", fontsize=9)
    for ax in axes[len(models):]:
        ax.set_visible(False)
    handles = {}
    for ax in axes[:len(models)]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    labels = [g for g in [*named, OTHER, NO_GROUP] if g in handles]
    fig.legend([handles[g] for g in labels], labels, loc="outside upper center", ncols=min(len(labels), 4 * cols),
               frameon=False, fontsize=9, markerscale=2.5)
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
    wide = frame.pivot_table(index=tb.EVENT_DATE, columns=tb.EVENT_TYPE, values=COUNT, aggfunc="sum").fillna(0)
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
        ax.bar(lo, frame[COUNT], width=lo, align="edge", color=color, alpha=0.8, edgecolor="white")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _style(ax, f"interactions per {who} ({int(frame[COUNT].sum()):,} {who}s)")
        ax.set_xlabel(f"distinct {'items' if who == 'user' else 'users'} per {who} (log2 buckets)", fontsize=9)
        ax.set_ylabel(f"{who}s", fontsize=9)
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    return _png(fig)

