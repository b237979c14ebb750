"""What production does to a batch pipeline, done for real: separate processes (each its own JVM and
SparkSession) writing the same Delta table at the same moment.

The writers meet at a file barrier after their sessions are up, so their commits race for real.
"""

from __future__ import annotations

import contextlib
import datetime as dt
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
# own table functions (what the jobs call) and prints what the write reported. Kind "compact" is
# `recsys-spark maintain`'s OPTIMIZE + VACUUM of gold/recommendations (its rows are not used).
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
    elif kind == "compact":
        print("inserted", tb.compact_and_vacuum(spark, warehouse, "gold/recommendations", 168)["files_after"])
    else:
        print("inserted", tb.insert_new(df, warehouse, "bronze/events", key="key"))
    spark.stop()
""")


def _run_at_once(tmp_path: Path, writers: dict[str, tuple[str, list[dict]]], warehouse: str) -> dict[str, int]:
    """Start one process per writer (name: (kind, rows)), let them write at the same moment, return what
    each reported."""
    barrier = tmp_path / f"barrier-{len(os.listdir(tmp_path))}"
    barrier.mkdir()
    procs = {name: subprocess.Popen(
        [sys.executable, "-c", WRITER, kind, warehouse, name, str(barrier), str(len(writers)), json.dumps(rows)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
        for name, (kind, rows) in writers.items()}
    inserted = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"writer {name} failed:\n{err[-3000:]}"
        inserted[name] = int(out.split("inserted")[-1])
    return inserted


def _world_copy(world, tmp_path: Path, name: str = "warehouse", with_gold: bool = False) -> str:
    """A private copy of the session's world warehouse, without its gold tables unless ``with_gold``."""
    warehouse = str(tmp_path / name)
    shutil.copytree(world.warehouse, warehouse, ignore=None if with_gold else shutil.ignore_patterns("gold"))
    return warehouse


def _job(command: str, model: str | None, warehouse: str, run_date, *args: str) -> list[str]:
    """The argv of ``jobs/<command>.py`` (for ``model``) on the world's settings."""
    from conftest import WORLD_SETTINGS

    sets = [arg for setting in WORLD_SETTINGS for arg in ("--set", setting)]
    return [sys.executable, str(REPO / "jobs" / f"{command}.py"), *(["--model", model] if model else []),
            "--warehouse", warehouse, "--run-date", run_date.isoformat(), *sets, *args]


def _rows(model: str, users: range) -> list[dict]:
    return [{"model": model, "user_idx": u, "item_idx": u % 7, "key": f"{model}-{u}"} for u in users]


def test_two_models_replace_their_rows_of_one_table_at_once_while_maintenance_compacts_it_and_all_land(
        spark, tmp_path):
    """Two writers replacing their own model's rows of a gold table at the same moment as ``maintain``'s
    OPTIMIZE + VACUUM of it: the compaction rewrites the very files the replace removes, so whichever
    commits later conflicts and is retried (tables._retrying) on the winner's snapshot. All land whole:
    one model's rows replaced (not appended), the other's added, a third model's untouched, and the
    table compacted. (Two writers into a table that does not exist yet: the train/recommend test below.)"""
    from recsys_spark import tables as tb

    warehouse = str(tmp_path / "warehouse")
    for model, users in {"popularity": range(40), "als": range(50)}.items():  # yesterday, one writer at a time
        rows = spark.createDataFrame(_rows(model, users), "model string, user_idx int, item_idx int, key string")
        tb.replace_where(rows.repartition(3), warehouse, "gold/recommendations", f"model = '{model}'", ["model"])
    reported = _run_at_once(tmp_path, {"als": ("replace_where", _rows("als", range(10, 30))),
                                       "itemknn": ("replace_where", _rows("itemknn", range(30))),
                                       "maintain": ("compact", [])}, warehouse)

    table = spark.read.format("delta").load(os.path.join(warehouse, "gold", "recommendations")).toPandas()
    assert table.groupby("model").size().to_dict() == {"popularity": 40, "als": 20, "itemknn": 30}
    assert sorted(table[table.model == "als"].user_idx) == list(range(10, 30))  # replaced, not appended
    assert reported["maintain"] < 6  # 2 models x 3 files before it; compacted, whatever the commit order


def test_two_ingests_of_overlapping_rows_lose_nothing_and_duplicate_nothing(spark, tmp_path):
    """Two inserts of overlapping keys into an empty table at once: the union, each key once, and the two
    reported counts add up to it (rows read = accepted + duplicates skipped holds for both jobs)."""
    warehouse = str(tmp_path / "warehouse")
    first, second = _rows("e", range(0, 60)), _rows("e", range(30, 100))
    inserted = _run_at_once(tmp_path, {"first": ("insert_new", first), "second": ("insert_new", second)}, warehouse)

    table = spark.read.format("delta").load(os.path.join(warehouse, "bronze", "events")).toPandas()
    assert sorted(table.key) == sorted(f"e-{u}" for u in range(100))
    assert sum(inserted.values()) == 100


def _together(argvs: dict[str, list[str]]) -> None:
    """Start one CLI job per name at the same moment; each must exit 0."""
    jobs = {name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
            for name, argv in argvs.items()}
    for name, job in jobs.items():
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, f"{name} failed:\n{err[-3000:]}"


def test_two_train_then_two_recommend_jobs_started_together_on_the_first_day_all_land(spark, world, tmp_path):
    """What the daily DAG does on its first day, through the CLI, into a warehouse without gold tables:
    ``train`` for ALS and for SVD started at the same moment (both create gold/user_embeddings and
    gold/item_embeddings), then ``recommend`` for popularity and for ALS at the same moment (both create
    gold/recommendations). Every job exits 0; each model has an embedding for every train user and item,
    and the recommendations hold each model's full top-k for every user."""
    from pyspark.sql import functions as F

    from recsys_spark import tables as tb

    warehouse = _world_copy(world, tmp_path)
    run_date = world.run.run_date
    assert not tb.exists(spark, warehouse, tb.USER_EMBEDDINGS)
    _together({f"train {m}": _job("train", m, warehouse, run_date) for m in ("als", "svd")})
    _together({f"recommend {m}": _job("recommend", m, warehouse, run_date) for m in ("popularity", "als")})

    users = world.train.select(tb.USER_IDX).distinct().count()
    items = world.train.select(tb.ITEM_IDX).distinct().count()
    for table, expected in ((tb.USER_EMBEDDINGS, users), (tb.ITEM_EMBEDDINGS, items)):
        counts = tb.read(spark, warehouse, table).groupBy(tb.MODEL).count().toPandas()
        assert dict(zip(counts[tb.MODEL], counts["count"], strict=True)) == {"als": expected, "svd": expected}
    # popularity's rows as the clean run that built the world wrote them; ALS: k for every train user
    clean = tb.read(spark, world.warehouse, tb.RECOMMENDATIONS).filter(F.col(tb.MODEL) == "popularity").count()
    recs = tb.read(spark, warehouse, tb.RECOMMENDATIONS).groupBy(tb.MODEL).count().toPandas()
    assert dict(zip(recs[tb.MODEL], recs["count"], strict=True)) == {"popularity": clean, "als": 10 * users}


def test_a_table_whose_creator_died_before_its_first_commit_is_created_by_the_next_write(spark, tmp_path):
    """A ``_delta_log`` folder without a commit is what a creator leaves when it is killed between making
    the folder and committing version 0, and what a second first-day writer sees meanwhile (CI met it in
    the race above: Delta's createIfNotExists fails on it with DELTA_TABLE_NOT_FOUND). The next write
    creates the table and lands its rows, by both keyed writes."""
    from recsys_spark import tables as tb

    warehouse = str(tmp_path / "warehouse")
    for name in (tb.RECOMMENDATIONS, tb.BRONZE_EVENTS):
        os.makedirs(os.path.join(warehouse, name, "_delta_log"))
    rows = spark.createDataFrame(_rows("als", range(5)), "model string, user_idx int, item_idx int, key string")
    tb.replace_where(rows, warehouse, tb.RECOMMENDATIONS, "model = 'als'", ["model"])
    assert tb.insert_new(rows, warehouse, tb.BRONZE_EVENTS, key="key") == 5
    assert tb.read(spark, warehouse, tb.RECOMMENDATIONS).count() == 5


def _train_as_the_job_does(spark, config, model: str, run_date) -> None:
    """``train`` of ``model`` in this (already warm) session, with the job's shuffle partitions: they decide
    the order in which rows meet (sums of similarities, the training rows' order in the Petastorm files)."""
    from recsys_spark import pipeline as pipeline_steps
    from recsys_spark import session

    ours = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.shuffle.partitions", session.defaults(local=True)["spark.sql.shuffle.partitions"])
    try:
        pipeline_steps.run_train(spark, config, model, pipeline_steps.Run.of(config, run_date))
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", ours)


def test_a_train_job_killed_at_any_moment_never_leaves_a_model_that_loads_half_saved(spark, world, tmp_path):
    """``train`` SIGKILLed (its whole process group: Python and JVM) over the model of the run before, at
    two moments: the instant its save starts (it has removed the old ``model.json`` and is writing the
    new state) and half-way to that instant (still fitting). Each time the model directory either loads
    whole (the old model or the new one, with recommendations equal to a clean one's) or stops with one
    line saying the save did not finish; a rerun then trains a model that loads."""
    import signal
    import time

    from conftest import WORLD_SETTINGS

    from recsys_spark import tables as tb
    from recsys_spark.config import load_config
    from recsys_spark.errors import RecsysError
    from recsys_spark.models import registry

    run_date = world.run.run_date
    warehouse = _world_copy(world, tmp_path)
    path = tb.model_dir(warehouse, "itemknn", run_date)
    meta = os.path.join(path, "model.json")
    argv = _job("train", "itemknn", warehouse, run_date)
    users = world.train.select(tb.USER_IDX).distinct()

    def recommendations():
        return sorted(registry.load("itemknn", spark, path).recommend(users, 10, seen=world.train).select(
            tb.USER_IDX, tb.ITEM_IDX).collect())

    # The model of the run before: the same training in this (already warm) session, a JVM fewer.
    _train_as_the_job_does(spark, load_config(overrides=[f"warehouse={warehouse}", *WORLD_SETTINGS]), "itemknn",
                           run_date)
    clean = recommendations()

    def train(kill_after: float | None = None) -> float:
        """Run the job; kill it ``kill_after`` seconds in, or (0) the moment its save removes model.json."""
        started = time.perf_counter()
        job = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=CHILD_ENV,
                               start_new_session=True)
        if kill_after == 0:
            while job.poll() is None and os.path.exists(meta):
                time.sleep(0.005)
        elif kill_after is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                job.wait(timeout=kill_after)
        elapsed = time.perf_counter() - started
        if kill_after is not None and job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        _, err = job.communicate(timeout=300)
        assert kill_after is not None or job.returncode == 0, err[-3000:]
        return elapsed

    def whole_or_refused() -> None:
        try:
            assert recommendations() == clean  # the old model, or the new one saved whole
        except RecsysError as exc:
            assert str(exc).startswith(f"{path} holds no complete model")

    to_save = train(kill_after=0)
    whole_or_refused()
    train(kill_after=to_save / 2)
    whole_or_refused()
    train()
    assert recommendations() == clean


def test_a_torch_train_job_killed_mid_training_resumes_from_its_last_checkpoint_like_an_uninterrupted_run(
        spark, world, tmp_path):
    """``train`` of a torch model (NCF, one local process) SIGKILLed, process group and JVM, once it has
    checkpointed two epochs: it leaves no model that loads, and ``train --resume`` continues from the last
    whole checkpoint and ends with exactly the weights and per-epoch losses of the same training run
    uninterrupted (the trainer reseeds every epoch from (seed, rank, epoch))."""
    import signal
    import time

    import torch
    from conftest import WORLD_SETTINGS

    from recsys_spark import tables as tb
    from recsys_spark.config import load_config
    from recsys_spark.errors import RecsysError
    from recsys_spark.models import registry
    from recsys_spark.train import checkpoint as ckpt

    ncf = ["backend=local", "validation_users=0", "train.epochs=12", "train.batch_size=32", "train.progress=false",
           "net.mf_dim=4", "net.mlp_layers=[8,4]"]
    settings = [f"model_params.ncf.{s}" for s in ncf]
    run_date = world.run.run_date

    # The uninterrupted run, in this (already warm) session: the same code the job runs, with the job's
    # shuffle partitions (they decide the training rows' order in the Petastorm files, hence the batches).
    clean_warehouse = _world_copy(world, tmp_path, "clean")
    _train_as_the_job_does(spark, load_config(overrides=[f"warehouse={clean_warehouse}", *WORLD_SETTINGS, *settings]),
                           "ncf", run_date)
    clean = registry.load("ncf", spark, tb.model_dir(clean_warehouse, "ncf", run_date))

    warehouse = _world_copy(world, tmp_path, "killed")
    path = tb.model_dir(warehouse, "ncf", run_date)
    checkpoints = os.path.join(path, "checkpoints")
    argv = _job("train", "ncf", warehouse, run_date, *[a for s in settings for a in ("--set", s)])
    job = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=CHILD_ENV,
                           start_new_session=True)
    while job.poll() is None and len(ckpt.epochs_saved(checkpoints)) < 2:
        time.sleep(0.01)
    assert job.poll() is None, f"train ended before its second checkpoint: {job.communicate()[1][-3000:]}"
    os.killpg(job.pid, signal.SIGKILL)
    job.communicate(timeout=60)
    done_epochs = ckpt.epochs_saved(checkpoints)
    assert 2 <= done_epochs[-1] < 12
    with pytest.raises(RecsysError):  # nothing half-trained passes for a model
        registry.load("ncf", spark, path)

    resumed = subprocess.run([*argv, "--resume"], capture_output=True, text=True, env=CHILD_ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    model = registry.load("ncf", spark, path)
    assert [r["epoch"] for r in model.history] == list(range(1, 13))
    assert [r["train_loss"] for r in model.history] == [r["train_loss"] for r in clean.history]
    for name, tensor in clean.module.state_dict().items():
        assert torch.equal(tensor, model.module.state_dict()[name]), name


def _delta_tables(warehouse: str) -> list[str]:
    return sorted(os.path.relpath(root, warehouse) for root, dirs, _ in os.walk(warehouse) if "_delta_log" in dirs)


def _data_files(table_dir: str) -> set[str]:
    return {os.path.join(root, f) for root, dirs, files in os.walk(table_dir) if "_delta_log" not in root
            for f in files if f.endswith(".parquet")}


def _contents(spark, warehouse: str) -> dict[tuple[str, str | None], list[tuple]]:
    """Every Delta table's rows, by (table, model) for tables with a model column and (table, None) for the
    others; an empty table reads like an absent one. Write-time stamps (``*_at``) are left out, floats
    rounded, so that two runs of the same day compare equal."""
    out: dict[tuple[str, str | None], list[tuple]] = {}
    for name in _delta_tables(warehouse):
        df = spark.read.format("delta").load(os.path.join(warehouse, name))  # every table must read
        columns = [c for c in df.columns if not c.endswith("_at")]
        for row in df.select(columns).collect():
            values = tuple(round(v, 6) if isinstance(v, float) else v for v in row)
            out.setdefault((name, row["model"] if "model" in columns else None), []).append(values)
    return {key: sorted(rows, key=repr) for key, rows in out.items()}


def test_a_pipeline_killed_in_each_write_keeps_every_table_whole_and_its_rerun_ends_like_a_clean_run(
        spark, world, tmp_path):
    """The next day's ``pipeline`` (new events, popularity) SIGKILLed, process group and JVM, the moment
    it starts writing bronze/events (ingest), silver/train (interactions) and gold/recommendations
    (recommend), each time resumed by a plain rerun, as an Airflow retry or a user would. After every
    kill each table (per model in gold) holds either its rows from before the attempt or those a clean
    run ends with, never part of a write; the last rerun (which also evaluates) ends with exactly the
    clean run's tables. A second pipeline of the same day started while one runs stops at once, naming
    it; the lock a killed pipeline leaves behind does not block its rerun. (No kill in evaluate's write
    of gold/metrics: it is the same ``tables.replace_where`` as recommend's, and a fourth pipeline run
    cost about 80 s of the suite.)"""
    import signal
    import time

    from conftest import WORLD_SETTINGS

    from recsys_spark import pipeline as pipeline_steps
    from recsys_spark import runlock
    from recsys_spark.config import load_config
    from recsys_spark.data import synthetic

    events = str(tmp_path / "next-day.parquet")
    day = load_config(overrides=["generate.events=800", "generate.seed=8", "generate.days=2",
                                 "generate.start_date=2024-01-21"]).generate
    synthetic.write_events(synthetic.generate_events(spark, day), events)
    run_date = world.run.run_date + dt.timedelta(days=1)
    pipeline_args = ("--input", events, "--models", "popularity", "--set", "tracking.enabled=false")

    def pipeline(warehouse: str) -> subprocess.Popen:
        return subprocess.Popen(_job("pipeline", None, warehouse, run_date, *pipeline_args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=CHILD_ENV, start_new_session=True)

    def finish(job: subprocess.Popen) -> None:
        _, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-3000:]

    # The clean run: the same pipeline, uninterrupted, in this (already warm) session.
    clean_warehouse = _world_copy(world, tmp_path, "clean", with_gold=True)
    config = load_config(overrides=[f"warehouse={clean_warehouse}", *WORLD_SETTINGS, "models=[popularity]",
                                    "tracking.enabled=false"])
    pipeline_steps.run_pipeline(spark, config, events, "canonical", run=pipeline_steps.Run.of(config, run_date),
                                echo=lambda _: None)
    clean = _contents(spark, clean_warehouse)

    warehouse = _world_copy(world, tmp_path, "killed", with_gold=True)
    after = _contents(spark, warehouse)
    for target in ("bronze/events", "silver/train", "gold/recommendations"):
        before = after
        table_dir = os.path.join(warehouse, target)
        files = _data_files(table_dir)
        job = pipeline(warehouse)
        if target == "bronze/events":  # meanwhile, the same day's pipeline again: it must stop at once
            while job.poll() is None and not runlock.holder(runlock.lock_path(warehouse, run_date)):
                time.sleep(0.01)
            second = subprocess.run(_job("pipeline", None, warehouse, run_date, *pipeline_args), capture_output=True,
                                    text=True, env=CHILD_ENV, timeout=120)
            assert second.returncode == 2
            assert "already running" in second.stderr.splitlines()[-1]
            assert f"pid {job.pid} " in second.stderr.splitlines()[-1]
        while job.poll() is None and not _data_files(table_dir) - files:
            time.sleep(0.01)
        assert job.poll() is None, f"the pipeline ended before writing {target}: {job.communicate()[1][-3000:]}"
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()

        after = _contents(spark, warehouse)
        for key in before.keys() | after.keys() | clean.keys():
            assert after.get(key) in (before.get(key), clean.get(key)), f"{key} is neither whole before nor after"

    finish(pipeline(warehouse))
    assert _contents(spark, warehouse) == clean
