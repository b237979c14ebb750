"""MLflow tracking: a no-op without mlflow, parent and child runs read back from a real file store."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from recsys_spark.errors import RecsysError
from recsys_spark.tracking import Tracker, flatten_params, metric_key

HISTORY = [
    {"epoch": 1, "train_loss": 0.69, "lr": 0.001, "seconds": 2.0, "ndcg@10": 0.05, "samples_per_s": 500.0},
    {"epoch": 2, "train_loss": 0.41, "lr": 0.001, "seconds": 1.5, "ndcg@10": 0.08, "samples_per_s": 666.7},
    {"epoch": 3, "train_loss": 0.33, "lr": 0.0005, "seconds": 1.5, "ndcg@10": 0.09, "samples_per_s": 666.7},
]


def _model_dir(root, history):
    root.mkdir(parents=True)
    (root / "model.json").write_text(json.dumps({"model": "ncf", "history": history}))
    (root / "weights.pt").write_bytes(b"\x00" * 16)
    (root / "users").mkdir()
    (root / "users" / "part-0.parquet").write_bytes(b"PAR1")
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "last.pt").write_bytes(b"\x00" * 16)
    return str(root)


def test_keys_and_params_are_mlflow_safe():
    assert metric_key("ndcg@10") == "ndcg_at_10"
    assert metric_key("als.test_hr@20") == "als.test_hr_at_20"
    assert metric_key("a%b") == "a_b"
    flat = flatten_params({"train": {"lr": 0.001, "epochs": 20}, "layers": [64, 32], "long": "x" * 900})
    assert flat["train.lr"] == "0.001" and flat["train.epochs"] == "20" and flat["layers"] == "[64, 32]"
    assert len(flat["long"]) == 500


def test_disabled_tracker_records_nothing(tmp_path):
    tracker = Tracker.for_warehouse(str(tmp_path / "wh"), enabled=False)
    assert not tracker.enabled
    with tracker.pipeline_run("2024-01-31", {"split": "leave_last_out"}):
        with tracker.model_run("ncf", {"lr": 0.1}):
            tracker.log_metrics({"x": 1.0})
            tracker.log_history(HISTORY)
            tracker.log_model_dir(_model_dir(tmp_path / "m", HISTORY))
        tracker.log_evaluation(pd.DataFrame({"model": ["ncf"], "metric": ["hr"], "k": [10], "value": [0.5]}))
        assert tracker.active_run_id is None
    with pytest.raises(ValueError, match="boom"), tracker.pipeline_run("r"):
        raise ValueError("boom")
    assert not (tmp_path / "wh").exists()


def test_without_mlflow_installed_tracking_is_off(tmp_path):
    """Import the module with mlflow hidden, as on a machine without it: a no-op tracker, no error."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["mlflow"] = None          # `import mlflow` now raises ImportError
        from recsys_spark.errors import RecsysError
        from recsys_spark.tracking import Tracker
        wh = {str(tmp_path / "wh")!r}
        tracker = Tracker.for_warehouse(wh)
        assert not tracker.enabled
        with tracker.pipeline_run("r1", {{"a": 1}}):
            with tracker.model_run("als", {{"rank": 8}}):
                tracker.log_metrics({{"x": 1.0}}, step=1)
                tracker.log_history([{{"epoch": 1, "train_loss": 0.5}}])
                tracker.log_artifacts(wh)
        try:
            Tracker.for_warehouse(wh, enabled=True)
        except RecsysError as exc:
            assert "mlflow is not installed" in str(exc)
        else:
            raise AssertionError("enabled=True without mlflow must fail")
        import os
        assert not os.path.exists(wh)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed")


@pytest.fixture
def client_for(monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return lambda tracker: MlflowClient(tracking_uri=tracker.uri)


@needs_mlflow
def test_parent_run_with_two_child_runs_read_back(tmp_path, client_for):
    warehouse = str(tmp_path / "wh")
    tracker = Tracker.for_warehouse(warehouse)
    assert tracker.enabled and tracker.uri == (tmp_path / "wh" / "mlruns").resolve().as_uri()
    ncf_dir = _model_dir(tmp_path / "wh" / "models" / "ncf" / "2024-01-31", HISTORY)

    with tracker.pipeline_run("2024-01-31", {"split": "leave_last_out", "models": "als,ncf"}):
        parent_id = tracker.active_run_id
        with tracker.model_run("als", {"rank": 16, "reg": {"lambda": 0.1}}):
            tracker.log_metrics({"train_seconds": 3.5, "recommendations": 1200, "note": "skipped"})
        with tracker.model_run("ncf", {"train": {"lr": 0.001, "epochs": 3}}):
            tracker.log_model_dir(ncf_dir)
        evaluation = pd.DataFrame({"model": ["als", "als", "ncf", "ncf"], "metric": ["ndcg", "hr", "ndcg", "n_users"],
                                   "k": [10, 10, 10, 0], "value": [0.11, 0.3, 0.09, 727]})
        tracker.log_evaluation(evaluation)

    client = client_for(tracker)
    experiment = client.get_experiment_by_name("recsys-spark")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params == {"split": "leave_last_out", "models": "als,ncf"}
    assert parent.data.tags["recsys.run_id"] == "2024-01-31"
    assert parent.data.metrics["als.test_ndcg_at_10"] == pytest.approx(0.11)
    assert parent.data.metrics["ncf.test_ndcg_at_10"] == pytest.approx(0.09)

    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    by_name = {run.data.tags["mlflow.runName"]: run for run in children}
    assert set(by_name) == {"als", "ncf"}
    als, ncf = by_name["als"], by_name["ncf"]
    assert all(run.info.status == "FINISHED" for run in children)
    assert all(run.data.tags["recsys.run_id"] == "2024-01-31" for run in children)
    assert als.data.params == {"rank": "16", "reg.lambda": "0.1"}
    assert als.data.metrics == {"train_seconds": 3.5, "recommendations": 1200.0,
                                "test_ndcg_at_10": pytest.approx(0.11), "test_hr_at_10": pytest.approx(0.3)}
    assert ncf.data.params == {"train.lr": "0.001", "train.epochs": "3"}

    losses = client.get_metric_history(ncf.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in sorted(losses, key=lambda m: m.step)] == [(1, 0.69), (2, 0.41), (3, 0.33)]
    assert [m.value for m in sorted(client.get_metric_history(ncf.info.run_id, "ndcg_at_10"),
                                    key=lambda m: m.step)] == [0.05, 0.08, 0.09]
    assert {"lr", "seconds", "samples_per_s", "test_ndcg_at_10", "test_n_users"} <= set(ncf.data.metrics)

    artifacts = {a.path for a in client.list_artifacts(ncf.info.run_id, "model")}
    assert artifacts == {"model/model.json", "model/weights.pt", "model/users"}  # checkpoints left out
    assert [a.path for a in client.list_artifacts(ncf.info.run_id, "model/users")] == ["model/users/part-0.parquet"]


@needs_mlflow
def test_failed_model_run_is_marked_and_raises(tmp_path, client_for):
    tracker = Tracker.for_warehouse(str(tmp_path / "wh"))
    with pytest.raises(RecsysError, match="diverged"), tracker.pipeline_run("r2"):
        with tracker.model_run("sasrec"):
            raise RecsysError("diverged")
    runs = client_for(tracker).search_runs([client_for(tracker).get_experiment_by_name("recsys-spark").experiment_id])
    assert sorted(run.info.status for run in runs) == ["FAILED", "FAILED"]


@needs_mlflow
def test_tracking_uri_from_the_environment(tmp_path, client_for, monkeypatch):
    store = (tmp_path / "elsewhere").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "nightly")
    tracker = Tracker.for_warehouse(str(tmp_path / "wh"))
    assert tracker.uri == store and tracker.experiment == "nightly"
    with tracker.model_run("popularity", run_id="2024-02-01"):
        tracker.log_metrics({"x": 1.0}, step=2)
    assert not (tmp_path / "wh").exists()
    client = client_for(tracker)
    (run,) = client.search_runs([client.get_experiment_by_name("nightly").experiment_id])
    assert run.data.tags["recsys.run_id"] == "2024-02-01" and "mlflow.parentRunId" not in run.data.tags
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "x")] == [(2, 1.0)]


@needs_mlflow
def test_an_unusable_store_turns_tracking_off_without_failing(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's folder should be")
    tracker = Tracker(uri=(blocker / "mlruns").as_uri())
    with caplog.at_level(logging.WARNING, logger="recsys_spark.tracking"), tracker.pipeline_run("r3", {"a": 1}):
        with tracker.model_run("als"):
            tracker.log_metrics({"x": 1.0})
    assert not tracker.enabled
    assert "tracking is off for the rest of this run" in caplog.text


@needs_mlflow
def test_remote_warehouse_without_uri_is_off(monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with caplog.at_level(logging.WARNING, logger="recsys_spark.tracking"):
        tracker = Tracker.for_warehouse("s3a://bucket/warehouse")
    assert not tracker.enabled and "MLFLOW_TRACKING_URI" in caplog.text
