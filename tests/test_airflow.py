"""The Airflow DAG (scripts/airflow/recsys_daily.py) in Airflow's own venv: it imports, has the
intended shape, and one `airflow dags test` runs the whole day on local Spark into Delta tables.

scripts/setup_airflow.sh makes (or reuses) the Airflow venv. Every Airflow command runs there in a
subprocess, with a temporary AIRFLOW_HOME (SQLite metadata DB, no examples), the DAG's settings in the
`recsys_daily` Variable and the Spark connection given through the environment, and this venv's bin
first on the PATH so that SparkSubmitOperator runs this stack's `spark-submit`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from recsys_spark.session import driver_java_options

pytestmark = pytest.mark.airflow

REPO = Path(__file__).resolve().parents[1]
PROJECT_BIN = Path(sys.executable).parent
RUN_DATE = "2026-11-20"
MODELS = ["popularity", "als"]
# The model of the whole-day run: ALS, whose tasks take the DAG's fold-in / refit path. One model, not
# MODELS: `dags test` runs the tasks one after another, so a second model adds its two spark-submits
# (about 40 s) and nothing the parsed DAG's fan-out (test_dag_shape_retries_and_arguments) and the
# pipeline's multi-model tests (test_deep_pipeline, test_faults) do not already check.
DAY_MODEL = "als"
CONN_ID = "recsys_local_spark"
K = 10
# Small enough for a whole run in a few minutes on 2 cores.
OVERRIDES = [f"recommend.k={K}", "evaluate.ks=[5,10]", "model_params.als.rank=8", "model_params.als.max_iter=3"]
# The drivers start from the venv's class archive as README "On a cluster with spark-submit" says.
SPARK_CONF = {"spark.driver.memory": "1g", "spark.sql.shuffle.partitions": "2", "spark.default.parallelism": "2",
              "spark.databricks.delta.snapshotPartitions": "2",
              "spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
              "spark.driver.extraJavaOptions": driver_java_options()}

# Parses the DAG folder once per settings variant, in one process (importing Airflow costs ~5 s): argv[2] is a
# JSON file of {variant: settings}; each is given through the Variable's environment variable, which Airflow
# reads again on every parse.
DUMP_DAGS = """
import json, os, sys
from airflow.models.dagbag import DagBag
result = {}
for name, settings in json.load(open(sys.argv[2])).items():
    os.environ["AIRFLOW_VAR_RECSYS_DAILY"] = json.dumps(settings)
    bag = DagBag(sys.argv[1])
    dag = bag.dags.get("recsys_daily")
    out = {"import_errors": {str(k): str(v) for k, v in bag.import_errors.items()}, "tasks": {}}
    if dag is not None:
        out["dag"] = {"max_active_runs": dag.max_active_runs, "catchup": dag.catchup,
                      "timetable": type(dag.timetable).__name__}
        for t in dag.tasks:
            out["tasks"][t.task_id] = {
                "operator": type(t).__name__, "upstream": sorted(t.upstream_task_ids),
                "retries": t.retries, "backoff": float(t.retry_exponential_backoff),
                "retry_delay_s": t.retry_delay.total_seconds(), "max_retry_delay_s": t.max_retry_delay.total_seconds(),
                "application": t.application, "args": t.application_args, "conf": t.conf, "jars": t.jars,
                "packages": t.packages, "py_files": t.py_files, "conn_id": t._conn_id,
            }
    result[name] = out
print("DAG-JSON " + json.dumps(result))
"""


class Airflow:
    """Runs the Airflow CLI (or Python) of the Airflow venv with one AIRFLOW_HOME and environment."""

    def __init__(self, venv: Path, home: Path, settings: dict, log_dir: Path):
        self.venv, self.home, self.log_dir = venv, home, log_dir
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYSPARK_GATEWAY"))}
        env.update({
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "scripts" / "airflow"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "PATH": f"{PROJECT_BIN}{os.pathsep}{env.get('PATH', '')}",
            "SPARK_LOCAL_IP": "127.0.0.1",
            f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps({
                "conn_type": "spark", "host": "local[2]",
                "extra": {"spark-binary": "spark-submit", "deploy-mode": "client"},
            }),
        })
        self.env = env
        self.settings = settings

    def run(self, *args: str, settings: dict | None = None, timeout: float = 300,
            log: str | None = None) -> subprocess.CompletedProcess:
        env = dict(self.env, AIRFLOW_VAR_RECSYS_DAILY=json.dumps(settings or self.settings))
        cmd = [str(self.venv / "bin" / args[0]), *args[1:]]
        if log is None:
            return subprocess.run(cmd, env=env, cwd=self.home, capture_output=True, text=True, timeout=timeout)
        path = self.log_dir / log
        with open(path, "w") as fh:
            done = subprocess.run(cmd, env=env, cwd=self.home, stdout=fh, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout)
        done.stdout = path.read_text()
        return done

    def dags(self, variants: dict[str, dict]) -> dict[str, dict]:
        """The DAG as parsed with each variant's settings: {variant: {"import_errors", "tasks", "dag"}}."""
        path = self.log_dir / "dag-variants.json"
        path.write_text(json.dumps(variants))
        done = self.run("python", "-c", DUMP_DAGS, str(REPO / "scripts" / "airflow"), str(path))
        assert done.returncode == 0, done.stderr[-3000:]
        line = next(x for x in done.stdout.splitlines() if x.startswith("DAG-JSON "))
        return json.loads(line.removeprefix("DAG-JSON "))


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


@pytest.fixture(scope="module")
def airflow_venv() -> Path:
    done = subprocess.run(["bash", str(REPO / "scripts" / "setup_airflow.sh")], capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> Path:
    """A small synthetic event log, written by the project's CLI."""
    path = tmp_path_factory.mktemp("airflow-input") / "events.parquet"
    done = subprocess.run(
        [sys.executable, "-m", "recsys_spark", "generate", "--events", "3000", "--seed", "7", "--output", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "RECSYS_SPARK_DRIVER_MEMORY": "1g"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return path


@pytest.fixture(scope="module")
def airflow(airflow_venv, events, tmp_path_factory) -> Airflow:
    root = tmp_path_factory.mktemp("airflow")
    settings = {
        "models": MODELS,
        "warehouse": str(root / "warehouse"),
        "input": str(events),
        "spark_conn_id": CONN_ID,
        "python": sys.executable,
        "overrides": OVERRIDES,
        "spark_conf": SPARK_CONF,
    }
    af = Airflow(airflow_venv, root / "home", settings, root)
    af.home.mkdir()
    done = af.run("airflow", "db", "migrate", timeout=600)
    assert done.returncode == 0, _tail(done.stdout + done.stderr)
    return af


@pytest.fixture(scope="module")
def dags(airflow) -> dict[str, dict]:
    """The DAG parsed under every settings variant the tests below read, in one Airflow process."""
    s = airflow.settings
    deepfm = {**s, "models": ["popularity", "als", "deepfm"],
              "overrides": [*OVERRIDES, "model_params.deepfm.candidates=als"]}
    return airflow.dags({
        "default": s,
        "misspelt_key": {**s, "modles": ["als"]},
        "no_maintain": {**s, "maintain": False},
        "maintain_not_a_bool": {**s, "maintain": "no"},
        "models_from_config": {k: v for k, v in s.items() if k != "models"},
        "deepfm": deepfm,
        # Re-ranking a model the DAG does not run.
        "deepfm_of_sasrec": {**deepfm, "overrides": [*OVERRIDES, "model_params.deepfm.candidates=sasrec"]},
        "refit_daily": {**s, "refit_every_days": 1},
        "refit_never": {**s, "refit_every_days": 0},
    })


def test_dag_folder_has_no_import_errors(airflow, dags):
    done = airflow.run("airflow", "dags", "list-import-errors", "--local", "--output", "json")
    assert done.returncode == 0, _tail(done.stderr)
    assert "recsys_daily" not in done.stdout and "Traceback" not in done.stdout, done.stdout
    assert dags["default"]["import_errors"] == {}


def test_a_bad_variable_is_an_import_error_that_names_the_key(dags):
    dag = dags["misspelt_key"]
    assert dag["tasks"] == {}
    assert any("modles" in err for err in dag["import_errors"].values()), dag["import_errors"]


def test_dag_shape_retries_and_arguments(airflow, dags):
    from recsys_spark.session import DELTA_VERSION

    dag = dags["default"]
    assert dag["import_errors"] == {}
    assert dag["dag"] == {"max_active_runs": 1, "catchup": False, "timetable": "CronDataIntervalTimetable"}
    tasks = dag["tasks"]
    expected_upstream = {
        "ingest": [],
        "interactions": ["ingest"],
        **{f"train_{m}": ["interactions"] for m in MODELS},
        **{f"recommend_{m}": [f"train_{m}"] for m in MODELS},
        "evaluate": sorted(f"recommend_{m}" for m in MODELS),
        "publish": ["evaluate"],
        "maintain": ["publish"],
    }
    assert {t: tasks[t]["upstream"] for t in tasks} == expected_upstream
    warehouse = airflow.settings["warehouse"]
    for task_id, task in tasks.items():
        assert task["operator"] == "SparkSubmitOperator", task_id
        assert task["conn_id"] == CONN_ID
        # Defaults: 3 retries, 5 min doubling each try, at most an hour.
        assert (task["retries"], task["backoff"]) == (3, 2.0), task_id
        assert (task["retry_delay_s"], task["max_retry_delay_s"]) == (300, 3600), task_id
        args = task["args"]
        assert args[args.index("--run-date") + 1] == "{{ ds }}", task_id
        assert args[args.index("--warehouse") + 1] == warehouse, task_id
        assert Path(task["application"]).is_file(), task["application"]
        assert task["conf"]["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
        assert task["conf"]["spark.sql.catalog.spark_catalog"].endswith("DeltaCatalog")
        assert task["conf"]["spark.pyspark.python"] == sys.executable
        assert f"{DELTA_VERSION}" in (task["jars"] or task["packages"]), task
        assert task["py_files"] is None
        if task_id != "publish":
            assert Path(args[args.index("--config") + 1]) == REPO / "conf" / "pipeline.yaml"
            assert [args[i + 1] for i, a in enumerate(args) if a == "--set"] == OVERRIDES, task_id
    assert tasks["ingest"]["application"] == str(REPO / "jobs" / "ingest.py")
    assert tasks["ingest"]["args"][:4] == ["--input", airflow.settings["input"], "--preset", "canonical"]
    for m in MODELS:
        for step in ("train", "recommend"):
            task = tasks[f"{step}_{m}"]
            assert task["application"] == str(REPO / "jobs" / f"{step}.py")
            assert task["args"][task["args"].index("--model") + 1] == m
    for task_id in ("evaluate", "publish"):
        args = tasks[task_id]["args"]
        assert args[args.index("--models") + 1] == ",".join(MODELS)
    assert tasks["publish"]["application"] == str(REPO / "scripts" / "airflow" / "publish_check.py")
    assert tasks["maintain"]["application"] == str(REPO / "jobs" / "maintain.py")


def test_maintenance_can_be_left_out(dags):
    tasks = dags["no_maintain"]["tasks"]
    assert "maintain" not in tasks and "publish" in tasks
    dag = dags["maintain_not_a_bool"]
    assert dag["tasks"] == {} and "must be true or false" in " ".join(dag["import_errors"].values())


def test_models_default_to_the_config_file(dags):
    import yaml

    configured = yaml.safe_load((REPO / "conf" / "pipeline.yaml").read_text())["models"]
    tasks = dags["models_from_config"]["tasks"]
    assert sorted(t for t in tasks if t.startswith("train_")) == sorted(f"train_{m}" for m in configured)


def test_deepfm_gets_a_features_task_and_waits_for_its_candidates(dags):
    tasks = dags["deepfm"]["tasks"]
    assert tasks["features"]["upstream"] == ["interactions"]
    assert tasks["features"]["application"] == str(REPO / "jobs" / "features.py")
    assert tasks["train_deepfm"]["upstream"] == ["features", "interactions"]
    assert tasks["recommend_deepfm"]["upstream"] == ["recommend_als", "train_deepfm"]
    assert tasks["train_als"]["upstream"] == ["interactions"]  # only DeepFM reads the features
    # Re-ranking a model the DAG does not run is an import error that names it.
    assert "sasrec" in " ".join(dags["deepfm_of_sasrec"]["import_errors"].values())


def test_als_folds_in_daily_and_refits_every_n_days(dags):
    """The cheap path for a model that folds in new users (ALS): its train task refits only when the
    newest saved model is `refit_every_days` old (decided by the job, so the first day refits) and its
    recommend task folds new users in; other models are unchanged, and 1 restores the daily refit."""
    tasks = dags["default"]["tasks"]
    assert tasks["train_als"]["args"][:4] == ["--model", "als", "--refit-every-days", "7"]
    assert tasks["recommend_als"]["args"][:3] == ["--model", "als", "--fold-in"]
    assert tasks["train_popularity"]["args"][:2] == ["--model", "popularity"]
    plain = [a for t in ("train_popularity", "recommend_popularity") for a in tasks[t]["args"]]
    assert "--fold-in" not in plain and "--refit-every-days" not in plain
    daily = dags["refit_daily"]["tasks"]
    assert "--refit-every-days" not in daily["train_als"]["args"] and "--fold-in" not in daily["recommend_als"]["args"]
    bad = dags["refit_never"]
    assert bad["tasks"] == {} and "refit_every_days" in " ".join(bad["import_errors"].values())


class KillFirstWrite(threading.Thread):
    """Kills the spark-submit of ``recommend --model <model>`` (its JVM and Python driver, SIGKILL) the
    moment the task's first data file appears under the day's partition of gold/recommendations: a task
    that dies half-way through its write, for Airflow to retry."""

    def __init__(self, warehouse: str, model: str):
        super().__init__(daemon=True)
        self.partition = Path(warehouse, "gold", "recommendations", f"run_date={RUN_DATE}", f"model={model}")
        self.model, self.killed, self.done = model, [], threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.is_set() and not any(self.partition.glob("*.parquet")):
            time.sleep(0.01)
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if "jobs/recommend.py" in cmdline and f"--model {self.model}" in cmdline:
                proc.kill()
                self.killed.append(proc.pid)


@pytest.fixture(scope="module")
def daily_run(airflow) -> subprocess.CompletedProcess:
    """One whole `airflow dags test` of RUN_DATE for DAY_MODEL: 6 spark-submits on local[2], with the
    recommend task killed in the middle of its write and retried once. Without the maintain task: it
    is the same `jobs/<step>.py` -> `cli.main` entry point as the others (its arguments are checked in
    test_dag_shape_retries_and_arguments, its work in test_maintenance), and it cost about 50 s."""
    settings = {**airflow.settings, "models": [DAY_MODEL], "retries": 1, "retry_delay_minutes": 0.05,
                "maintain": False}
    killer = KillFirstWrite(settings["warehouse"], DAY_MODEL)
    killer.start()
    started = time.monotonic()
    done = airflow.run("airflow", "dags", "test", "recsys_daily", RUN_DATE, settings=settings, timeout=1500,
                       log="dags_test.log")
    killer.done.set()
    killer.join()
    print(f"airflow dags test recsys_daily {RUN_DATE}: {time.monotonic() - started:.0f} s, rc {done.returncode}")
    done.killed = killer.killed
    return done


def test_dags_test_runs_the_whole_day(daily_run):
    assert daily_run.returncode == 0, _tail(daily_run.stdout, 120)
    out = daily_run.stdout
    finished = [line for line in out.splitlines() if "DagRun Finished" in line]
    assert finished and " state=success," in finished[-1], _tail(out, 120)
    summaries = [json.loads(line[line.index("{"):line.rindex("}") + 1]) for line in out.splitlines()
                 if '"job": "publish"' in line]
    assert summaries and summaries[-1]["status"] == "ok", summaries
    assert summaries[-1]["run_date"] == RUN_DATE


def test_a_recommend_task_killed_half_way_is_retried_and_the_day_lands_whole(daily_run):
    """The kill happened, Airflow retried the task, and the run still succeeded; the rows it left are
    checked whole in test_the_day_is_in_the_gold_tables (k rows for every user of every model)."""
    assert daily_run.killed, "the recommend task was never caught writing"
    assert daily_run.returncode == 0, _tail(daily_run.stdout, 120)
    task = f"recommend_{DAY_MODEL}"
    tries = [line for line in daily_run.stdout.splitlines() if f"starting task_id={task} " in line]
    assert len(tries) == 2 and "new_state=up_for_retry" in daily_run.stdout, _tail(daily_run.stdout, 120)


def test_the_day_is_in_the_gold_tables(daily_run, airflow, spark):
    from pyspark.sql import functions as F

    assert daily_run.returncode == 0, _tail(daily_run.stdout, 120)
    wh = airflow.settings["warehouse"]
    recs = spark.read.format("delta").load(f"{wh}/gold/recommendations").filter(F.col("run_date") == RUN_DATE)
    per_model = {r["model"]: (r["rows"], r["users"], r["max_rank"]) for r in recs.groupBy("model").agg(
        F.count(F.lit(1)).alias("rows"), F.countDistinct("user_id").alias("users"), F.max("rank").alias("max_rank"),
    ).collect()}
    assert sorted(per_model) == [DAY_MODEL]
    for model, (rows, users, max_rank) in per_model.items():
        assert users > 0 and max_rank == K and rows == users * K, (model, rows, users, max_rank)
    metrics = spark.read.format("delta").load(f"{wh}/gold/metrics").filter(F.col("run_date") == RUN_DATE)
    by_model = {r["model"]: r["count"] for r in metrics.groupBy("model").count().collect()}
    assert sorted(by_model) == [DAY_MODEL] and min(by_model.values()) > 0, by_model
    assert {r["k"] for r in metrics.select("k").distinct().collect()} >= {5, 10}


def test_publish_fails_when_a_day_has_no_recommendations(daily_run, airflow):
    assert daily_run.returncode == 0, _tail(daily_run.stdout, 120)
    other_day = "2026-11-19"
    # `airflow tasks test` exits 0 even when the task fails (Airflow 3.3): read the task's final state.
    done = airflow.run("airflow", "tasks", "test", "recsys_daily", "publish", other_day, timeout=600,
                       settings={**airflow.settings, "retries": 0}, log="publish_other_day.log")
    assert "new_state=failed" in done.stdout, _tail(done.stdout)
    for model in MODELS:
        assert f"no rows of {model} for run date {other_day} in gold/recommendations" in done.stdout, _tail(done.stdout)
