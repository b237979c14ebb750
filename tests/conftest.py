"""One SparkSession for the whole test run; tiny data; real Delta tables in temporary warehouses."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def spark():
    os.environ.setdefault("RECSYS_SPARK_DRIVER_MEMORY", "2g")
    from recsys_spark.session import get_spark

    session = get_spark(
        "recsys-spark-tests",
        extra_conf={"spark.sql.shuffle.partitions": "2", "spark.default.parallelism": "2"},
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
