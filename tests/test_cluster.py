"""The jobs on a real Spark standalone cluster: one master and two one-core workers on loopback.

spark-submit runs the pipeline with --py-files (the built wheel) on generated events; ALS (``als_cg``:
its conjugate-gradient solves and broadcasts) trains on the executors and NCF trains on two Horovod
ranks. Asserts that tasks ran in both executor processes, that the two ranks ran in two different
executors, and that the Delta outputs are complete. The cluster's processes are stopped by their ids
even when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from recsys_spark import tables as tb
from recsys_spark.session import DELTA_PACKAGES, delta_jars

pytestmark = [pytest.mark.cluster, pytest.mark.spark]

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


class Cluster:
    def __init__(self, root: Path) -> None:
        import pyspark

        self.root = root
        self.spark_home = Path(pyspark.__file__).parent
        self.port, self.web = _free_port(), _free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.work_dirs = [root / f"worker{i}" for i in range(2)]
        self.env = {**os.environ, "SPARK_HOME": str(self.spark_home), "SPARK_LOCAL_IP": "127.0.0.1",
                    "PYSPARK_PYTHON": sys.executable, "SPARK_NO_DAEMONIZE": "1",
                    # A master starved of CPU for 60 s (the default) dropped both workers and the app got
                    # new executors, under a loaded 2-core machine; losing a worker is not this test's subject.
                    "SPARK_MASTER_OPTS": "-Dspark.worker.timeout=600"}
        self.procs: list[subprocess.Popen] = []

    def _start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.procs.append(subprocess.Popen(
            [str(self.spark_home / "bin" / "spark-class"), *args], env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        ))

    def alive_workers(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web}/json/", timeout=2) as resp:
            state = json.load(resp)
        return sum(w["state"] == "ALIVE" for w in state["workers"])

    def start(self) -> None:
        self._start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                    "--port", str(self.port), "--webui-port", str(self.web))
        for i, work_dir in enumerate(self.work_dirs):
            work_dir.mkdir()
            self._start(f"worker{i}", "org.apache.spark.deploy.worker.Worker", self.url, "--cores", "1",
                        "--memory", "2g", "--work-dir", str(work_dir), "--webui-port", str(_free_port()))
        _wait(lambda: self.alive_workers() == 2, "two ALIVE workers")

    def stop(self) -> None:
        """Each process was started in its own session: the group holds it and its executors."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def executor_logs(self) -> list[Path]:
        return sorted(p for d in self.work_dirs for p in d.glob("app-*/*/stderr"))


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _spark_submit(cluster: Cluster, wheel: str, job: str, *args: str) -> subprocess.CompletedProcess:
    jars = delta_jars()
    delivery = ["--jars", ",".join(jars)] if jars else ["--packages", DELTA_PACKAGES]
    cmd = [
        str(cluster.spark_home / "bin" / "spark-submit"), "--master", cluster.url, *delivery,
        "--properties-file", str(REPO / "conf" / "spark" / "local.conf"),
        "--conf", "spark.master=" + cluster.url,
        "--conf", "spark.jars.packages=",
        "--conf", "spark.driver.memory=2g", "--conf", "spark.executor.memory=1500m",
        "--conf", "spark.executor.cores=1", "--conf", "spark.task.cpus=1",
        "--conf", "spark.sql.shuffle.partitions=4", "--conf", "spark.default.parallelism=2",
        "--conf", f"spark.pyspark.python={sys.executable}",
        "--conf", f"spark.executorEnv.PYSPARK_PYTHON={sys.executable}",
        "--py-files", wheel, str(REPO / "jobs" / f"{job}.py"), *args,
    ]
    return subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=900)


def test_pipeline_on_standalone_cluster(cluster, spark, tmp_path):
    wheel = subprocess.run([str(REPO / "scripts" / "build_pyfiles.sh"), str(tmp_path / "dist")], check=True,
                           capture_output=True, text=True).stdout.strip().splitlines()[-1]
    warehouse = str(tmp_path / "warehouse")
    small = ["--warehouse", warehouse, "--run-date", "2026-01-02",
             "--set", "generate.events=4000", "--set", "recommend.k=20", "--set", "evaluate.ks=[10,20]",
             "--set", "models=[popularity,als_cg,ncf]",
             "--set", "model_params.als_cg.rank=8", "--set", "model_params.als_cg.max_iter=3",
             "--set", "model_params.ncf.backend=horovod", "--set", "model_params.ncf.num_proc=2",
             "--set", "model_params.ncf.train.epochs=2", "--set", "model_params.ncf.validation_users=50"]
    result = _spark_submit(cluster, wheel, "pipeline", *small)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "ok"

    # tasks ran in two executor processes, one per worker
    logs = cluster.executor_logs()
    assert len(logs) == 2, logs
    assert all("Running task" in p.read_text(errors="replace") for p in logs)

    # the two Horovod ranks ran in two different executor processes
    meta = json.loads((Path(warehouse) / "models" / "ncf" / "2026-01-02" / "model.json").read_text())
    ranks = meta["ranks"]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert len({r["executor_pid"] for r in ranks}) == 2 and None not in {r["executor_pid"] for r in ranks}

    recs = spark.read.format("delta").load(tb.table_path(warehouse, tb.RECOMMENDATIONS))
    assert {r.model for r in recs.select(tb.MODEL).distinct().collect()} == {"popularity", "als_cg", "ncf"}
    metrics = spark.read.format("delta").load(tb.table_path(warehouse, tb.METRICS))
    assert metrics.filter("metric = 'ndcg' AND k = 10").count() == 3
