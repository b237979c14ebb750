"""What production does to a batch pipeline, done for real: separate processes (each its own JVM and
SparkSession) writing the same Delta table at the same moment.

The writers meet at a file barrier after their sessions are up, so their commits race for real.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.faults, pytest.mark.spark]

REPO = Path(__file__).resolve().parents[1]
# Children import this checkout's code, with a small driver (three JVMs may share the two cores).
CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO), "RECSYS_SPARK_DRIVER_MEMORY": "1g"}

# One writer: builds its rows, says it is ready, waits for the others, then writes with the project's
# own table functions (what the jobs call) and prints what the write reported.
WRITER = textwrap.dedent("""
    import json, os, sys, time
    from recsys_spark import tables as tb
    from recsys_spark.session import get_spark

    kind, warehouse, name, barrier, n_writers, rows = sys.argv[1:7]
    spark = get_spark("faults-" + name, extra_conf={"spark.sql.shuffle.partitions": "1"})
    df = spark.createDataFrame(json.loads(rows), "model string, user_idx int, item_idx int, key string")
    df = df.persist()
    df.count()
    open(os.path.join(barrier, name), "w").close()
    while len(os.listdir(barrier)) < int(n_writers):
        time.sleep(0.005)
    if kind == "replace_where":
        tb.replace_where(df, warehouse, "gold/recommendations", f"model = '{name}'", ["model"])
        print("inserted", df.count())
    else:
        print("inserted", tb.insert_new(df, warehouse, "bronze/events", key="key"))
    spark.stop()
""")


def _run_at_once(tmp_path: Path, kind: str, writers: dict[str, list[dict]], warehouse: str) -> dict[str, int]:
    """Start one process per writer, let them write at the same moment, return what each inserted."""
    barrier = tmp_path / f"barrier-{kind}-{len(os.listdir(tmp_path))}"
    barrier.mkdir()
    procs = {name: subprocess.Popen(
        [sys.executable, "-c", WRITER, kind, warehouse, name, str(barrier), str(len(writers)), json.dumps(rows)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV) for name, rows in writers.items()}
    inserted = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"writer {name} failed:\n{err[-3000:]}"
        inserted[name] = int(out.split("inserted")[-1])
    return inserted


def _world_copy(world, tmp_path: Path) -> str:
    """A private copy of the session's world warehouse without its gold tables."""
    warehouse = str(tmp_path / "warehouse")
    shutil.copytree(world.warehouse, warehouse, ignore=shutil.ignore_patterns("gold"))
    return warehouse


def _job(command: str, model: str, warehouse: str, run_date) -> list[str]:
    """The argv of ``jobs/<command>.py`` for ``model`` on the world's settings."""
    from conftest import WORLD_SETTINGS

    sets = [arg for setting in WORLD_SETTINGS for arg in ("--set", setting)]
    return [sys.executable, str(REPO / "jobs" / f"{command}.py"), "--model", model, "--warehouse", warehouse,
            "--run-date", run_date.isoformat(), *sets]


def _rows(model: str, users: range) -> list[dict]:
    return [{"model": model, "user_idx": u, "item_idx": u % 7, "key": f"{model}-{u}"} for u in users]


def test_two_models_write_a_table_that_does_not_exist_yet_and_both_land(spark, tmp_path):
    """The daily DAG's parallel recommend tasks on their first day: both writers' rows are there, whole."""
    warehouse = str(tmp_path / "warehouse")
    writers = {"popularity": _rows("popularity", range(40)), "als": _rows("als", range(50))}
    _run_at_once(tmp_path, "replace_where", writers, warehouse)
    _run_at_once(tmp_path, "replace_where", {"als": _rows("als", range(10, 30)),
                                             "itemknn": _rows("itemknn", range(30))}, warehouse)

    table = spark.read.format("delta").load(os.path.join(warehouse, "gold", "recommendations")).toPandas()
    assert table.groupby("model").size().to_dict() == {"popularity": 40, "als": 20, "itemknn": 30}
    assert sorted(table[table.model == "als"].user_idx) == list(range(10, 30))  # replaced, not appended


def test_two_ingests_of_overlapping_rows_lose_nothing_and_duplicate_nothing(spark, tmp_path):
    """Two inserts of overlapping keys into an empty table at once: the union, each key once, and the two
    reported counts add up to it (rows read = accepted + duplicates skipped holds for both jobs)."""
    warehouse = str(tmp_path / "warehouse")
    first, second = _rows("e", range(0, 60)), _rows("e", range(30, 100))
    inserted = _run_at_once(tmp_path, "insert_new", {"first": first, "second": second}, warehouse)

    table = spark.read.format("delta").load(os.path.join(warehouse, "bronze", "events")).toPandas()
    assert sorted(table.key) == sorted(f"e-{u}" for u in range(100))
    assert sum(inserted.values()) == 100


def test_two_recommend_jobs_started_together_on_the_first_day_both_land(spark, world, tmp_path):
    """What the daily DAG does on its first day, through the CLI: ``recommend`` for popularity and for ALS
    started at the same moment into a warehouse without ``gold/recommendations``; both exit 0 and the
    table holds each model's full top-k for every user."""
    from conftest import WORLD_SETTINGS
    from pyspark.sql import functions as F

    from recsys_spark import pipeline
    from recsys_spark import tables as tb
    from recsys_spark.config import load_config

    warehouse = _world_copy(world, tmp_path)
    config = load_config(overrides=[f"warehouse={warehouse}", *WORLD_SETTINGS])
    pipeline.run_train(spark, config, "als", world.run)
    assert not tb.exists(spark, warehouse, tb.RECOMMENDATIONS)

    jobs = {model: subprocess.Popen(_job("recommend", model, warehouse, world.run.run_date), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
            for model in ("popularity", "als")}
    for model, job in jobs.items():
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, f"recommend --model {model} failed:\n{err[-3000:]}"

    # popularity's rows as the clean run that built the world wrote them; ALS: k for every train user
    clean = tb.read(spark, world.warehouse, tb.RECOMMENDATIONS).filter(F.col(tb.MODEL) == "popularity").count()
    users = world.train.select(tb.USER_IDX).distinct().count()
    recs = tb.read(spark, warehouse, tb.RECOMMENDATIONS).groupBy(tb.MODEL).count().toPandas()
    assert dict(zip(recs[tb.MODEL], recs["count"], strict=True)) == {"popularity": clean, "als": 10 * users}


def test_a_train_job_killed_at_any_moment_never_leaves_a_model_that_loads_half_saved(spark, world, tmp_path):
    """``train`` SIGKILLed (its whole process group: Python and JVM) at several moments, each over the
    model of the run before: the model directory either loads whole (the old model or the new one, with
    recommendations equal to a clean one's) or stops with one line saying the save did not finish; a
    rerun then trains a model that loads."""
    import signal
    import time

    from recsys_spark import tables as tb
    from recsys_spark.errors import RecsysError
    from recsys_spark.models import registry

    warehouse = _world_copy(world, tmp_path)
    path = tb.model_dir(warehouse, "itemknn", world.run.run_date)
    argv = _job("train", "itemknn", warehouse, world.run.run_date)

    def train(kill_after: float | None = None) -> float:
        started = time.perf_counter()
        job = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=CHILD_ENV,
                               start_new_session=True)
        if kill_after is not None:
            try:
                job.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                os.killpg(job.pid, signal.SIGKILL)
        _, err = job.communicate(timeout=300)
        assert kill_after is not None or job.returncode == 0, err[-3000:]
        return time.perf_counter() - started

    users = world.train.select(tb.USER_IDX).distinct()

    def recommendations():
        return sorted(registry.load("itemknn", spark, path).recommend(users, 10, seen=world.train).select(
            tb.USER_IDX, tb.ITEM_IDX).collect())

    clean_seconds = train()
    clean = recommendations()
    for fraction in (0.6, 0.85, 0.95):
        train(kill_after=fraction * clean_seconds)
        try:
            assert recommendations() == clean  # the old model, or the new one saved whole
        except RecsysError as exc:
            assert str(exc).startswith(f"{path} holds no complete model")
    train()
    assert recommendations() == clean
