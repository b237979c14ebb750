"""The publish gate of the recsys_daily DAG: the day's gold rows are there for every model.

    spark-submit ... scripts/airflow/publish_check.py --warehouse W --run-date YYYY-MM-DD --models a,b

Exits 1, naming what is missing, when a model has no rows for the run date in gold/recommendations or
gold/metrics, so the DAG run fails instead of consumers reading half a day. Otherwise it prints one JSON
line like the jobs' summaries: rows and users per model, and the Delta version of each table that holds
the day (what a consumer pins with ``versionAsOf``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time

from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.session import get_spark

CHECKED = (tb.RECOMMENDATIONS, tb.METRICS)


def check(spark: SparkSession, warehouse: str, run_date: dt.date, models: list[str]) -> tuple[dict, list[str]]:
    """(summary, problems): per checked table, its version and each model's rows for ``run_date``."""
    summary: dict = {}
    problems: list[str] = []
    for name in CHECKED:
        if not tb.exists(spark, warehouse, name):
            problems.append(f"{name} does not exist under {warehouse}")
            continue
        table = DeltaTable.forPath(spark, tb.table_path(warehouse, name))
        version = table.history(1).select("version").first()[0]
        day = table.toDF().filter(F.col(tb.RUN_DATE) == F.lit(run_date))
        aggs = [F.count(F.lit(1)).alias("rows")]
        if name == tb.RECOMMENDATIONS:
            aggs.append(F.countDistinct(tb.USER_ID).alias("users"))
        found = {r[tb.MODEL]: r.asDict() for r in day.groupBy(tb.MODEL).agg(*aggs).collect()}
        per_model = {}
        for model in models:
            row = found.get(model, {"rows": 0})
            per_model[model] = {k: v for k, v in row.items() if k != tb.MODEL}
            if not row["rows"]:
                problems.append(f"no rows of {model} for run date {run_date} in {name}")
        summary[name] = {"version": version, "models": per_model}
    return summary, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warehouse", required=True)
    parser.add_argument("--run-date", required=True, type=dt.date.fromisoformat)
    parser.add_argument("--models", required=True, help="comma-separated model names")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    started = time.monotonic()
    summary, problems = check(get_spark("recsys-spark-publish"), args.warehouse, args.run_date, models)
    status = "failed" if problems else "ok"
    line = {"job": "publish", "run_date": args.run_date.isoformat(), "warehouse": args.warehouse,
            "tables": summary, "duration_s": round(time.monotonic() - started, 2), "status": status}
    if problems:
        line["error"] = "; ".join(problems)
    print(json.dumps(line))
    if problems:
        print(f"publish: error: {line['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
