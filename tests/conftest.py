"""One SparkSession for the whole test run; tiny data; real Delta tables in temporary warehouses."""

from __future__ import annotations

import datetime as dt
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def spark():
    # 3 GB: up to 0.95 GB stays held after a full GC late in a whole run (see below), and ML-100K's
    # evaluation needs its working room on top of that; the fault tests' child JVMs get 1 GB each.
    os.environ.setdefault("RECSYS_SPARK_DRIVER_MEMORY", "3g")
    from recsys_spark.session import get_spark

    # One session runs thousands of small jobs, and the status store keeps the last 1000 SQL executions
    # with their plan graphs and metrics (the UI's history, kept with the UI off). In a whole run this
    # JVM (2 GB then) once died of a task's OutOfMemoryError late in the suite; that ends a local-mode
    # JVM. With a full GC after each module, the heap still held after test_deep_pipeline was 876 MB with
    # the default history and 779 MB with this one. The plan metrics left the top of the heap histogram;
    # what holds the rest is not yet found. Nothing reads that history here.
    retained = {"spark.sql.ui.retainedExecutions": "20", "spark.ui.retainedJobs": "50",
                "spark.ui.retainedStages": "50", "spark.ui.retainedTasks": "2000"}
    session = get_spark(
        "recsys-spark-tests",
        extra_conf={"spark.sql.shuffle.partitions": "2", "spark.default.parallelism": "2", **retained},
    )
    yield session
    session.stop()


@pytest.fixture
def warehouse(tmp_path) -> str:
    return str(tmp_path / "warehouse")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip cleanly without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def torch_one_thread():
    """Tiny torch models: one thread is fastest, leaves the other core free, and the seed is fixed."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(before)


# A small synthetic warehouse: 2,500 generated events through ingest, interactions and features.
WORLD_RUN_DATE = dt.date(2026, 1, 2)
WORLD_SETTINGS = ["generate.events=2500", "generate.seed=7", "generate.days=20", "recommend.k=10",
                  "evaluate.ks=[10,20]"]


@pytest.fixture(scope="session")
def world(spark, tmp_path_factory):
    """A synthetic warehouse up to the feature tables, built once for the session by the pipeline's own
    steps, with popularity's recommendations in gold for WORLD_RUN_DATE; ``train`` is the run's split."""
    from pyspark.sql import functions as F

    from recsys_spark import pipeline
    from recsys_spark import tables as tb
    from recsys_spark.config import load_config

    warehouse = str(tmp_path_factory.mktemp("world") / "warehouse")
    config = load_config(overrides=[f"warehouse={warehouse}", *WORLD_SETTINGS])
    run = pipeline.Run.of(config, WORLD_RUN_DATE)
    pipeline.run_ingest(spark, config, pipeline.synthetic_input(spark, config), "canonical")
    pipeline.run_interactions(spark, config)
    pipeline.run_features(spark, config)
    pipeline.run_train(spark, config, "popularity", run)
    pipeline.run_recommend(spark, config, "popularity", run)
    train = tb.read(spark, warehouse, tb.TRAIN).filter(F.col(tb.SPLIT) == run.split).drop(tb.SPLIT).persist()
    return SimpleNamespace(config=config, run=run, warehouse=warehouse, train=train)
