"""`recsys-spark maintain`: OPTIMIZE compacts a table's small files without changing a row, VACUUM keeps
what time travel needs for the configured retention and deletes older replaced files, and neither makes
a table look changed to the pipeline's resume rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from delta.tables import DeltaTable

from recsys_spark import pipeline
from recsys_spark import tables as tb
from recsys_spark.cli import main
from recsys_spark.config import MaintenanceConfig, load_config
from recsys_spark.errors import ConfigError, RecsysError

REPO = Path(__file__).resolve().parents[1]
RETENTION_CHECK = "spark.databricks.delta.retentionDurationCheck.enabled"
COMMITS = 3  # small appends, two files each
ROWS_SCHEMA = "user_idx int, item_idx int, weight double"


def _rows(df) -> list[tuple]:
    return sorted(tuple(r) for r in df.collect())


def _files(spark, warehouse: str, name: str) -> int:
    return DeltaTable.forPath(spark, tb.table_path(warehouse, name)).detail().first()["numFiles"]


@pytest.fixture
def fragmented(spark, warehouse) -> str:
    """silver/interactions written in COMMITS appends of two files each; returns the warehouse."""
    path = tb.table_path(warehouse, tb.INTERACTIONS)
    for i in range(COMMITS):
        rows = [(i, j, float(i + j)) for j in range(6)]
        batch = spark.createDataFrame(rows, ROWS_SCHEMA)
        batch.repartition(2).write.format("delta").mode("append").save(path)
    assert _files(spark, warehouse, tb.INTERACTIONS) == 2 * COMMITS
    return warehouse


def _config(warehouse: str, hours: int = 168):
    return load_config(overrides=[f"warehouse={warehouse}", f"maintenance.vacuum_retention_hours={hours}"])


def test_defaults_equal_the_yaml_and_a_negative_retention_is_refused():
    assert load_config(REPO / "conf" / "pipeline.yaml").maintenance == MaintenanceConfig()
    assert MaintenanceConfig().vacuum_retention_hours == 168
    with pytest.raises(ConfigError, match="parallel_tables"):
        load_config(overrides=["maintenance.parallel_tables=0"])
    with pytest.raises(ConfigError, match="vacuum_retention_hours"):
        load_config(overrides=["maintenance.vacuum_retention_hours=-1"])


def test_compaction_keeps_the_rows_and_a_week_of_time_travel(spark, fragmented):
    warehouse = fragmented
    before = _rows(tb.read(spark, warehouse, tb.INTERACTIONS))
    first_version = _rows(spark.read.format("delta").option("versionAsOf", 0).load(
        tb.table_path(warehouse, tb.INTERACTIONS)))

    result = pipeline.run_maintain(spark, _config(warehouse))

    files = result["tables"][tb.INTERACTIONS]
    assert files["files_before"] == 2 * COMMITS
    assert files["files_after"] == _files(spark, warehouse, tb.INTERACTIONS) < files["files_before"]
    assert files["files_vacuumed"] == 0  # every replaced file is younger than 168 h
    assert list(result["tables"]) == [tb.INTERACTIONS]
    assert tb.INTERACTIONS not in result["missing"] and tb.BRONZE_EVENTS in result["missing"]
    assert _rows(tb.read(spark, warehouse, tb.INTERACTIONS)) == before
    again = spark.read.format("delta").option("versionAsOf", 0).load(tb.table_path(warehouse, tb.INTERACTIONS))
    assert _rows(again) == first_version and len(first_version) == 6


def test_a_short_retention_deletes_the_replaced_files_and_their_versions(spark, fragmented):
    warehouse = fragmented
    path = tb.table_path(warehouse, tb.INTERACTIONS)
    before = _rows(tb.read(spark, warehouse, tb.INTERACTIONS))
    check = spark.conf.get(RETENTION_CHECK, None)
    spark.conf.set(RETENTION_CHECK, "false")  # nothing else writes this table: a zero retention is safe here
    try:
        files = pipeline.run_maintain(spark, _config(warehouse, hours=0), [tb.INTERACTIONS])["tables"][tb.INTERACTIONS]
    finally:
        if check is None:
            spark.conf.unset(RETENTION_CHECK)
        else:
            spark.conf.set(RETENTION_CHECK, check)
    assert files["files_vacuumed"] == files["files_before"] == 2 * COMMITS
    assert len(list(Path(path).glob("*.parquet"))) == files["files_after"]
    assert _rows(tb.read(spark, warehouse, tb.INTERACTIONS)) == before
    with pytest.raises(Exception, match="(?i)does not exist|not found"):
        spark.read.format("delta").option("versionAsOf", 0).load(path).collect()


def test_delta_refusing_a_short_retention_is_one_line(spark, fragmented):
    assert spark.conf.get(RETENTION_CHECK, "true") == "true"
    with pytest.raises(RecsysError, match="VACUUM silver/interactions with a retention of 24 h") as err:
        pipeline.run_maintain(spark, _config(fragmented, hours=24))
    assert "\n" not in str(err.value) and "maintenance.vacuum_retention_hours" in str(err.value)


def test_maintenance_is_no_change_to_the_resume_rule(spark, fragmented):
    warehouse = fragmented
    tb.overwrite(spark.range(3).toDF(tb.USER_IDX), warehouse, tb.TRAIN)  # built after silver/interactions
    assert tb.is_current(spark, warehouse, tb.TRAIN, [tb.INTERACTIONS])
    written = tb.last_commit_time(spark, warehouse, tb.INTERACTIONS)

    pipeline.run_maintain(spark, _config(warehouse))

    assert tb.last_commit_time(spark, warehouse, tb.INTERACTIONS) == written
    assert tb.is_current(spark, warehouse, tb.TRAIN, [tb.INTERACTIONS])


def test_tables_maintained_side_by_side_all_end_compacted_with_their_rows(spark, warehouse):
    """``maintenance.parallel_tables`` tables at once, from threads of one session: each is compacted,
    each keeps its rows, and the listing parallelism set around them is unset afterwards."""
    names = [tb.INTERACTIONS, tb.TRAIN, tb.TEST]
    for name in names:
        for i in range(2):
            batch = spark.createDataFrame([(i, j, float(j)) for j in range(4)], ROWS_SCHEMA)
            batch.repartition(2).write.format("delta").mode("append").save(tb.table_path(warehouse, name))
    before = {name: _rows(tb.read(spark, warehouse, name)) for name in names}
    config = load_config(overrides=[f"warehouse={warehouse}", f"maintenance.parallel_tables={len(names)}"])
    done = pipeline.run_maintain(spark, config, names)
    assert sorted(done["tables"]) == sorted(names) and done["missing"] == []
    for name in names:
        assert done["tables"][name]["files_before"] == 4 and done["tables"][name]["files_after"] == 1, name
        assert _rows(tb.read(spark, warehouse, name)) == before[name], name
    assert spark.conf.get(tb.LISTING_PARALLELISM, None) is None


def test_the_command_reports_each_table_in_its_summary(spark, fragmented, capsys):
    code = main(["maintain", "--warehouse", fragmented, "--tables", f"{tb.INTERACTIONS},{tb.METRICS}"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0, out
    summary = json.loads(out[-1])
    assert summary["job"] == "maintain" and summary["status"] == "ok"
    assert summary["vacuum_retention_hours"] == 168
    assert summary["missing"] == [tb.METRICS]
    files = summary["tables"][tb.INTERACTIONS]
    assert files["files_before"] == 2 * COMMITS and files["files_after"] < files["files_before"]
    assert any(line.strip().startswith(tb.INTERACTIONS) for line in out[:-1])


def test_an_unknown_table_stops_in_one_line_naming_it(warehouse, capsys):
    assert main(["maintain", "--warehouse", warehouse, "--tables", "silver/train,silver/trian"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "silver/trian" in err[-1] and "'silver/train'" not in err[-1].split(";")[0]


def test_an_empty_warehouse_is_a_no_op(spark, warehouse, capsys):
    assert main(["maintain", "--warehouse", warehouse]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["tables"] == {} and summary["missing"] == list(tb.TABLES)
    assert f"no Delta tables to maintain under {warehouse}" in out
