"""The report's HTML page: one self-contained document built from a ``ReportData`` and the PNGs.

``to_html`` writes the page's sections (``SECTIONS``, in page order): the metrics table, with the best
model of each higher-is-better row in bold, and beside it the embedding probes' scores; the plots (the
item embedding maps among them), embedded as base64 data URIs; and the data
profile's summary cards. The CSS is inline and there are no scripts or external resources, so the file
can be mailed or archived on its own. Only strings are built here: no Spark session, no drawing.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
from typing import Any

import pandas as pd

from recsys_spark import metrics as M
from recsys_spark import tables as tb
from recsys_spark.evaluate import probe as pr
from recsys_spark.evaluate.ranking import COVERAGE, DISPLAY_NAMES, N_USERS
from recsys_spark.report.data import MAP_POINTS, PROBE_COLUMNS, ReportData
from recsys_spark.report.plots import (
    PNG_ACTIVE,
    PNG_COUNTS,
    PNG_COVERAGE,
    PNG_EVENTS,
    PNG_ITEM_MAPS,
    PNG_METRICS,
    PNG_TRAINING,
    _series_label,
)

# Section titles, in page order (the tests look for each).
SECTION_METRICS_TABLE = "Metrics"
SECTION_METRICS_AT_K = "Metrics at K"
SECTION_TRAINING = "Training loss"
SECTION_COVERAGE = "Coverage and popularity"
SECTION_EMBEDDINGS = "Item embedding maps"
SECTION_PROFILE = "Data profile"
SECTIONS = (SECTION_METRICS_TABLE, SECTION_METRICS_AT_K, SECTION_TRAINING, SECTION_COVERAGE, SECTION_EMBEDDINGS,
            SECTION_PROFILE)

# Metrics where a higher value is better: the table marks the best model in their columns.
HIGHER_IS_BETTER = {*M.RANKING_METRICS, COVERAGE}
_BEST = ' class="best"'

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


def _probe_table(probes: pd.DataFrame) -> str:
    """One row per probe: AUC (binary targets), accuracy and the majority class's accuracy, the rows,
    classes and folds; the accuracy in bold where it beats the majority class."""
    head = "".join(f"<th>{_esc(c.replace('_', ' '))}</th>" for c in PROBE_COLUMNS)
    body = []
    for _, row in probes.iterrows():
        cells = []
        for column in PROBE_COLUMNS:
            value = row[column]
            if column in (tb.MODEL, "entity", "target"):
                cells.append(f"<td>{_esc(value)}</td>")
            elif column in (pr.N_ROWS, pr.N_CLASSES, pr.N_FOLDS):
                cells.append(f"<td>{'' if value != value else f'{int(value):,}'}</td>")
            else:
                best = column == pr.ACCURACY and value > row[pr.MAJORITY_ACCURACY]
                cells.append(f"<td{_BEST if best else ''}>{'' if value != value else f'{value:.4f}'}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


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
    if data.probes is not None:
        parts.append("<div><h3>Embedding probes (gold/metrics, split probe)</h3>"
                     '<p class="note">Cross-validated logistic regression from each model\'s embeddings to a '
                     "feature (`recsys-spark probe`): the mean over held-out folds; accuracy in bold where it "
                     "beats always answering the majority class.</p>" + _probe_table(data.probes) + "</div>")
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
    if data.training is not None:
        training += ('<p class="note">How each torch model trained: epochs run, the epoch and optimizer step of '
                     "the weights kept (the best validation), and the training loop's wall time.</p>"
                     + _simple_table(data.training, list(data.training.columns)))
    parts.append(f"<section><h2>{SECTION_TRAINING}</h2>{training}</section>")

    parts.append(f"<section><h2>{SECTION_COVERAGE}</h2>"
                 '<p class="note">Catalogue coverage: share of the catalogue that appears in anyone\'s top-K. '
                 "Mean popularity: mean share of train users who interacted with a recommended item (lower is "
                 "less popularity-biased). Bars per model from light to dark: K = "
                 f"{', '.join(map(str, ks))}.</p>"
                 + (_img(images, PNG_COVERAGE, "catalogue coverage and mean popularity per model")
                    or '<p class="note">no coverage or popularity metrics in this run</p>') + "</section>")

    maps = _img(images, PNG_ITEM_MAPS, "item embeddings on their first two principal components, per model")
    if maps:
        colour = f"coloured by {data.map_groups}" if data.map_groups else "uncoloured (no item features)"
        maps = (f'<p class="note">Each model\'s item embeddings of this run on their first two principal '
                f"components (Spark MLlib PCA over all its items; at most {MAP_POINTS:,} items drawn, the same "
                f"ones for every model), {_esc(colour)}; the most frequent groups in colour, the rest grey. "
                "Items of a group that cluster are what the embedding learned about it.</p>" + maps)
    else:
        maps = ('<p class="note">No item embeddings in this run: popularity and item-kNN learn none; ALS and '
                "the torch models write them to gold/item_embeddings.</p>")
    parts.append(f"<section><h2>{SECTION_EMBEDDINGS}</h2>{maps}</section>")

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
