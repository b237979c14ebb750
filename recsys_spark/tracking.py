"""Experiment tracking with MLflow, optional at run time.

A :class:`Tracker` records one pipeline run as an MLflow parent run and each model trained in it as a
nested child run: the model's hyper-parameters, its per-epoch training history (losses, learning rate,
throughput and validation metrics, ``step`` = epoch), its offline metrics and its saved model directory.

Tracking is on by default when ``mlflow`` can be imported and a no-op otherwise, so nothing in the
pipeline depends on it. The store is ``MLFLOW_TRACKING_URI`` when set, else a file store at
``<warehouse>/mlruns`` (browse it with ``mlflow ui --backend-store-uri <warehouse>/mlruns``).
Tracking is best effort: a store that fails mid-run logs one warning and turns the tracker off; it
never fails the pipeline.

The tracker talks to MLflow through an explicit ``MlflowClient``, never the global fluent API, so it
leaves the process's MLflow state (tracking URI, active run) alone.

Examples
--------
>>> tracker = Tracker.for_warehouse("warehouse", enabled=False)   # or enabled=None: on when mlflow imports
>>> with tracker.pipeline_run("2024-01-31", {"split": "leave_last_out"}):
...     with tracker.model_run("als", {"rank": 64}):
...         tracker.log_metrics({"train_seconds": 12.5})
>>> tracker.enabled
False
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from recsys_spark.errors import RecsysError
from recsys_spark.models.base import training_record

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "recsys-spark"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"

# Tags set on every run; ``recsys.run_id`` is the pipeline's run id (the one stamped on gold rows).
TAG_RUN_ID = "recsys.run_id"
TAG_MODEL = "recsys.model"
TAG_KIND = "recsys.kind"
_RUN_NAME = "mlflow.runName"
_PARENT = "mlflow.parentRunId"

# Subfolders of a model directory that are working state, not the model: not logged as artifacts.
WORKING_DIRS = ("checkpoints", "petastorm")

_MAX_PARAM_CHARS = 500      # the smallest value limit among MLflow server versions still in use
_MAX_BATCH = 1000           # MLflow's limit of metrics per log_batch call
_INVALID_KEY_CHARS = re.compile(r"[^\w./\- ]")


def _import_mlflow():
    """The ``mlflow`` module, or None when it is not installed (or hidden)."""
    try:
        import mlflow
    except ImportError:
        return None
    return mlflow


def metric_key(name: str) -> str:
    """An MLflow-safe metric or param key: ``ndcg@10`` -> ``ndcg_at_10``, other odd characters -> ``_``."""
    return _INVALID_KEY_CHARS.sub("_", str(name).replace("@", "_at_"))


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts (e.g. a pydantic ``model_dump()``) as dotted keys with string values.

    >>> flatten_params({"train": {"lr": 0.001, "epochs": 20}, "backend": "local"})
    {'train.lr': '0.001', 'train.epochs': '20', 'backend': 'local'}
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            text = str(value)
            if len(text) > _MAX_PARAM_CHARS:
                text = text[: _MAX_PARAM_CHARS - 3] + "..."
            flat[metric_key(name)] = text
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Tracker:
    """Logs pipeline and model runs to MLflow; every method is a no-op when ``enabled`` is False.

    Parameters
    ----------
    uri : MLflow tracking URI (``file:///...``, ``http://...``, ``databricks``, ...).
    experiment : experiment name, created on first use.
    enabled : False makes a tracker that records nothing (and never imports mlflow).

    Use :meth:`for_warehouse` to build one from the pipeline's settings.
    """

    def __init__(self, uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT, enabled: bool = True) -> None:
        self.uri = uri
        self.experiment = experiment
        self.enabled = enabled
        self._client = None
        self._experiment_id: str | None = None
        self._stack: list[str] = []                 # MLflow run ids of the open runs, innermost last
        self._pipeline: tuple[str, str] | None = None   # (MLflow run id, pipeline run id) of the open parent
        self._children: dict[str, str] = {}         # model name -> its MLflow run id, in the open pipeline run

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def disabled(cls) -> Tracker:
        return cls(enabled=False)

    @classmethod
    def for_warehouse(cls, warehouse: str, enabled: bool | None = None, uri: str | None = None,
                      experiment: str | None = None) -> Tracker:
        """The tracker for a pipeline writing to ``warehouse``.

        Parameters
        ----------
        warehouse : the warehouse root; the default store is a file store at ``<warehouse>/mlruns``.
        enabled : None (default): on when ``mlflow`` imports, off otherwise. True: on, and an error when
            mlflow is missing. False: off.
        uri : tracking URI; default ``$MLFLOW_TRACKING_URI``, else the warehouse's file store. A
            warehouse on object storage (``s3a://...``) has no default file store: without a URI,
            tracking is off there (with a warning).
        experiment : experiment name; default ``$MLFLOW_EXPERIMENT_NAME``, else ``recsys-spark``.
        """
        if enabled is False:
            return cls.disabled()
        if _import_mlflow() is None:
            if enabled:
                raise RecsysError("tracking is enabled but mlflow is not installed: "
                                  "pip install mlflow-skinny, or set tracking.enabled=false")
            log.info("mlflow is not installed: experiment tracking is off")
            return cls.disabled()
        uri = uri or os.environ.get(TRACKING_URI_ENV) or cls._warehouse_store(warehouse)
        if uri is None:
            log.warning("no MLflow store for a warehouse at %s: set %s to track runs; tracking is off",
                        warehouse, TRACKING_URI_ENV)
            return cls.disabled()
        return cls(uri, experiment or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT)

    @staticmethod
    def _warehouse_store(warehouse: str) -> str | None:
        if warehouse.startswith("file:"):
            return f"{warehouse.rstrip('/')}/mlruns"
        if "://" in warehouse:
            return None
        return (Path(warehouse).resolve() / "mlruns").as_uri()

    # -- runs ---------------------------------------------------------------------------------------
    @property
    def active_run_id(self) -> str | None:
        """The MLflow id of the innermost open run (None when disabled or outside any run)."""
        return self._stack[-1] if self._stack else None

    @contextmanager
    def pipeline_run(self, run_id: str, params: Mapping[str, Any] | None = None,
                     tags: Mapping[str, str] | None = None) -> Iterator[Tracker]:
        """The parent run of one pipeline run; ``run_id`` is the pipeline's (gold tables') run id.

        A run that raises is marked FAILED and the exception propagates.
        """
        self._children = {}
        with self._run(run_id, params, {TAG_RUN_ID: run_id, TAG_KIND: "pipeline", **(tags or {})}) as mlflow_id:
            self._pipeline = (mlflow_id, run_id) if mlflow_id else None
            try:
                yield self
            finally:
                self._pipeline = None

    @contextmanager
    def model_run(self, model_name: str, params: Mapping[str, Any] | None = None,
                  tags: Mapping[str, str] | None = None, run_id: str | None = None) -> Iterator[Tracker]:
        """A child run of the open pipeline run (a top-level run outside one) for one model.

        ``run_id`` tags a stand-alone model run with the pipeline run id it belongs to (e.g. a
        ``recsys-spark train`` task of the Airflow DAG); inside a pipeline run it is inherited.
        """
        all_tags = {TAG_MODEL: model_name, TAG_KIND: "model", **(tags or {})}
        run_id = run_id or (self._pipeline[1] if self._pipeline else None)
        if run_id:
            all_tags[TAG_RUN_ID] = run_id
        with self._run(model_name, params, all_tags) as mlflow_id:
            if mlflow_id is not None and self._pipeline is not None:
                self._children[model_name] = mlflow_id
            yield self

    @contextmanager
    def _run(self, name: str, params: Mapping[str, Any] | None, tags: Mapping[str, str]) -> Iterator[str | None]:
        run_id = self._start(name, tags)
        if run_id is None:
            yield None
            return
        self._stack.append(run_id)
        status = "FAILED"
        try:
            if params:
                self.log_params(params)
            yield run_id
            status = "FINISHED"
        finally:
            self._stack.pop()
            self._safely("end run", lambda: self._client.set_terminated(run_id, status=status))

    def _start(self, name: str, tags: Mapping[str, str]) -> str | None:
        if not self.enabled:
            return None

        def start() -> str:
            client = self._get_client()
            all_tags = {_RUN_NAME: name, **{k: str(v) for k, v in tags.items()}}
            if self._stack:
                all_tags[_PARENT] = self._stack[-1]
            return client.create_run(self._get_experiment_id(), tags=all_tags, run_name=name).info.run_id

        return self._safely(f"start run {name}", start)

    # -- logging --------------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Parameters of the open run; nested dicts become dotted keys (``train.lr``)."""
        if not self._can_log():
            return
        from mlflow.entities import Param

        flat = flatten_params(params)
        run_id = self.active_run_id
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow's limit of params per batch
            chunk = items[i:i + 100]
            self._safely("log params", lambda chunk=chunk: self._client.log_batch(run_id, params=chunk))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self._can_log():
            return
        run_id = self.active_run_id
        for key, value in tags.items():
            self._safely("set tag", lambda k=key, v=value: self._client.set_tag(run_id, k, str(v)))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, run_id: str | None = None) -> None:
        """Numeric values of ``metrics`` on the open run (or ``run_id``); other values are skipped.

        Keys are made MLflow-safe with :func:`metric_key` (``ndcg@10`` -> ``ndcg_at_10``).
        """
        self._log_rows([(metrics, step)], run_id)

    def log_history(self, history: list[Mapping[str, Any]], run_id: str | None = None) -> None:
        """Per-epoch rows (a deep model's ``history``) as metric series with ``step`` = the row's epoch.

        Every numeric field but ``epoch`` becomes a series: ``train_loss`` (or ``loss``), ``lr``,
        ``seconds``, ``samples_per_s`` and the validation metrics (``ndcg@10`` -> ``ndcg_at_10``).
        """
        rows = [({k: v for k, v in row.items() if k != "epoch"}, int(row.get("epoch", i + 1)))
                for i, row in enumerate(history)]
        self._log_rows(rows, run_id)

    def log_evaluation(self, metrics, prefix: str = "test_") -> None:
        """Offline metrics rows ``(model, metric, k, value)``, e.g. the pandas frame of ``run_evaluate``.

        Each model's values go to its child run of the open pipeline run as ``test_<metric>_at_<k>``
        (also after that child run has ended), and to the pipeline run as ``<model>.test_<metric>_at_<k>``
        so that the models of a run compare side by side in the MLflow UI. Outside a pipeline run, the
        open run receives ``test_<metric>_at_<k>``.
        """
        if not self._can_log():
            return
        by_model: dict[str, dict[str, Any]] = {}
        for model, metric, k, value in zip(metrics["model"], metrics["metric"], metrics["k"], metrics["value"],
                                           strict=True):
            key = f"{prefix}{metric}@{int(k)}" if int(k) > 0 else f"{prefix}{metric}"  # n_users has k = 0
            by_model.setdefault(str(model), {})[key] = value
        for model, values in by_model.items():
            if self._pipeline is None:
                self.log_metrics(values)
                continue
            if model in self._children:
                self.log_metrics(values, run_id=self._children[model])
            self.log_metrics({f"{model}.{key}": v for key, v in values.items()}, run_id=self._pipeline[0])

    def log_model_dir(self, path: str, artifact_path: str = "model") -> None:
        """A saved model: its training history and summary (``models.base.training_record``: torch models
        keep one, others have none) and its files."""
        if not self._can_log():
            return
        history, summary = training_record(path)
        self.log_history(history)
        self.log_metrics({key: value for key, value in summary.items() if _is_number(value)})
        self.log_artifacts(path, artifact_path)

    def log_artifacts(self, local_dir: str, artifact_path: str = "model",
                      exclude: tuple[str, ...] = WORKING_DIRS) -> None:
        """Copy a directory (a saved model) into the open run's artifacts, minus ``exclude`` subfolders.

        Only local directories are copied (a model on object storage is logged as a ``model_uri`` tag).
        """
        if not self._can_log():
            return
        run_id = self.active_run_id
        if "://" in local_dir and not local_dir.startswith("file:"):
            self.set_tags({"model_uri": local_dir})
            return
        root = Path(local_dir.removeprefix("file://"))
        if not root.is_dir():
            log.warning("no model directory at %s: nothing logged", root)
            return
        for entry in sorted(root.iterdir()):
            if entry.name in exclude or entry.name.startswith("."):
                continue
            if entry.is_dir():
                self._safely("log artifacts", lambda e=entry: self._client.log_artifacts(
                    run_id, str(e), f"{artifact_path}/{e.name}"))
            else:
                self._safely("log artifact", lambda e=entry: self._client.log_artifact(run_id, str(e), artifact_path))

    # -- internals ------------------------------------------------------------------------------------
    def _can_log(self) -> bool:
        return self.enabled and bool(self._stack)

    def _log_rows(self, rows: list[tuple[Mapping[str, Any], int | None]], run_id: str | None) -> None:
        run_id = run_id or self.active_run_id
        if not self.enabled or run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entities = [
            Metric(metric_key(key), float(value), now, step or 0)
            for values, step in rows for key, value in values.items() if _is_number(value)
        ]
        for i in range(0, len(entities), _MAX_BATCH):
            chunk = entities[i:i + _MAX_BATCH]
            self._safely("log metrics", lambda chunk=chunk: self._client.log_batch(run_id, metrics=chunk))

    def _get_client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _get_experiment_id(self) -> str:
        if self._experiment_id is None:
            client = self._get_client()
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    self._experiment_id = client.create_experiment(self.experiment)
                except Exception:  # noqa: BLE001 - a concurrent task created it first: use theirs
                    found = client.get_experiment_by_name(self.experiment)
                    if found is None:
                        raise
            if self._experiment_id is None:
                self._experiment_id = found.experiment_id
        return self._experiment_id

    def _safely(self, what: str, action):
        """Run one MLflow call; on failure warn once and switch tracking off for the rest of the run."""
        if not self.enabled:
            return None
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - tracking must never fail the pipeline
            log.warning("MLflow tracking failed (%s at %s): %s; tracking is off for the rest of this run",
                        what, self.uri, exc)
            self.enabled = False
            return None
