"""The HTML run report, from a tiny hand-written warehouse whose numbers are known."""

from __future__ import annotations

import datetime as dt
import json
import os

import pytest
from pyspark.sql import Row

from recsys_spark import report
from recsys_spark import tables as tb
from recsys_spark.errors import RecsysError
from recsys_spark.report import plots
from recsys_spark.report.page import SECTIONS

pytestmark = pytest.mark.spark

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OLD, NEW = dt.date(2024, 1, 30), dt.date(2024, 1, 31)
MODELS = ["als", "popularity", "ncf"]
METRICS_SCHEMA = "run_id string, run_date date, model string, split string, metric string, k int, value double"
RECS_SCHEMA = ("run_id string, model string, split string, user_id string, rank int, item_id string, "
               "score double, run_date date")
INTERACTIONS_SCHEMA = "user_idx int, item_idx int, weight double, n_events long, first_ts timestamp, last_ts timestamp"
TRAINING = {"epochs_run": 3, "best_epoch": 3, "steps_to_best": 60, "steps_per_epoch": 20, "stopped_early": False,
            "train_seconds": 41.5, "seconds_to_best": 40.2}
# Validation after epochs 2 and 4 only (few steps per epoch): the plot takes the epochs that have it.
HISTORY = [{"epoch": e, "train_loss": 1.0 / e, "lr": 0.001, "seconds": 1.0, "samples_per_s": 100.0,
            **({"ndcg@10": 0.02 * e} if e % 2 == 0 else {})} for e in range(1, 6)]


def _save(df, warehouse, name):
    df.write.format("delta").mode("overwrite").save(tb.table_path(warehouse, name))


def _metrics_rows():
    rows = []
    for run_id, day in (("nightly-old", OLD), ("nightly-new", NEW)):
        for i, model in enumerate(MODELS):
            for k in (10, 20, 100):
                base = 0.05 * (i + 1) * (1 + k / 100)
                for metric in ("ndcg", "hr", "recall", "precision", "map", "mrr"):
                    rows.append((run_id, day, model, "leave_last_out", metric, k, base))
                rows.append((run_id, day, model, "leave_last_out", "coverage", k, 0.1 * (i + 1)))
                rows.append((run_id, day, model, "leave_last_out", "mean_popularity", k, 0.2 / (i + 1)))
                rows.append((run_id, day, model, "leave_last_out", "n_users", k, 7.0))
    return rows


@pytest.fixture(scope="module")
def tiny_warehouse(spark, tmp_path_factory):
    """gold/metrics (two runs), gold/recommendations, bronze/events, silver/interactions, one model.json."""
    warehouse = str(tmp_path_factory.mktemp("report") / "warehouse")
    _save(spark.createDataFrame(_metrics_rows(), METRICS_SCHEMA), warehouse, tb.METRICS)
    recs = [("nightly-new", m, "leave_last_out", f"u{u}", r, f"i{(u + r) % 5}", 1.0 / r, NEW)
            for m in MODELS for u in range(3) for r in (1, 2)]
    _save(spark.createDataFrame(recs, RECS_SCHEMA), warehouse, tb.RECOMMENDATIONS)
    events = []
    for day in range(3):
        for n, event_type in enumerate(["view", "view", "view", "cart", "purchase"]):
            t = dt.datetime(2024, 1, 10 + day, 12, n)
            events.append(Row(event_id=f"e{day}-{n}", user_id=f"u{n % 3}", item_id=f"i{n + day}",
                              event_type=event_type, event_time=t, session_id=None, value=None, category=None,
                              price=None, source="test", event_date=t.date()))
    _save(spark.createDataFrame(events, tb.EVENTS_SCHEMA), warehouse, tb.BRONZE_EVENTS)
    # user 0: 1 item, user 1: 2 items, user 2: 3 items, user 3: 4 items, user 4: 8 items
    ts = dt.datetime(2024, 1, 1)
    pairs = [(u, i, 1.0, 1, ts, ts) for u, n in enumerate([1, 2, 3, 4, 8]) for i in range(n)]
    _save(spark.createDataFrame(pairs, INTERACTIONS_SCHEMA), warehouse, tb.INTERACTIONS)
    ncf_dir = tb.model_dir(warehouse, "ncf", NEW)
    os.makedirs(ncf_dir)
    with open(os.path.join(ncf_dir, "model.json"), "w") as fh:
        json.dump({"model": "ncf", "history": HISTORY, "training": TRAINING}, fh)
    return warehouse


def test_report_of_the_latest_run(spark, tiny_warehouse, tmp_path):
    out = tmp_path / "report"
    path = report.write_report(spark, tiny_warehouse, str(out))

    assert path == str(out / "report.html")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "run nightly-new" in page and "nightly-old" not in page
    for model in MODELS:
        assert model in page
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page
    pngs = [plots.PNG_METRICS, plots.PNG_TRAINING, plots.PNG_COVERAGE, plots.PNG_EVENTS, plots.PNG_ACTIVE,
            plots.PNG_COUNTS]
    assert page.count('src="data:image/png;base64,') == len(pngs)
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    # Self-contained: nothing fetched from anywhere.
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page

    numbers = json.loads((out / "report.json").read_text())
    assert numbers["run_id"] == "nightly-new"
    assert numbers["models"] == ["ncf", "popularity", "als"]          # best NDCG@10 first
    assert numbers["histories"]["ncf"] == HISTORY and set(numbers["histories"]) == {"ncf"}
    assert numbers["training"] == [{"model": "ncf", **TRAINING}]  # steps to best and wall time, shown too
    assert "steps_to_best" in page and "41.5" in page
    assert numbers["profile"]["events"] == 15 and numbers["profile"]["users"] == 3
    assert numbers["profile"]["interactions"] == 18 and numbers["profile"]["interaction_users"] == 5
    per_user = {b["bucket"]: (b["count"], b["lo"], b["hi"]) for b in numbers["interactions_per_user"]}
    assert per_user == {0: (1, 1, 1), 1: (2, 2, 3), 2: (1, 4, 7), 3: (1, 8, 15)}
    per_day = {(e["event_date"][:10], e["event_type"]): e["count"] for e in numbers["events_per_day"]}
    assert per_day[("2024-01-11", "view")] == 3 and per_day[("2024-01-12", "purchase")] == 1
    assert {r["model"]: (r["users"], r["rows"]) for r in numbers["recommendations"]} == {m: (3, 6) for m in MODELS}
    # The metrics table marks the best model per column: ncf has the highest NDCG@10 (0.165).
    assert '<td class="best">0.1650</td>' in page


def test_report_of_a_named_run(spark, tiny_warehouse, tmp_path):
    path = report.write_report(spark, tiny_warehouse, str(tmp_path / "old"), run_id="nightly-old")
    page = open(path, encoding="utf-8").read()
    assert "run nightly-old" in page
    # The old run's ncf has no model directory, so there is no history to draw; the section says so.
    assert "No deep models in this run" in page
    assert not (tmp_path / "old" / plots.PNG_TRAINING).exists()
    assert page.count('src="data:image/png;base64,') == 5


def test_clear_errors_for_unknown_runs_and_empty_warehouses(spark, tiny_warehouse, tmp_path):
    with pytest.raises(RecsysError, match=r"run 'nope' has no rows in gold/metrics; recent runs: nightly-new"):
        report.write_report(spark, tiny_warehouse, str(tmp_path / "nope"), run_id="nope")
    with pytest.raises(RecsysError, match="no gold/metrics table under .*recsys-spark pipeline"):
        report.write_report(spark, str(tmp_path / "empty-warehouse"), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_sections_without_their_tables_say_so(spark, tmp_path):
    warehouse = str(tmp_path / "warehouse")
    rows = _metrics_rows()[:30]  # the old run: als at every K, popularity at K=10
    rows += [(*row[:3], "sessions", *row[4:]) for row in rows[:9] if row[4] in ("hr", "mrr")]
    _save(spark.createDataFrame(rows, METRICS_SCHEMA), warehouse, tb.METRICS)
    path = report.write_report(spark, warehouse, str(tmp_path / "out"))
    page = open(path, encoding="utf-8").read()
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page
    assert "<th>als (leave_last_out)</th>" in page and "<th>als (sessions)</th>" in page
    for missing in (tb.RECOMMENDATIONS, tb.BRONZE_EVENTS, tb.INTERACTIONS):
        assert f"{missing} not found under" in page
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [plots.PNG_COVERAGE, plots.PNG_METRICS]


def test_item_maps_and_probe_scores(spark, tmp_path):
    """Item embeddings of two categories planted 6 apart on one axis: each model's map puts them on either
    side of PC1, coloured by category; the probes' rows show in their own table, not as metrics."""
    import numpy as np

    from recsys_spark.evaluate import probe as pr
    from recsys_spark.report.data import MAP_GROUP, MAP_X

    warehouse = str(tmp_path / "warehouse")
    gender_auc = pr.metric_name(pr.AUC, "user", "gender")
    probes = [("nightly-new", NEW, "als", pr.PROBE_SPLIT, pr.metric_name(stat, "user", "gender"), 0, value)
              for stat, value in ((pr.AUC, 0.71), (pr.ACCURACY, 0.74), (pr.MAJORITY_ACCURACY, 0.70), (pr.N_ROWS, 943.0),
                                  (pr.N_CLASSES, 2.0), (pr.N_FOLDS, 5.0))]
    _save(spark.createDataFrame(_metrics_rows() + probes, METRICS_SCHEMA), warehouse, tb.METRICS)
    rng = np.random.default_rng(0)
    category = {f"i{i}": 1 + i % 2 for i in range(40)}  # vocabulary index: 1 shoes, 2 books
    embeddings = [("nightly-new", model, "leave_last_out", item, [float(x) for x in (6.0 * (c == 1), 0, 0)
                                                                  + rng.normal(0, 0.5, 3)], NEW)
                  for model in ("als", "ncf") for item, c in category.items()]
    _save(spark.createDataFrame(embeddings, "run_id string, model string, split string, item_id string, "
                                            "embedding array<float>, run_date date"), warehouse, tb.ITEM_EMBEDDINGS)
    _save(spark.createDataFrame([(item, i, c) for i, (item, c) in enumerate(category.items())],
                                "item_id string, item_idx int, category int"), warehouse, tb.ITEM_FEATURES)
    _save(spark.createDataFrame([("category", "shoes", 1), ("category", "books", 2)],
                                "field string, value string, index int"), warehouse, tb.FEATURE_VOCAB)

    out = tmp_path / "out"
    page = open(report.write_report(spark, warehouse, str(out)), encoding="utf-8").read()
    assert "<h2>Item embedding maps</h2>" in page and "coloured by category" in page
    assert (out / plots.PNG_ITEM_MAPS).read_bytes().startswith(PNG_MAGIC)
    assert "Embedding probes" in page and "gender" in page and '<td class="best">0.7400</td>' in page
    assert "(probe)" not in page and "probe_auc" not in page  # not a column nor a row of the ranking table
    numbers = json.loads((out / "report.json").read_text())
    assert numbers["probes"] == [{"model": "als", "entity": "user", "target": "gender", "auc": 0.71, "accuracy": 0.74,
                                  "majority_accuracy": 0.70, "n": 943, "classes": 2, "folds": 5}]
    assert gender_auc not in {m["metric"] for m in numbers["metrics"]}
    assert set(numbers["item_maps"]) == {"als", "ncf"} and numbers["map_groups"] == "category"
    for model, points in numbers["item_maps"].items():
        assert len(points) == 40 and numbers["map_variance"][model][0] > 0.8
        xs = {g: [p[MAP_X] for p in points if p[MAP_GROUP] == g] for g in ("shoes", "books")}
        assert abs(np.mean(xs["shoes"]) - np.mean(xs["books"])) > 5  # the planted gap, along PC1
