"""GRU4Rec and DeepFM as pipeline models: fit -> recommend -> save -> load on a small synthetic warehouse,
DeepFM's cold users and two-stage candidates, and the pipeline with the session protocol."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import WORLD_SETTINGS
from delta.tables import DeltaTable
from pyspark.sql import functions as F

from recsys_spark import pipeline
from recsys_spark import tables as tb
from recsys_spark.cli import main
from recsys_spark.config import load_config
from recsys_spark.errors import RecsysError
from recsys_spark.models import registry
from recsys_spark.models.deepfm import DeepFMNetParams, DeepFMParams, DeepFMRecommender
from recsys_spark.models.gru4rec import GRU4RecNetParams, GRU4RecParams, GRU4RecRecommender
from recsys_spark.scoring import with_popularity_prior
from recsys_spark.train.distributed import run_one_rank
from recsys_spark.train.trainer import TrainConfig

pytestmark = [pytest.mark.spark, pytest.mark.torch]

SMALL = WORLD_SETTINGS
K = 5


def _train_config(metric: str) -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=32, lr=0.01, optimizer="adam", schedule="constant",
                       early_stopping_metric=metric, patience=3, progress=False, seed=0)


def gru4rec_params(**overrides) -> GRU4RecParams:
    net = GRU4RecNetParams(hidden=16, parallel=8, n_sample=16, max_length=20, dropout_hidden=0.0, seed=0)
    return GRU4RecParams(backend="local", num_proc=1, validation_users=5, net=net, train=_train_config("recall@20"),
                         **overrides)


def deepfm_params(**overrides) -> DeepFMParams:
    net = DeepFMNetParams(dim=4, hidden=[16], dropout=0.0, id_dropout=0.2, seed=0)
    return DeepFMParams(backend="local", num_proc=1, validation_users=5, net=net, train=_train_config("ndcg@10"),
                        **overrides)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _recs(model, users, seen, k=K) -> pd.DataFrame:
    out = model.recommend(users, k, seen=seen).toPandas()
    return out.sort_values([tb.USER_IDX, tb.RANK]).reset_index(drop=True)


def _check_contract(recs: pd.DataFrame, seen_pairs: set, users: set, k: int) -> None:
    """k rows per user of ``users``, ranks 1..k, scores descending, no seen item."""
    assert set(recs[tb.USER_IDX]) == users
    for _, rows in recs.groupby(tb.USER_IDX):
        assert rows[tb.RANK].tolist() == list(range(1, k + 1))
        assert rows[tb.ITEM_IDX].is_unique and (np.diff(rows[tb.SCORE].to_numpy()) <= 0).all()
    assert not any(pair in seen_pairs for pair in zip(recs[tb.USER_IDX], recs[tb.ITEM_IDX], strict=True))


def _pairs(frame) -> set:
    return {(r[0], r[1]) for r in frame.select(tb.USER_IDX, tb.ITEM_IDX).collect()}


# ------------------------------------------------------------------------------------------------ GRU4Rec


def test_gru4rec_fit_recommend_save_load(spark, world, tmp_path):
    model = GRU4RecRecommender(gru4rec_params())
    model.workdir, model.users_per_block = str(tmp_path / "work"), 16
    model.fit(world.train)
    assert len(model.history) == 2 and "recall@20" in model.history[-1]
    users = world.train.select(tb.USER_IDX).distinct()
    user_set = {r[0] for r in users.collect()}
    recs = _recs(model, users, world.train)
    _check_contract(recs, _pairs(world.train), user_set, K)

    # The factors [h, 1] . [W, b] are the network's own scores over the user's time-ordered history.
    user = int(recs[tb.USER_IDX].iloc[0])
    rows = world.train.filter(F.col(tb.USER_IDX) == user).orderBy(tb.FIRST_TS, tb.ITEM_IDX).collect()
    items = [r[tb.ITEM_IDX] for r in rows]
    history = items[-model.params.net.max_length:]
    with torch.no_grad():
        scores = model.module.scores(model.module.user_embedding(torch.tensor([history])))[0].numpy()
    scores[items] = -np.inf
    top = recs[recs[tb.USER_IDX] == user]
    assert np.allclose(np.sort(scores)[::-1][:K], top[tb.SCORE].to_numpy(), atol=1e-4)

    model.save(str(tmp_path / "model"))
    loaded = registry.load("gru4rec", spark, str(tmp_path / "model"))
    assert loaded.params == model.params
    pd.testing.assert_frame_equal(_recs(loaded, users, world.train), recs)


# ------------------------------------------------------------------------------------------------- DeepFM


@pytest.fixture(scope="module")
def deepfm(world, tmp_path_factory):
    """DeepFM fitted without the train rows of one user: that user has features but no history."""
    cold = world.train.groupBy(tb.USER_IDX).count().orderBy(F.desc("count"), tb.USER_IDX).first()[0]
    model = DeepFMRecommender(deepfm_params())
    model.warehouse, model.run_date = world.warehouse, world.run.run_date
    model.workdir, model.users_per_block = str(tmp_path_factory.mktemp("deepfm")), 16
    model.fit(world.train.filter(F.col(tb.USER_IDX) != cold))
    return model, cold


def test_deepfm_fit_recommend_cold_user_save_load(spark, world, deepfm, tmp_path):
    model, cold = deepfm
    assert len(model.history) == 2 and "ndcg@10" in model.history[-1]
    users = world.train.select(tb.USER_IDX).distinct()
    user_set = {r[0] for r in users.collect()}
    assert cold in {r[0] for r in model.known_users().collect()}  # no popularity fallback for it
    recs = _recs(model, users, world.train)
    _check_contract(recs, _pairs(world.train), user_set, K)  # the cold user included

    # The cold user is scored as id-dropout rows were trained: its id and activity fields read as
    # unknown (here every user field: the synthetic world has no side file); warm users keep theirs.
    queries = {r[tb.USER_IDX]: list(r[tb.FIELDS]) for r in model._queries(users, model._users).collect()}
    warm = next(u for u in sorted(user_set) if u != cold)
    history = [model.spec.user_fields.index(f) for f in model.spec.history_fields]
    assert len(history) == len(model.spec.user_fields) > 1
    assert [queries[cold][i] for i in history] == [0] * len(history) and queries[warm][0] == warm + 1
    assert any(queries[warm][i] != 0 for i in history[1:])

    model.save(str(tmp_path / "model"))
    loaded = registry.load("deepfm", spark, str(tmp_path / "model"))
    assert loaded.params == model.params and loaded.spec == model.spec
    pd.testing.assert_frame_equal(_recs(loaded, users, world.train), recs)


def test_the_popularity_prior_moves_only_cold_rows_by_the_weight_given():
    scores = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]], dtype=np.float32)  # [U, n]
    counts = np.array([1.0, 10.0, 100.0])  # the model's order is the reverse of popularity's
    cold = np.array([False, True])
    assert with_popularity_prior(scores, cold, counts, None) is scores
    small, large = (with_popularity_prior(scores, cold, counts, w) for w in (0.1, 100.0))
    assert (small[0] == scores[0]).all() and (large[0] == scores[0]).all()  # a warm row as given
    assert np.argsort(-small[1]).tolist() == [2, 1, 0] and np.argsort(-large[1]).tolist() == [0, 1, 2]
    z = (scores[1] - scores[1].mean()) / scores[1].std()
    assert np.allclose(small[1], np.log1p(counts) + 0.1 * z, atol=1e-6)
    wider = with_popularity_prior(np.hstack([scores, scores[:, :1]]), cold, counts, 0.1)  # an item added since
    assert np.isclose(wider[1, 3], 0.1 * (3 - 2.25) / np.std([3, 2, 1, 3]), atol=1e-6)  # prior log(1 + 0) = 0


@pytest.mark.parametrize("weight", [0.5, None])
def test_lightfm_ranks_a_cold_user_by_the_prior_plus_its_standardised_scores(spark, world, tmp_path, weight):
    from recsys_spark.models.lightfm import LightFMNetParams, LightFMParams, LightFMRecommender

    cold = world.train.groupBy(tb.USER_IDX).count().orderBy(F.desc("count"), tb.USER_IDX).first()[0]
    fit_rows = world.train.filter(F.col(tb.USER_IDX) != cold)
    model = LightFMRecommender(LightFMParams(backend="local", num_proc=1, validation_users=0, cold_user_weight=weight,
                                             net=LightFMNetParams(dim=4, seed=0), train=_train_config(None)))
    model.warehouse, model.run_date, model.workdir = world.warehouse, world.run.run_date, str(tmp_path / "work")
    model.fit(fit_rows)
    counts = fit_rows.groupBy(tb.ITEM_IDX).count().toPandas()
    assert model.item_counts[counts[tb.ITEM_IDX]].tolist() == counts["count"].tolist()

    warm = next(u for u in sorted(r[0] for r in fit_rows.select(tb.USER_IDX).distinct().collect()))
    users = spark.createDataFrame(pd.DataFrame({tb.USER_IDX: np.array([cold, warm], np.int32)}))
    recs = _recs(model, users, None, k=model.n_items)
    factors = {r[tb.USER_IDX]: np.array(r[tb.EMBEDDING]) for r in model.user_factors().collect()}
    items = np.stack(model.item_factors().toPandas().sort_values(tb.ITEM_IDX)[tb.EMBEDDING].to_numpy())
    for user in (cold, warm):
        dots = items @ factors[user]  # f(u, i), every item
        if user == cold and weight is not None:  # the prior: log(1 + train rows), plus the standardised f
            dots = np.log1p(model.item_counts) + weight * (dots - dots.mean()) / dots.std()
        got = recs[recs[tb.USER_IDX] == user]
        assert np.allclose(got[tb.SCORE].to_numpy(), dots[got[tb.ITEM_IDX].to_numpy()], atol=1e-4)
        assert np.allclose(got[tb.SCORE].to_numpy(), np.sort(dots)[::-1], atol=1e-4)  # every item, in order

    model.save(str(tmp_path / "model"))
    loaded = registry.load("lightfm", spark, str(tmp_path / "model"))
    pd.testing.assert_frame_equal(_recs(loaded, users, None, k=model.n_items), recs)


def test_an_exported_training_job_repeats_the_fit_under_ddp_without_spark(world, deepfm, tmp_path):
    # What scripts/bench_training.py runs on a machine without Spark: the job rank 0 of the fit ran, here
    # under the torch backend (one-rank DDP, Gloo) rather than the fixture's local launcher.
    fitted, cold = deepfm
    model = DeepFMRecommender(deepfm_params())
    model.warehouse, model.run_date, model.workdir = world.warehouse, world.run.run_date, str(tmp_path / "work")
    path = model.export_training(world.train.filter(F.col(tb.USER_IDX) != cold), str(tmp_path / "job.pt"))
    assert model.module is None  # exported, not trained
    job = torch.load(path, weights_only=False)
    job.config = job.config.model_copy(update={"checkpoint_dir": str(tmp_path / "checkpoints")})
    result = run_one_rank(job, "torch", seed=job.config.seed)
    assert [round(row["train_loss"], 5) for row in result.history] == [
        round(row["train_loss"], 5) for row in fitted.history]
    assert result.history[-1]["ndcg@10"] == pytest.approx(fitted.history[-1]["ndcg@10"], abs=1e-6)
    assert fitted.training["seconds_to_best"] > 0


def test_sasrec_rows_train_every_transition_and_every_input_position(world, tmp_path):
    # Windows of max_len + 1: the network reads max_len inputs at inference, so training must fill them
    # all (with max_len items per row, the oldest position was never trained).
    from recsys_spark.models.sasrec import SASRecParams, SASRecRecommender

    model = SASRecRecommender(SASRecParams.model_validate(
        {"backend": "local", "num_proc": 1, "validation_users": 0, "net": {"max_len": 5, "d": 8}}))
    model.workdir = str(tmp_path / "work")
    job = torch.load(model.export_training(world.train, str(tmp_path / "job.pt")), weights_only=False)
    seq = job.shard[tb.ITEMS]  # [rows, max_len + 1], left-padded
    assert seq.shape[1] == 6
    pairs = ((seq[:, :-1] != tb.PAD_IDX) & (seq[:, 1:] != tb.PAD_IDX)).sum(0)  # trained pairs per input position
    transitions = world.train.groupBy(tb.USER_IDX).count().agg(F.sum(F.col("count") - 1)).first()[0]
    assert int(pairs.sum()) == transitions and bool((pairs > 0).all())


def test_deepfm_candidates_rerank_only_the_candidate_models_list(spark, world, deepfm):
    fitted, _ = deepfm
    model = DeepFMRecommender(fitted.params.model_copy(update={"candidates": "popularity", "candidates_k": 6}))
    model.module, model.spec, model.item_fields = fitted.module, fitted.spec, fitted.item_fields
    model.n_users, model.n_items, model._users = fitted.n_users, fitted.n_items, fitted._users
    model.warehouse, model.run_date = world.warehouse, world.run.run_date

    gold = tb.read(spark, world.warehouse, tb.RECOMMENDATIONS).filter(world.run.where("popularity"))
    candidates = (gold.filter(F.col(tb.RANK) <= 6)
                  .join(tb.read(spark, world.warehouse, tb.USER_INDEX), tb.USER_ID)
                  .join(tb.read(spark, world.warehouse, tb.ITEM_INDEX), tb.ITEM_ID))
    allowed = _pairs(candidates)
    users = world.train.select(tb.USER_IDX).distinct()
    recs = _recs(model, users, world.train, k=3)
    _check_contract(recs, _pairs(world.train), {u for u, _ in allowed} & {r[0] for r in users.collect()}, 3)
    assert set(zip(recs[tb.USER_IDX], recs[tb.ITEM_IDX], strict=True)) <= allowed
    # DeepFM's own order, not popularity's: the scores are the network's
    full = _recs(fitted, users, world.train, k=fitted.n_items)
    merged = recs.merge(full, on=[tb.USER_IDX, tb.ITEM_IDX], suffixes=("", "_full"))
    assert len(merged) == len(recs) and np.allclose(merged[tb.SCORE], merged[f"{tb.SCORE}_full"], atol=1e-5)

    later = model.params.model_copy(update={"candidates": "als"})
    model.params = later
    with pytest.raises(RecsysError, match="recommend with als first"):
        model.recommend(users, 3, seen=world.train).count()


def test_features_command_is_idempotent_and_checks_the_side_format(spark, world, capsys):
    before = sorted(tb.read(spark, world.warehouse, tb.USER_FEATURES).collect())
    assert main(["features", "--warehouse", world.warehouse]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "ok"
    assert sorted(tb.read(spark, world.warehouse, tb.USER_FEATURES).collect()) == before
    code = main(["features", "--warehouse", world.warehouse, "--users-file", "u.user", "--set", "features.format=none"])
    assert code == 2 and "features.format=none" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- pipeline


def test_pipeline_with_gru4rec_and_the_session_protocol(spark, world):
    """train -> recommend -> evaluate for popularity and gru4rec, then the session protocol (the world
    fixture already ran ingest, interactions and popularity for this run date)."""
    gru, sas = "model_params.gru4rec", "model_params.sasrec"
    config = load_config(overrides=[
        f"warehouse={world.warehouse}", *SMALL, "models=[popularity,gru4rec,sasrec]", "evaluate.sessions=true",
        f"{gru}.backend=local", f"{gru}.num_proc=1", f"{gru}.validation_users=5",
        f"{gru}.net={{hidden: 16, parallel: 8, n_sample: 16, max_length: 20, dropout_hidden: 0.0}}",
        f"{gru}.train={{epochs: 1, batch_size: 32, lr: 0.01, optimizer: adam, schedule: constant, "
        "early_stopping_metric: recall@20, progress: false}",
        f"{sas}.backend=local", f"{sas}.validation_users=5", f"{sas}.net={{max_len: 10, d: 8, blocks: 1}}",
        f"{sas}.train={{epochs: 1, batch_size: 32, progress: false}}",
    ])
    run = world.run
    trained = pipeline.run_train(spark, config, "gru4rec", run)
    assert set(trained["embeddings"]) == {tb.USER_EMBEDDINGS, tb.ITEM_EMBEDDINGS}
    assert pipeline.run_recommend(spark, config, "gru4rec", run)["rows_out"] > 0
    scored = pipeline.run_evaluate(spark, config, run)
    # Both models' metrics of the day land in one commit: a reader never sees them half replaced.
    last = DeltaTable.forPath(spark, tb.table_path(world.warehouse, tb.METRICS)).history(1).first()
    assert int(last["operationMetrics"]["numOutputRows"]) == len(scored) and set(scored[tb.MODEL]) == {
        "popularity", "gru4rec"}
    pipeline.run_evaluate_sessions(spark, config, run)

    def metrics() -> pd.DataFrame:
        return tb.read(spark, world.warehouse, tb.METRICS).toPandas()

    rows = metrics()
    assert set(rows[rows[tb.SPLIT] == run.split][tb.MODEL]) == {"popularity", "gru4rec"}
    # The session protocol: its own baselines, under their own names, and the session models (SASRec was
    # not recommended for this run date, so the user-level rows above lack it; it still scores sessions).
    session_models = {"session_pop", "session_itemknn", "gru4rec", "sasrec"}
    assert set(rows[rows[tb.SPLIT] == pipeline.SESSIONS_SPLIT][tb.MODEL]) == session_models
    sessions = rows[rows[tb.SPLIT] == pipeline.SESSIONS_SPLIT].set_index([tb.MODEL, tb.METRIC, tb.K])[tb.VALUE]
    for model in session_models:
        assert 0 <= sessions[(model, "mrr", 20)] <= sessions[(model, "recall", 20)] <= 1
        assert sessions[(model, "n_queries", 0)] == sessions[("gru4rec", "n_queries", 0)] > 0
    for model in ("gru4rec", "sasrec"):
        model_dir = Path(tb.model_dir(world.warehouse, model, run.run_date))
        assert json.loads((model_dir / "sessions" / "model.json").read_text())["level"] == "sessions"

    # Re-scoring the user-level protocol replaces its own rows and leaves the session rows alone.
    pipeline.run_evaluate(spark, config, run, ["gru4rec"])
    again = metrics()
    assert len(again) == len(rows)
    assert (again[tb.SPLIT] == pipeline.SESSIONS_SPLIT).sum() == (rows[tb.SPLIT] == pipeline.SESSIONS_SPLIT).sum()


def test_a_bare_evaluate_scores_the_models_that_recommended(world, capsys):
    """The world has popularity's recommendations for its run date; the configured itemknn and als have none:
    a plain `recsys-spark evaluate` scores what is there and names what it skipped."""
    args = ["evaluate", "--warehouse", world.warehouse, "--run-date", world.run.run_date.isoformat(),
            *[x for o in SMALL for x in ("--set", o)]]
    code = main(args)
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert "evaluating popularity" in out.out and "(skipped itemknn, als: none for this run date)" in out.out
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert "popularity" in summary["models"] and not {"itemknn", "als"} & set(summary["models"])
    # Naming a model is still a promise that it has recommendations.
    assert main([*args, "--models", "als"]) == 2
    assert "no recommendations of als" in capsys.readouterr().err


def test_pipeline_trains_all_five_models_into_delta(spark, world, capsys):
    """What the issue's user runs: one `recsys-spark pipeline` with ALS, NCF, DeepFM (re-ranking ALS),
    GRU4Rec and SASRec, each on its own launcher, writing top-N and metrics to Delta. DeepFM is listed
    before the model it re-ranks: the pipeline orders them. (On the world's warehouse for another run
    date: the same generated events, so ingest and interactions find nothing new.)"""
    warehouse = world.warehouse
    tiny = "train.epochs=1", "train.batch_size=64", "train.progress=false", "validation_users=5"
    overrides = [*SMALL, "tracking.enabled=false", "model_params.als.rank=8", "model_params.als.max_iter=3",
                 "model_params.deepfm.candidates=als", "model_params.deepfm.candidates_k=20",
                 "model_params.sasrec.net.max_len=20", "model_params.gru4rec.net.max_length=20"]
    backends = {"ncf": "local", "deepfm": "local", "sasrec": "local", "gru4rec": "torch"}
    for model, backend in backends.items():
        overrides += [f"model_params.{model}.{s}" for s in (*tiny, f"backend={backend}")]
    overrides.append("model_params.gru4rec.num_proc=2")
    args = ["pipeline", "--warehouse", warehouse, "--run-date", "2026-01-03", "--models",
            "deepfm,als,ncf,gru4rec,sasrec"]
    assert main([*args, *[x for o in overrides for x in ("--set", o)]]) == 0, capsys.readouterr().err[-3000:]
    models = {"als", "ncf", "deepfm", "gru4rec", "sasrec"}
    day = F.col(tb.RUN_DATE) == F.lit(dt.date(2026, 1, 3))
    recs = tb.read(spark, warehouse, tb.RECOMMENDATIONS).filter(day)
    per_model = {r[0]: r[1] for r in recs.groupBy(tb.MODEL).agg(F.max(tb.RANK)).collect()}
    assert per_model == {m: 10 for m in models}  # recommend.k=10 rows per user, every model
    metrics = tb.read(spark, warehouse, tb.METRICS).filter(day & (F.col(tb.METRIC) == "ndcg")).toPandas()
    assert set(metrics[tb.MODEL]) == models and metrics[tb.VALUE].between(0, 1).all()
    # DeepFM only re-ranked ALS's lists (10 per user in gold here): the same items, in its own order.
    als = recs.filter(F.col(tb.MODEL) == "als").select(tb.USER_ID, tb.ITEM_ID)
    deepfm = recs.filter(F.col(tb.MODEL) == "deepfm").select(tb.USER_ID, tb.ITEM_ID)
    assert deepfm.count() == als.count() > 0 and deepfm.subtract(als).count() == 0
