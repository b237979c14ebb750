"""generate -> ingest -> interactions end to end on a small synthetic log, re-runs, and the CLI's errors."""

from __future__ import annotations

import json

import pytest
from pyspark.sql import functions as F

from recsys_spark import pipeline
from recsys_spark import tables as tb
from recsys_spark.cli import main
from recsys_spark.config import load_config
from recsys_spark.data import synthetic

pytestmark = pytest.mark.spark

SILVER = [tb.USER_INDEX, tb.ITEM_INDEX, tb.INTERACTIONS, tb.TRAIN, tb.TEST, tb.SEQUENCES, tb.SESSIONS]


def _snapshot(spark, warehouse):
    return {name: sorted(tb.read(spark, warehouse, name).collect()) for name in [tb.BRONZE_EVENTS, *SILVER]}


def test_generate_ingest_interactions_and_rerun(spark, tmp_path, warehouse):
    config = load_config(overrides=[f"warehouse={warehouse}", "generate.events=6000", "generate.seed=3"])
    raw = str(tmp_path / "events.parquet")
    n = synthetic.write_events(synthetic.generate_events(spark, config.generate), raw)

    s = pipeline.run_ingest(spark, config, raw, "canonical")
    assert (s.rows_read, s.accepted, s.rejected_total, s.duplicates) == (n, n, 0, 0)
    counts = pipeline.run_interactions(spark, config)
    assert all(counts[name] > 0 for name in SILVER)

    inter = tb.read(spark, warehouse, tb.INTERACTIONS)
    # the 2-core filter holds: every user has >= 2 items and every item >= 2 users
    assert inter.groupBy(tb.USER_IDX).count().agg(F.min("count")).first()[0] >= 2
    assert inter.groupBy(tb.ITEM_IDX).count().agg(F.min("count")).first()[0] >= 2
    # indices are dense 0..n-1
    users = tb.read(spark, warehouse, tb.USER_INDEX)
    assert users.agg(F.min(tb.USER_IDX), F.max(tb.USER_IDX)).first() == (0, users.count() - 1)
    # leave-last-out: one test item per user with >= 2 items, never in that user's train part
    train = tb.read(spark, warehouse, tb.TRAIN).filter(F.col(tb.SPLIT) == "leave_last_out")
    test = tb.read(spark, warehouse, tb.TEST).filter(F.col(tb.SPLIT) == "leave_last_out")
    assert test.count() == inter.select(tb.USER_IDX).distinct().count()
    assert test.join(train, [tb.USER_IDX, tb.ITEM_IDX]).count() == 0
    assert train.count() + test.count() == inter.count()
    seq = tb.read(spark, warehouse, tb.SEQUENCES).first()
    assert len(seq[tb.ITEMS]) == config.interactions.max_sequence_length

    before = _snapshot(spark, warehouse)
    again = pipeline.run_ingest(spark, config, raw, "canonical")
    assert (again.accepted, again.duplicates) == (0, n)
    pipeline.run_interactions(spark, config)
    assert _snapshot(spark, warehouse) == before


def _cli(capsys, *argv) -> tuple[int, dict, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]), err


def test_cli_errors_are_one_clear_line(spark, tmp_path, warehouse, capsys):
    code, summary, err = _cli(capsys, "ingest", "--input", str(tmp_path / "missing.csv"), "--preset", "taobao",
                              "--warehouse", warehouse)
    assert code == 2 and summary["status"] == "failed"
    assert err.strip().splitlines()[-1].endswith(f"input path does not exist: {tmp_path / 'missing.csv'}")

    code, _, err = _cli(capsys, "interactions", "--warehouse", warehouse)
    assert code == 2 and "table bronze/events not found" in err and "recsys-spark ingest" in err

    code, _, err = _cli(capsys, "interactions", "--warehouse", warehouse, "--set", "interactions.test_fraction=2")
    assert code == 2 and "interactions.test_fraction" in err.splitlines()[-1]

    code, _, err = _cli(capsys, "train", "--model", "nosuch", "--warehouse", warehouse)
    assert code == 2


def test_cli_ingest_prints_summary_and_json(spark, tmp_path, warehouse, capsys):
    path = tmp_path / "UserBehavior.csv"
    path.write_text("1,10,100,pv,1511544070\n1,11,100,buy,1511544071\n1,11,100,buy,oops\n")
    code, summary, _ = _cli(capsys, "ingest", "--input", str(path), "--preset", "taobao", "--warehouse", warehouse)
    assert code == 0
    assert (summary["rows_in"], summary["rows_out"], summary["rejected"], summary["duplicates"]) == (3, 2, 1, 0)
    assert summary["job"] == "ingest" and summary["status"] == "ok"
