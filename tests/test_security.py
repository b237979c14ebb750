"""Values a user or a data file supplies never become SQL text, a path outside the warehouse, or markup.

Names that must be spliced into Delta's replaceWhere text or into a model path (model names, the split)
are checked against a plain-name pattern, run ids against their own, and the CLI refuses a bad one with
one line before any Spark session starts. User and item ids are data: they flow as values (``isin``,
joins), so an id with a quote is an ordinary id. The report escapes every string it writes.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pytest

from recsys_spark import cli
from recsys_spark import tables as tb
from recsys_spark.errors import RecsysError
from recsys_spark.pipeline import Run
from recsys_spark.report.data import ReportData
from recsys_spark.report.page import to_html

CONF = str(Path(__file__).resolve().parents[1] / "conf" / "pipeline.yaml")
INJECTION = "x' OR '1'='1"
SCRIPT = "<script>alert(1)</script>"


@pytest.fixture
def no_spark(monkeypatch):
    """The CLI must refuse before it asks for a Spark session."""

    def refuse(app: str):
        raise AssertionError(f"a Spark session was requested ({app}) before the arguments were checked")

    monkeypatch.setattr(cli, "_spark", refuse)


def _cli_error(capsys, *argv: str) -> str:
    """Run the CLI, expect exit 2, return its one line of stderr."""
    capsys.readouterr()
    status = cli.main([*argv, "--config", CONF])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_run_ids_are_checked():
    for good in ("2026-01-02", "nightly-old", "scheduled__2026-01-02T00:00:00+00:00", "a.b_c"):
        assert tb.check_run_id(good) == good
    for bad in (INJECTION, "", "a" * 129, "a b", "../x", "x;--"):
        with pytest.raises(RecsysError, match="run id") as caught:
            Run(dt.date(2026, 1, 2), bad, "leave_last_out")
        assert "\n" not in str(caught.value)


def test_the_cli_refuses_a_bad_run_id_with_one_line(no_spark, capsys):
    line = _cli_error(capsys, "recommend", "--model", "popularity", "--run-id", INJECTION)
    assert line.startswith("recsys-spark recommend: error: run id") and INJECTION in line
    line = _cli_error(capsys, "report", "--run-id", INJECTION)
    assert "run id" in line


@pytest.mark.parametrize("argv", [
    ["train", "--model", "../../etc"],
    ["recommend", "--model", "als'; --"],
    ["similar-items", "--model", "../../etc"],
    ["train", "--model", "als'; --", "--backend", "local"],
    ["evaluate", "--models", "als'; --"],
    ["pipeline", "--models", "popularity,../../etc"],
], ids=lambda argv: " ".join(argv))
def test_the_cli_refuses_a_model_name_that_is_no_model(no_spark, capsys, argv):
    line = _cli_error(capsys, *argv)
    assert "unknown model" in line and "'popularity'" in line  # the known names are listed


def test_names_reaching_predicates_and_paths_are_plain():
    run = Run(dt.date(2026, 1, 2), "r1", "leave_last_out")
    assert run.where("session_pop") == "run_date = DATE'2026-01-02' AND model = 'session_pop'"
    assert run.where("als", "ncf") == "run_date = DATE'2026-01-02' AND model IN ('als', 'ncf')"
    for bad in ("als'; --", "als' OR '1'='1", "../../etc", "a b", ""):
        with pytest.raises(RecsysError, match="not a plain name"):
            run.where(bad)
        with pytest.raises(RecsysError, match="not a plain name"):
            run.where("als", bad)
        with pytest.raises(RecsysError, match="not a plain name"):
            tb.model_dir("warehouse", bad, run.run_date)
    with pytest.raises(RecsysError, match="split"):
        Run(dt.date(2026, 1, 2), "r1", "x' OR '1'='1")


def test_a_warehouse_path_with_a_backtick_is_refused_at_load():
    """Delta quotes a table's path with backticks, unescaped, so such a path could only fail later, in SQL."""
    from recsys_spark.config import load_config
    from recsys_spark.errors import ConfigError

    with pytest.raises(ConfigError, match="warehouse: a backtick"):
        load_config(CONF, [f"warehouse={json.dumps('/tmp/wh`x')}"])


def test_the_report_escapes_every_string():
    """Model names, metric names, the run id, notes, table cells and profile values come from the
    warehouse; a crafted one must reach the page as text."""
    metrics = pd.DataFrame([
        {"run_date": dt.date(2024, 1, 31), "model": SCRIPT, "split": "leave_last_out", "metric": "ndcg", "k": 10,
         "value": 0.1},
        {"run_date": dt.date(2024, 1, 31), "model": "als", "split": SCRIPT, "metric": f"x{SCRIPT}", "k": 10,
         "value": 0.2},
    ])
    data = ReportData(
        warehouse=f"/tmp/{SCRIPT}", run_id=SCRIPT, metrics=metrics,
        recommendations=pd.DataFrame([{"model": SCRIPT, "split": "leave_last_out", "users": 1, "rows": 2,
                                       "items": SCRIPT}]),
        training=pd.DataFrame([{"model": SCRIPT, "epochs_run": 3}]),
        profile={"events": 5, "first_day": SCRIPT, "last_day": "2024-01-31"},
        notes=[f"table {SCRIPT} missing"],
    )
    page = to_html(data, {})
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


USERS = ["u1'", "u2", "o'brien", "x'; --", "u5", "u6"]
ITEMS = ["i'1", SCRIPT, "i3", "i4 ' OR 1=1 --", "i5", "i6"]


@pytest.mark.spark
def test_ids_with_quotes_are_plain_ids(spark, tmp_path, monkeypatch, capsys):
    """`recommend --users "u1',..."` recommends to exactly the named users, the quoted ones included, and
    `--exclude-items` drops the quoted item: the ids go through as values, nothing is spliced into SQL.

    The silver tables are written by hand (six users, six items with quotes, a SQL comment and markup in
    their ids; each user saw four items) so that only train and recommend run; the warehouse path holds
    a quote as well."""
    warehouse = str(tmp_path / "wh it's")
    write = tb.overwrite
    write(spark.createDataFrame(list(enumerate(USERS)), f"{tb.USER_IDX} int, {tb.USER_ID} string"),
          warehouse, tb.USER_INDEX)
    write(spark.createDataFrame(list(enumerate(ITEMS)), f"{tb.ITEM_IDX} int, {tb.ITEM_ID} string"),
          warehouse, tb.ITEM_INDEX)
    seen = [("leave_last_out", u, (u + n) % len(ITEMS), 1.0) for u in range(len(USERS)) for n in range(4)]
    write(spark.createDataFrame(seen, f"{tb.SPLIT} string, {tb.USER_IDX} int, {tb.ITEM_IDX} int, {tb.WEIGHT} double"),
          warehouse, tb.TRAIN, partition_by=[tb.SPLIT])

    monkeypatch.setattr(cli, "_spark", lambda app: spark)
    common = ["--warehouse", warehouse, "--run-date", "2024-03-01", "--config", CONF, "--set", "recommend.k=2"]
    assert cli.main(["train", "--model", "popularity", *common]) == 0, capsys.readouterr().err[-2000:]
    status = cli.main(["recommend", "--model", "popularity", "--users", "u1',o'brien,x'; --,nobody'",
                       "--exclude-items", "i'1", *common])
    assert status == 0, capsys.readouterr().err[-2000:]

    recs = tb.read(spark, warehouse, tb.RECOMMENDATIONS).toPandas()
    assert set(recs[tb.USER_ID]) == {"u1'", "o'brien", "x'; --"}
    assert "i'1" not in set(recs[tb.ITEM_ID])
    # Each saw four of the six items, so two are left (k = 2); o'brien's two include the excluded i'1.
    assert recs.groupby(tb.USER_ID).size().to_dict() == {"u1'": 2, "o'brien": 1, "x'; --": 2}
