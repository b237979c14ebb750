"""recsys_daily: the daily batch run of recsys-spark on Airflow, one ``spark-submit`` per step.

::

    ingest -> interactions -> train_<model> (one per model, in parallel) -> recommend_<model>
           -> evaluate -> publish -> maintain

What a model needs first comes from the library's model registry (``recsys_spark/models/registry.py``,
read here without Spark or torch): when some models read the feature tables, a ``features`` task
(``jobs/features.py``) runs between interactions and their train tasks; a model that re-ranks another
model's recommendations (its ``candidates`` hyper-parameter, from ``conf/models/<model>.yaml`` or a
``--set model_params.<model>.candidates=<other>`` in ``overrides``) waits for recommend_<other>.

Each task is a ``SparkSubmitOperator`` running ``<repo>/jobs/<command>.py`` (publish:
``<repo>/scripts/airflow/publish_check.py``) with ``--run-date {{ ds }}``, so a re-run or a backfill
of a day replaces that day's rows of each model in the gold tables and nothing else. Runs go one at a
time (``max_active_runs=1``): each run rebuilds the silver tables whole. publish fails the run when a
model has no recommendations or metrics for the day. maintain (``jobs/maintain.py``) then compacts the
warehouse's Delta tables and vacuums the files they replaced more than ``maintenance.vacuum_retention_hours``
ago (from the config); it runs last so that it never slows the day's writes, and only after a good day.

Settings: one JSON Variable, ``recsys_daily``; every key is optional and an unknown key is an import
error. Defaults come from the repository's conf files.

``repo``
    checkout on the Airflow host (default: ``$RECSYS_SPARK_REPO``, else the one holding this file)
``config``
    pipeline YAML given to every job as ``--config``, a path the Spark driver can read
    (default ``<repo>/conf/pipeline.yaml``)
``models``
    list of model names (default: the config's ``models``, when the config is readable here)
``warehouse``
    warehouse root, a path or a URI (default: the config's ``warehouse``, relative to ``repo``)
``input``, ``preset``, ``format``, ``sep``
    ingest's raw events (may hold Jinja: ``s3a://bucket/raw/{{ ds }}/``; default
    ``<repo>/data/events.parquet``), its preset (default ``canonical``) and format overrides
``overrides``
    list of ``KEY=VALUE`` given to every job as ``--set``
``spark_conn_id``
    the Airflow connection of the Spark master (default ``spark_default``)
``py_files``
    the library for the executors: ``python -m pip wheel --no-deps -w dist .`` then copy the wheel
    to a ``.zip`` name (Spark puts only .zip/.egg/.jar from ``--py-files`` on the executors' path)
``archives``
    ``--archives``, e.g. a venv-pack of the project venv as ``env.tar.gz#env`` with ``python``
    ``./env/bin/python``: what the executors import besides the library
``jars``, ``packages``
    Delta: the jars cached by scripts/setup.sh when present here, else the Maven packages
``python``
    ``spark.pyspark.python``: the executors' Python, and the driver's unless ``spark_conf`` sets
    ``spark.pyspark.driver.python``; on one machine ``<repo>/.venv/bin/python`` (default: unset,
    Spark's own choice: ``$PYSPARK_PYTHON``, else ``python3``)
``spark_conf``, ``properties_file``, ``env_vars``
    more Spark settings (over the Delta ones), ``--properties-file``, the environment of spark-submit
``pool``
    an Airflow pool for the train and recommend tasks (default none), e.g. to bound how many Spark
    applications run at once; parallel model tasks write disjoint (run_date, model) partitions of the
    gold tables, so they do not need one to stay correct
``retries``, ``retry_delay_minutes``, ``max_retry_delay_minutes``, ``timeout_hours``
    retries with exponential back-off (defaults 3, 5, 60) and a per-task time limit (default none)
``schedule``, ``start_date``
    a cron expression or preset (default ``@daily``), the first day (default ``2026-01-01``)
``maintain``
    ``false`` leaves out the maintain task, e.g. where another schedule maintains the warehouse
    (default ``true``)
``refit_every_days``
    the cheap path for models that fold in new users (``fold_in`` in the model registry): their train task
    refits only when the newest saved model is this many days old or more (``train --refit-every-days``:
    the first day, and after a gap, it refits), and their recommend task folds the users that model never
    saw into it (``recommend --fold-in``). Default ``7``: fold-in daily, a full refit weekly; ``1`` refits
    every day with a plain recommend, as every other model does
"""

from __future__ import annotations

import glob
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

try:  # Airflow 3: retry_exponential_backoff is a multiplier, and True means 1.0, no back-off at all
    from airflow.sdk import DAG, CronDataIntervalTimetable, Variable

    BACKOFF: bool | float = 2.0
except ImportError:  # Airflow 2.10+: a bool (it rejects a float), and True doubles the delay
    from airflow import DAG
    from airflow.models import Variable
    from airflow.timetables.interval import CronDataIntervalTimetable

    BACKOFF = True

DAG_ID = "recsys_daily"
VARIABLE = "recsys_daily"
# Keep in step with recsys_spark/session.py (tests/test_airflow.py checks that they agree).
DELTA_VERSION = "3.3.2"
DELTA_PACKAGES = f"io.delta:delta-spark_2.12:{DELTA_VERSION},io.delta:delta-storage:{DELTA_VERSION}"
# Under spark-submit the library only fills unset settings into a JVM that is already up: Delta's
# extensions and jars must come from the submit itself.
DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.legacy.timeParserPolicy": "CORRECTED",
}
KEYS = frozenset({
    "repo", "config", "models", "warehouse", "input", "preset", "format", "sep", "overrides",
    "spark_conn_id", "py_files", "archives", "jars", "packages", "python", "spark_conf", "properties_file", "env_vars",
    "pool", "retries", "retry_delay_minutes", "max_retry_delay_minutes", "timeout_hours", "schedule", "start_date",
    "maintain", "refit_every_days",
})
RUN_DATE = "{{ ds }}"


def _cached_delta_jars() -> str:
    """The Delta jars scripts/setup.sh resolved into the cache, comma-separated, or ''."""
    cache = os.environ.get("RECSYS_SPARK_CACHE", "~/.cache/recsys-spark")
    folder = os.environ.get("RECSYS_SPARK_JARS") or os.path.join(cache, "jars", f"delta-{DELTA_VERSION}")
    return ",".join(sorted(glob.glob(os.path.join(os.path.expanduser(folder), "delta-*.jar"))))


def _names(value: Any) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value or [])
    return [str(x).strip() for x in items if str(x).strip()]


def load_settings(given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DAG's settings: ``given`` (the Variable when None) over the defaults from the conf files."""
    if given is None:
        given = Variable.get(VARIABLE, None, deserialize_json=True) or {}
    unknown = sorted(set(given) - KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in Variable {VARIABLE}; known: {sorted(KEYS)}")
    repo = Path(given.get("repo") or os.environ.get("RECSYS_SPARK_REPO") or Path(__file__).resolve().parents[2])
    config = str(given.get("config") or repo / "conf" / "pipeline.yaml")
    conf_file: dict[str, Any] = {}
    if os.path.isfile(config):
        with open(config) as fh:
            conf_file = yaml.safe_load(fh) or {}
    models = _names(given.get("models") or conf_file.get("models"))
    if not models:
        raise ValueError(f"no models: set `models` in Variable {VARIABLE} or in {config}")
    warehouse = str(given.get("warehouse") or conf_file.get("warehouse") or "warehouse")
    if "://" not in warehouse and not os.path.isabs(warehouse):
        warehouse = str(repo / warehouse)
    python = given.get("python")
    spark_conf = dict(DELTA_CONF)
    if python:
        spark_conf["spark.pyspark.python"] = python
    spark_conf.update({k: str(v) for k, v in (given.get("spark_conf") or {}).items()})
    maintain = given.get("maintain", True)
    if not isinstance(maintain, bool):
        raise ValueError(f"`maintain` in Variable {VARIABLE} must be true or false, got {maintain!r}")
    refit_every_days = given.get("refit_every_days", 7)
    if not isinstance(refit_every_days, int) or isinstance(refit_every_days, bool) or refit_every_days < 1:
        raise ValueError(f"`refit_every_days` in Variable {VARIABLE} must be a whole number >= 1, "
                         f"got {refit_every_days!r}")
    jars = given.get("jars", _cached_delta_jars())
    jars = ",".join(_names(jars))
    return {
        "repo": str(repo),
        "config": config,
        "models": models,
        "warehouse": warehouse,
        "input": str(given.get("input") or repo / "data" / "events.parquet"),
        "preset": given.get("preset") or "canonical",
        "format": given.get("format"),
        "sep": given.get("sep"),
        "overrides": [str(x) for x in given.get("overrides") or []],
        "spark_conn_id": given.get("spark_conn_id") or "spark_default",
        "py_files": given.get("py_files") or None,
        "archives": given.get("archives") or None,
        "jars": jars or None,
        "packages": given.get("packages") or (None if jars else DELTA_PACKAGES),
        "spark_conf": spark_conf,
        "properties_file": given.get("properties_file") or None,
        "env_vars": {k: str(v) for k, v in (given.get("env_vars") or {}).items()} or None,
        "pool": given.get("pool") or None,
        "retries": int(given.get("retries", 3)),
        "retry_delay": timedelta(minutes=float(given.get("retry_delay_minutes", 5))),
        "max_retry_delay": timedelta(minutes=float(given.get("max_retry_delay_minutes", 60))),
        "timeout": timedelta(hours=float(given["timeout_hours"])) if given.get("timeout_hours") else None,
        "schedule": given.get("schedule") or "@daily",
        "start_date": datetime.fromisoformat(str(given.get("start_date") or "2026-01-01")).replace(tzinfo=UTC),
        "maintain": maintain,
        "refit_every_days": refit_every_days,
    }


def model_plan(s: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """(the models that need the features task, {model: the model whose recommendations it re-ranks}),
    from the library's registry and the models' hyper-parameters (the config's conf/models/*.yaml with
    the ``overrides``). A re-ranked model must be among the DAG's models."""
    registry = _registry(s)
    from recsys_spark.config import load_config

    params = load_config(s["config"] if os.path.isfile(s["config"]) else None, s["overrides"]).model_params
    upstream = {m: registry.upstream(m, params.get(m, {})) for m in s["models"]}
    for model, other in upstream.items():
        if other is not None and other not in s["models"]:
            raise ValueError(f"{model} re-ranks {other!r}, which is not among the models {s['models']}")
    return registry.need_features(s["models"]), {m: other for m, other in upstream.items() if other}


def _registry(s: dict[str, Any]):
    """The library's model registry, from the repo (it imports neither Spark nor torch)."""
    if s["repo"] not in sys.path:
        sys.path.insert(0, s["repo"])
    from recsys_spark.models import registry

    return registry


def model_steps(s: dict[str, Any], model: str) -> tuple[list[str], list[str]]:
    """The model-specific arguments of ``model``'s (train, recommend) tasks: ``--model`` alone, and for a
    model that folds in new users, when ``refit_every_days`` > 1, the cheap path: train refits only when
    its newest saved model is that old (``--refit-every-days``), recommend folds new users into the newest
    model (``--fold-in``). Both decide at run time, from the saved models, so the first day, a gap or a
    backfill refits; the DAG's shape is the same every day."""
    train, recommend = ["--model", model], ["--model", model]
    if s["refit_every_days"] > 1 and _registry(s).entry(model).fold_in:
        train += ["--refit-every-days", str(s["refit_every_days"])]
        recommend += ["--fold-in"]
    return train, recommend


def _job_args(s: dict[str, Any]) -> list[str]:
    """The options every job takes: config, warehouse, the run date and the overrides."""
    args = ["--config", s["config"], "--warehouse", s["warehouse"], "--run-date", RUN_DATE]
    for override in s["overrides"]:
        args += ["--set", override]
    return args


def _submit(task_id: str, application: str, args: list[str], s: dict[str, Any], **kwargs: Any) -> SparkSubmitOperator:
    return SparkSubmitOperator(
        task_id=task_id,
        application=application,
        application_args=args,
        conn_id=s["spark_conn_id"],
        name=f"{DAG_ID}.{task_id}.{RUN_DATE}",
        conf=s["spark_conf"],
        jars=s["jars"],
        packages=s["packages"],
        py_files=s["py_files"],
        archives=s["archives"],
        properties_file=s["properties_file"],
        env_vars=s["env_vars"],
        **kwargs,
    )


def build_dag(s: dict[str, Any]) -> DAG:
    """ingest -> interactions [-> features] -> train_<m> -> recommend_<m> -> evaluate -> publish [-> maintain]."""
    job = f"{s['repo']}/jobs/{{}}.py"
    common = _job_args(s)
    with DAG(
        dag_id=DAG_ID,
        description="recsys-spark daily: ingest, interactions, train and recommend per model, evaluate",
        # Interval semantics: the run for day D starts once D is over, with --run-date D.
        schedule=CronDataIntervalTimetable(s["schedule"], timezone="UTC"),
        start_date=s["start_date"],
        catchup=False,
        max_active_runs=1,
        default_args={
            "owner": "recsys",
            "retries": s["retries"],
            "retry_delay": s["retry_delay"],
            "retry_exponential_backoff": BACKOFF,  # the delay doubles at each try
            "max_retry_delay": s["max_retry_delay"],
            "execution_timeout": s["timeout"],
        },
        tags=["recsys", "spark"],
        doc_md=__doc__,
    ) as dag:
        ingest_args = ["--input", s["input"], "--preset", s["preset"]]
        ingest_args += ["--format", s["format"]] if s["format"] else []
        ingest_args += ["--sep", s["sep"]] if s["sep"] else []
        ingest = _submit("ingest", job.format("ingest"), [*ingest_args, *common], s)
        interactions = _submit("interactions", job.format("interactions"), common, s)
        evaluate = _submit("evaluate", job.format("evaluate"), ["--models", ",".join(s["models"]), *common], s)
        publish = _submit(
            "publish", f"{s['repo']}/scripts/airflow/publish_check.py",
            ["--warehouse", s["warehouse"], "--run-date", RUN_DATE, "--models", ",".join(s["models"])], s,
        )
        ingest >> interactions
        need_features, reranks = model_plan(s)
        features = _submit("features", job.format("features"), common, s) if need_features else None
        if features:
            interactions >> features  # silver/*_features, built from the split's training period
        per_model = {"pool": s["pool"]} if s["pool"] else {}
        recommends = {}
        for model in s["models"]:
            train_args, recommend_args = model_steps(s, model)
            train = _submit(f"train_{model}", job.format("train"), [*train_args, *common], s, **per_model)
            recommends[model] = _submit(
                f"recommend_{model}", job.format("recommend"), [*recommend_args, *common], s, **per_model)
            interactions >> train >> recommends[model] >> evaluate
            if model in need_features:
                features >> train
        for model, other in reranks.items():
            recommends[other] >> recommends[model]
        evaluate >> publish
        if s["maintain"]:
            publish >> _submit("maintain", job.format("maintain"), common, s)
    return dag


dag = build_dag(load_settings())
