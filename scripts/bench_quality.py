"""Every quality figure of the project from one script: one data preparation per data set, every model of
the registry and the peers on exactly that split, each tuned on validation with the same budget, the test
scored once.

Protocol (``--help`` for the options; the JSON keeps every trial):

- **Data**: each data set goes through the pipeline's own steps (ingest, interactions, features) with the
  project's default configuration (``conf/pipeline.yaml``: 2-core activity filter, leave-last-out).
  MovieLens 100K and the Taobao sample are scored leave-last-out (full catalogue, the user's train items
  filtered, ``recsys_spark.evaluate.ranking``); the Yoochoose sample with the session protocol
  (``recsys_spark.evaluate.sessions``: the sessions after the temporal cut, every click after the first a
  query against the whole catalogue), where the models with a session form and the baselines play.
- **Tuning**: a validation split is carved from train the way test was carved from the data (each user's
  latest train item; for sessions, the train sessions of the last ``test_fraction`` of the train period).
  Every model and every peer gets the same budget: exactly ``--trials`` settings (default 4), listed
  below in ``TRIALS``, the first of each being the configured default. The setting with the best
  validation NDCG@10 is refitted on the whole train part and scored once on test. Torch models stop
  early on their own hold-out from the part they are fitted on (never the validation or test items) in
  the trials; the test fit trains the number of epochs (steps) the best trial chose, with no hold-out
  (``final_setting``).
- **Peers**: ``implicit`` 0.7.2 ALS (its own grid: factors, regularisation, confidence scale, BM25 or
  raw weights) and ``implicit`` item-kNN (cosine, BM25), fitted on the same train rows, their top-N
  (``filter_already_liked_items``) scored by the same evaluator; the session protocol's baselines
  ``session_pop`` and ``session_itemknn`` (tuned: λ, α, neighbours).
- **Reported**: HR@10, NDCG@10, Recall@20, catalogue coverage@10, fit seconds and, for torch models, the
  optimizer steps to the best validation and the epochs run.

Usage::

    .venv/bin/python scripts/bench_quality.py [--data ../shared/data] [--datasets ml-100k,taobao,yoochoose]
        [--models als,sasrec-ce,...] [--trials 4] [--out .bench/quality.json] [--resume] [--ranks sasrec-ce]
    .venv/bin/python scripts/bench_quality.py --show --out .bench/quality.json   # its tables, as Markdown

The JSON is rewritten after every fit; ``--resume`` keeps its trials and fits only the missing ones (a
killed run loses one fit, and a budget can be spent in several sittings: every sitting's commit, machine
and load are kept under ``runs``).

Torch models train with the ``local`` launcher (one process): the quality does not depend on the
launcher (``tests/test_distributed.py``), and two ranks on two shared cores only add overhead.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one BLAS thread per Spark task and for implicit

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import reference_sasrec  # noqa: E402  (scripts/, next to this file)
from pyspark.sql import DataFrame, SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from recsys_spark import metrics as M  # noqa: E402
from recsys_spark import tables as tb  # noqa: E402
from recsys_spark.config import PipelineConfig, load_config  # noqa: E402
from recsys_spark.data import splits  # noqa: E402
from recsys_spark.data.sequences import session_item_arrays  # noqa: E402
from recsys_spark.evaluate.ranking import evaluate  # noqa: E402
from recsys_spark.evaluate.sessions import ItemKNNScorer, PopularityScorer, evaluate_sessions  # noqa: E402
from recsys_spark.models import registry  # noqa: E402
from recsys_spark.models.torch_base import TorchRecommender  # noqa: E402
from recsys_spark.pipeline import read_split, run_features, run_ingest, run_interactions  # noqa: E402
from recsys_spark.session import get_spark  # noqa: E402

log = logging.getLogger("bench_quality")

K = 100  # recommendations per user: enough for every metric below
TORCH = {"backend": "local", "num_proc": 1, "train": {"progress": False}}


@dataclass(frozen=True)
class Dataset:
    path: str
    preset: str
    protocol: str  # leave_last_out | sessions
    side: tuple[str, str] | None = None  # side files for the features (MovieLens u.user, u.item)


DATASETS = {
    "ml-100k": Dataset("ml-100k/u.data", "movielens", "leave_last_out", ("ml-100k/u.user", "ml-100k/u.item")),
    "taobao": Dataset("taobao/UserBehavior_head84475.csv", "taobao", "leave_last_out"),
    "yoochoose": Dataset("yoochoose/yoochoose-clicks-100k_train_full.txt", "yoochoose", "sessions"),
}

# The settings each row tries, the configured default first: the same number for every row. The order
# after the default is the most promising first (from earlier validation runs only), so that a run with
# fewer --trials still tries each row's best-known alternative.
TRIALS: dict[str, list[dict[str, Any]]] = {
    "popularity": [{}, {"by": "weight"}, {"window_days": 30}, {"window_days": 7}],
    "itemknn": [{}, {"weighting": "bm25"}, {"weighting": "tfidf"}, {"neighbours": 50, "shrink": 10.0}],
    "als": [{}, {"rank": 200}, {"rank": 64, "reg_param": 0.01, "alpha": 1.0}, {"alpha": 5.0, "reg_param": 0.1}],
    # reg_param is absolute here (Hu et al.'s lambda), per interaction in als: their grids differ.
    "als_cg": [{}, {"alpha": 1.0, "reg_param": 1.0}, {"rank": 200}, {"alpha": 1.0, "reg_param": 5.0}],
    "svd": [{}, {"rank": 32}, {"rank": 64}, {"weighting": "tfidf"}],
    "ease": [{}, {"reg": 200.0}, {"reg": 500.0}, {"reg": 100.0}],
    "ncf": [{}, {"net": {"model": "gmf", "mf_dim": 64}}, {"train": {"lr": 0.003}},
            {"net": {"n_negatives": 8, "dropout": 0.2}}],
    "sasrec-ce": [{}, {"net": {"dropout": 0.5}}, {"train": {"lr": 0.002}}, {"net": {"d": 128, "dropout": 0.5}}],
    "sasrec-bce": [{"net": {"loss": "bce"}}, {"net": {"loss": "bce", "dropout": 0.5}},
                   {"net": {"loss": "bce"}, "train": {"lr": 0.002}}, {"net": {"loss": "bce", "d": 128}}],
    "gru4rec": [{}, {"net": {"hidden": 200}}, {"train": {"lr": 0.01}}, {"net": {"loss": "bpr-max", "elu_param": 0.5,
                                                                                 "bpreg": 1.0}}],
    "deepfm": [{}, {"net": {"dim": 32}}, {"net": {"dropout": 0.5}}, {"train": {"lr": 0.003}}],
    "widedeep": [{}, {"net": {"dim": 64}}, {"net": {"dropout": 0.5}}, {"train": {"lr": 0.003}}],
    "dcn": [{}, {"net": {"cross": "matrix"}}, {"net": {"dropout": 0.5}}, {"train": {"lr": 0.003}}],
    "two_tower": [{}, {"net": {"temperature": 0.1}}, {"net": {"uniform_negatives": 512}},
                  {"net": {"history_decay": 0.8}}],
    "twostage": [{}, {"label_items": 10}, {"candidate_params": {"rank": 200}}, {"ranker": {"objective": "binary"}}],
    # WARP (the default) and BPR side by side: the same variations of each, the loss the only difference.
    "lightfm": [{}, {"train": {"lr": 0.01}}, {"net": {"dim": 32}, "train": {"weight_decay": 1e-5}},
                {"net": {"max_sampled": 30}}],
    "lightfm-bpr": [{"net": {"loss": "bpr"}}, {"net": {"loss": "bpr"}, "train": {"lr": 0.01}},
                    {"net": {"loss": "bpr", "dim": 32}, "train": {"weight_decay": 1e-5}},
                    {"net": {"loss": "bpr", "n_negatives": 4}}],
    "item2vec": [{}, {"recency_decay": 0.5}, {"window": 5, "recency_decay": 0.5}, {"window": 50}],
    "multvae": [{}, {"net": {"variant": "dae"}}, {"net": {"anneal_cap": 0.5}}, {"net": {"hidden": 200, "latent": 64}}],
    # The plain SASRec of scripts/reference_sasrec.py: the same trials as sasrec-ce, in its flat form.
    "reference-sasrec": [{}, {"dropout": 0.5}, {"lr": 0.002}, {"d": 128, "dropout": 0.5}],
    "implicit-als": [{"factors": 64, "regularization": 1.0, "alpha": 1.0, "bm25": False},
                     {"factors": 32, "regularization": 1.0, "alpha": 1.0, "bm25": True},
                     # als_cg's default (the same solver): tuned on the same validation, so implicit has it too.
                     {"factors": 128, "regularization": 20.0, "alpha": 3.0, "bm25": False},
                     {"factors": 64, "regularization": 0.05, "alpha": 0.3, "bm25": False}],
    "implicit-itemknn": [{"kind": "cosine", "K": 100}, {"kind": "cosine", "K": 20},
                         {"kind": "bm25", "K": 100}, {"kind": "bm25", "K": 20}],
    "session_pop": [{}, {}, {}, {}],  # nothing to tune: one setting, listed as often as the others
    "session_itemknn": [{"lam": 20.0, "alpha": 0.5, "neighbours": 100}, {"lam": 0.0, "alpha": 0.5, "neighbours": 100},
                        {"lam": 50.0, "alpha": 0.75, "neighbours": 200}, {"lam": 20.0, "alpha": 0.5, "neighbours": 50}],
}
# Registry model behind each row (the sasrec rows differ by loss, and so do the lightfm rows).
MODEL_OF = {"sasrec-ce": "sasrec", "sasrec-bce": "sasrec", "lightfm-bpr": "lightfm"}
RANKING_ROWS = ["popularity", "itemknn", "als", "als_cg", "twostage", "svd", "ease", "item2vec", "multvae", "ncf",
                "sasrec-ce", "sasrec-bce", "gru4rec", "deepfm", "widedeep", "dcn", "two_tower", "lightfm",
                "lightfm-bpr", "reference-sasrec", "implicit-als", "implicit-itemknn"]
SESSION_ROWS = ["session_pop", "session_itemknn", "gru4rec", "sasrec-ce", "item2vec"]


def merged(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


# -- data -----------------------------------------------------------------------------------------------

def prepare(spark: SparkSession, data_dir: Path, name: str, root: str) -> tuple[PipelineConfig, dict]:
    """The pipeline's own steps on one data set, with the default configuration (and the side files)."""
    ds = DATASETS[name]
    config = load_config(Path(__file__).resolve().parents[1] / "conf" / "pipeline.yaml",
                         [f"warehouse={os.path.join(root, name)}"])
    if ds.side:
        config = config.model_copy(update={"features": config.features.model_copy(update={
            "users_file": str(data_dir / ds.side[0]), "items_file": str(data_dir / ds.side[1])})})
    else:
        config = config.model_copy(update={"features": config.features.model_copy(update={"format": "none"})})
    run_ingest(spark, config, str(data_dir / ds.path), ds.preset)
    counts = run_interactions(spark, config)
    counts.update(run_features(spark, config))
    return config, counts


def leave_last_out(spark: SparkSession, config: PipelineConfig, table: str = tb.TRAIN) -> DataFrame:
    """The leave-last-out rows of ``table`` (silver/train or silver/test) of a prepared warehouse, persisted."""
    return read_split(spark, config, table, splits.LEAVE_LAST_OUT).persist()


def torch_models() -> list[str]:
    """The registry's torch models, in registry order."""
    return [name for name in registry.MODELS if issubclass(registry.model_class(name), TorchRecommender)]


def ranking_scores(recs: DataFrame, test: DataFrame, train: DataFrame, n_items: int) -> dict[str, float]:
    frame = evaluate(recs, test, train, [10, 20], n_items).toPandas()
    value = {(m, int(k)): v for m, k, v in zip(frame[tb.METRIC], frame[tb.K], frame[tb.VALUE], strict=True)}
    per_user = user_ndcg(recs, test)
    return {"hr@10": value[("hr", 10)], "ndcg@10": value[("ndcg", 10)], "recall@20": value[("recall", 20)],
            "coverage@10": value[("coverage", 10)], "ndcg@10_se": standard_error(per_user)}


def user_ndcg(recs: DataFrame, test: DataFrame, k: int = 10) -> pd.Series:
    """NDCG@k of every test user (0 without recommendations), by ``recsys_spark.metrics.ndcg``, the
    evaluator's own per-user function: its mean is the evaluator's NDCG@k. Collected: one row per user."""
    top = recs.filter(F.col(tb.RANK) <= k).select(tb.USER_IDX, tb.ITEM_IDX, tb.RANK).toPandas()
    ranked = top.sort_values([tb.USER_IDX, tb.RANK]).groupby(tb.USER_IDX)[tb.ITEM_IDX].agg(list)
    relevant = test.select(tb.USER_IDX, tb.ITEM_IDX).distinct().toPandas().groupby(tb.USER_IDX)[tb.ITEM_IDX].agg(list)
    return pd.Series({user: M.ndcg(ranked.get(user, []), items, k) for user, items in relevant.items()}).sort_index()


def standard_error(values: pd.Series) -> float:
    """The standard error of a mean over users: sample std / sqrt(n)."""
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def paired_lift(after: pd.Series, before: pd.Series, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """NDCG@10 of ``after`` minus ``before`` on the same users: the mean difference, its standard error
    (std of the per-user differences / sqrt(n)) and a 95% paired bootstrap interval over users."""
    diff = (after - before.reindex(after.index).fillna(0.0)).to_numpy()
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    return {"lift": float(diff.mean()), "lift_se": standard_error(pd.Series(diff)),
            "lift_ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
            "users": len(diff)}


# -- one fit of a row ------------------------------------------------------------------------------------

def build_ours(row: str, setting: dict, config: PipelineConfig, workdir: str, launcher_given: bool = False):
    """The registry model behind ``row``: its configured parameters with ``setting`` on top; a torch model
    trains on the one-process launcher unless ``setting`` names its own (``launcher_given``)."""
    name = MODEL_OF.get(row, row)
    cls = registry.model_class(name)
    raw = merged(config.model_params.get(name, {}), setting)
    if issubclass(cls, TorchRecommender):
        raw = merged(raw, {"train": TORCH["train"]}) if launcher_given else merged(raw, TORCH)
    model = cls(cls.params_class.model_validate(raw))
    model.workdir, model.warehouse, model.users_per_block = workdir, config.warehouse, config.recommend.users_per_block
    return model


def fit_ours(row: str, setting: dict, config: PipelineConfig, train: DataFrame, workdir: str,
             launcher_given: bool = False):
    model = build_ours(row, setting, config, workdir, launcher_given)
    _, seconds = timed(lambda: model.fit(train))
    return model, seconds


def training_of(model) -> dict:
    summary = getattr(model, "training", {}) or {}
    return {key: summary.get(key) for key in ("steps_to_best", "epochs_run", "best_epoch")}


def implicit_recs(spark: SparkSession, setting: dict, train: DataFrame, n_users: int, n_items: int):
    """``implicit``'s model of ``setting`` fitted on ``train``; its top-K for every train user (seen items
    filtered) as a (user_idx, item_idx, score, rank) frame, and the fit seconds."""
    from implicit.als import AlternatingLeastSquares
    from implicit.nearest_neighbours import BM25Recommender, CosineRecommender, bm25_weight
    from scipy.sparse import csr_matrix
    from threadpoolctl import threadpool_limits

    pdf = train.select(tb.USER_IDX, tb.ITEM_IDX, tb.WEIGHT).toPandas()
    weights = csr_matrix((pdf[tb.WEIGHT].to_numpy(np.float32), (pdf[tb.USER_IDX], pdf[tb.ITEM_IDX])),
                         shape=(n_users, n_items), dtype=np.float32)
    if "kind" in setting:
        cls = BM25Recommender if setting["kind"] == "bm25" else CosineRecommender
        model = cls(K=setting["K"], num_threads=os.cpu_count())
        fit_matrix = weights
    else:
        model = AlternatingLeastSquares(factors=setting["factors"], regularization=setting["regularization"],
                                        alpha=setting["alpha"], iterations=15, random_state=42,
                                        num_threads=os.cpu_count())
        fit_matrix = bm25_weight(weights, K1=100, B=0.8).tocsr().astype(np.float32) if setting["bm25"] else weights
    users = np.unique(pdf[tb.USER_IDX].to_numpy())
    with threadpool_limits(1, "blas"):
        _, seconds = timed(lambda: model.fit(fit_matrix, show_progress=False))
        ids, scores = model.recommend(users, weights[users], N=K, filter_already_liked_items=True)
    recs = pd.DataFrame({
        tb.USER_IDX: np.repeat(users, ids.shape[1]).astype(np.int32), tb.ITEM_IDX: ids.ravel().astype(np.int32),
        tb.SCORE: scores.ravel().astype(np.float64),
        tb.RANK: np.tile(np.arange(1, ids.shape[1] + 1, dtype=np.int32), len(users)),
    })
    recs = recs[(recs[tb.ITEM_IDX] >= 0) & np.isfinite(recs[tb.SCORE])]
    return spark.createDataFrame(recs), seconds


def ranking_row(spark, row: str, setting: dict, config: PipelineConfig, train: DataFrame, test: DataFrame,
                n_users: int, n_items: int, workdir: str) -> dict:
    """Fit ``row`` with ``setting`` on ``train`` and score it on ``test`` (validation or test)."""
    users = train.select(tb.USER_IDX).distinct()
    if row.startswith("implicit"):
        recs, seconds = implicit_recs(spark, setting, train, n_users, n_items)
        extra = {}
    elif row == "reference-sasrec":
        (network, histories, summary), seconds = timed(lambda: reference_sasrec.fit(train.toPandas(), n_items,
                                                                                    setting))
        max_len = {**reference_sasrec.DEFAULTS, **setting}["max_len"]
        recs = spark.createDataFrame(reference_sasrec.recommend(network, histories, max_len, K))
        extra = {"steps_to_best": summary["steps_to_best"], "curve": summary["curve"]}
    else:
        model, seconds = fit_ours(row, setting, config, train, workdir)
        recs, extra = model.recommend(users, K, seen=train), training_of(model)
        if hasattr(model, "first_stage"):  # a two-stage model: its candidate model's own list, same fit
            first = model.first_stage().recommend(users, K, seen=train)
            extra = {**extra, "first_stage": {**ranking_scores(first, test, train, n_items),
                                              **paired_lift(user_ndcg(recs, test), user_ndcg(first, test))},
                     "ranker": getattr(model, "training", {})}
    return {**ranking_scores(recs, test, train, n_items), "fit_s": round(seconds, 2), **extra}


# -- the session protocol --------------------------------------------------------------------------------

def session_row(spark, row: str, setting: dict, config: PipelineConfig, train: DataFrame, test: DataFrame,
                n_items: int, workdir: str) -> dict:
    if row in ("session_pop", "session_itemknn"):
        lists = [r[0] for r in session_item_arrays(train, min_length=1).select(tb.ITEMS).collect()]
        fit = (lambda: PopularityScorer.fit(lists, n_items)) if row == "session_pop" else (
            lambda: ItemKNNScorer.fit(lists, n_items, **setting))
        scorer, seconds = timed(fit)
        extra = {}
    else:
        model = build_ours(row, setting, config, workdir)
        scorer, seconds = timed(lambda: model.fit_session_scorer(train, n_items))
        extra = training_of(model)
    values = evaluate_sessions(spark, test, scorer, ks=[10, 20])
    return {"hr@10": values["recall@10"], "ndcg@10": values["ndcg@10"], "recall@20": values["recall@20"],
            "mrr@20": values["mrr@20"], "queries": values["n_queries"], "fit_s": round(seconds, 2), **extra}


# -- tuning ----------------------------------------------------------------------------------------------

def final_setting(row: str, best: dict) -> dict:
    """The setting of the test fit: the best trial's, and for a model that stops early, its length too.

    Epochs are hyper-parameters chosen on validation like the others: the test fit trains as many as the
    best trial needed, on the whole train part, with no inner hold-out (which would otherwise keep each
    user's latest train item, the most telling one for next-item models, out of training). What it changed
    on ML-100K is in docs/BENCHMARKS.md (sasrec-ce 0.1015 -> 0.1036, NCF 0.0371 -> 0.0476)."""
    if row == "reference-sasrec":
        return {**best["setting"], "validation_users": 0, "max_steps": best["steps_to_best"]}
    if best.get("best_epoch"):
        return merged(best["setting"], {"validation_users": 0, "train": {"epochs": best["best_epoch"]}})
    return best["setting"]


def tune_and_test(row: str, trials: int, score_on, out: dict, save) -> None:
    """``score_on(setting, part)`` for each of the row's first ``trials`` settings on validation, then the
    best (by NDCG@10) once on test, into ``out[row]``; ``save()`` after every fit. Trials already in
    ``out[row]`` (a resumed run) are kept, not fitted again."""
    done = {json.dumps(t["setting"], sort_keys=True): t for t in out.get(row, {}).get("trials", [])}
    result = out.setdefault(row, {"trials": []})
    for setting in TRIALS[row][:trials]:
        key = json.dumps(setting, sort_keys=True)
        if key not in done:  # a row with nothing to tune lists one setting several times: fit it once
            done[key] = {"setting": setting, **score_on(setting, "validation")}
            result["trials"] = list(done.values())
            save()
        log.info("%s %s: validation %s", row, setting, {k: round(v, 4) for k, v in done[key].items()
                                                         if isinstance(v, float)})
    best = max(done.values(), key=lambda t: t["ndcg@10"])
    final = final_setting(row, best)
    if result.get("best_setting") != best["setting"] or result.get("test_setting") != final or "test" not in result:
        result.update(best_setting=best["setting"], test_setting=final, test=score_on(final, "test"))
        save()
    log.info("%s best %s: test %s", row, best["setting"], result["test"])


def rank_check(spark, row: str, setting: dict, config: PipelineConfig, train: DataFrame, test: DataFrame,
               n_users: int, n_items: int) -> dict:
    """``row`` with ``setting`` trained on 1 rank (local) and on 2 Horovod ranks, both scored on test: with the
    global batch and step-counted patience, the two should agree within noise."""
    out = {}
    for label, launcher in (("1 rank", {"backend": "local", "num_proc": 1}),
                            ("2 horovod ranks", {"backend": "horovod", "num_proc": 2})):
        tuned = merged(setting, launcher)
        model, seconds = fit_ours(row, tuned, config, train, tempfile.mkdtemp(prefix=f"bq-ranks-{row}-"),
                                  launcher_given=True)
        recs = model.recommend(train.select(tb.USER_IDX).distinct(), K, seen=train)
        out[label] = {**ranking_scores(recs, test, train, n_items), "fit_s": round(seconds, 2), **training_of(model)}
        log.info("%s on %s: %s", row, label, out[label])
    return out


def cold_check(spark, rows: list[str], config: PipelineConfig, train: DataFrame, test: DataFrame, n_items: int,
               out: dict, save, share: float = 0.1, seed: int = 0) -> None:
    """Cold users made by holding users out: a seeded ``share`` of the test users loses every train row;
    each of ``rows`` (its tuned test setting, else its default) is fitted on the other users' rows and
    ranks for the held-out users from what it knows of them without their rows (their side features),
    no seen filter (the system has seen nothing of them), scored on their test items. Rows after the
    first get the paired NDCG@10 difference to the first (popularity, when listed first)."""
    users = sorted(r[0] for r in test.select(tb.USER_IDX).distinct().collect())
    rng = np.random.default_rng(seed)
    cold = spark.createDataFrame([(int(u),) for u in users if rng.random() < share], f"{tb.USER_IDX} int")
    rest = train.join(cold, tb.USER_IDX, "left_anti").persist()
    cold_test = test.join(cold, tb.USER_IDX, "left_semi").persist()
    per_user = {}
    for row in rows:
        setting = out.get("rows", {}).get(row, {}).get("test_setting", TRIALS[row][0])
        model, seconds = fit_ours(row, setting, config, rest, tempfile.mkdtemp(prefix=f"bq-cold-{row}-"))
        recs = model.recommend(cold, K).persist()
        per_user[row] = user_ndcg(recs, cold_test)
        result = {**ranking_scores(recs, cold_test, rest, n_items), "fit_s": round(seconds, 2),
                  "users": len(per_user[row]), "setting": setting}
        if row != rows[0]:
            result["vs_" + rows[0]] = paired_lift(per_user[row], per_user[rows[0]])
        out.setdefault("cold", {})[row] = result
        log.info("cold users, %s: %s", row, result)
        save()


def run_dataset(spark, data_dir: Path, name: str, rows: list[str], trials: int, root: str, out: dict, save,
                ranks_of: list[str] = (), ranks_setting: dict | None = None, cold_rows: list[str] = ()) -> None:
    """Every row of ``rows`` on data set ``name``, into ``out`` (``save()`` after every fit)."""
    config, counts = prepare(spark, data_dir, name, root)
    wh = config.warehouse
    n_items = tb.read(spark, wh, tb.ITEM_INDEX).agg(F.max(tb.ITEM_IDX)).first()[0] + 1
    n_users = tb.read(spark, wh, tb.USER_INDEX).agg(F.max(tb.USER_IDX)).first()[0] + 1
    out["tables"] = counts
    out.setdefault("rows", {})
    if DATASETS[name].protocol == "sessions":
        train, test = splits.session_periods(tb.read(spark, wh, tb.SESSIONS), config.interactions.test_fraction)
        fit_part, valid = splits.session_periods(train, config.interactions.test_fraction)
        parts = {"validation": (fit_part.persist(), valid.persist()), "test": (train.persist(), test.persist())}
        for row in [r for r in rows if r in SESSION_ROWS]:
            tune_and_test(row, trials, lambda setting, part, row=row: session_row(
                spark, row, setting, config, *parts[part], n_items, tempfile.mkdtemp(prefix=f"bq-{row}-")),
                out["rows"], save)
        return
    train, test = leave_last_out(spark, config), leave_last_out(spark, config, tb.TEST)
    fit_part, valid = (df.persist() for df in splits.leave_last_out(train))
    parts = {"validation": (fit_part, valid), "test": (train, test)}
    for row in [r for r in rows if r in RANKING_ROWS]:
        tune_and_test(row, trials, lambda setting, part, row=row: ranking_row(
            spark, row, setting, config, *parts[part], n_users, n_items, tempfile.mkdtemp(prefix=f"bq-{row}-")),
            out["rows"], save)
    if cold_rows:
        cold_check(spark, cold_rows, config, train, test, n_items, out, save)
    for row in ranks_of:
        tuned = out["rows"].get(row, {}).get("best_setting")
        setting = ranks_setting or (TRIALS[row][0] if tuned is None else tuned)
        out.setdefault("ranks", {})[row] = rank_check(spark, row, setting, config, train, test, n_users, n_items)
        save()


def table(results: dict) -> str:
    """The test figures of every row (and the rank check), one Markdown table per data set."""
    lines = []
    for data, result in results.items():
        lines += [f"\n{data}\n", "| model | HR@10 | NDCG@10 | Recall@20 | coverage@10 | fit s | steps to best "
                  "| validation NDCG@10 | best setting |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row, r in result.get("rows", {}).items():
            if "test" not in r:  # interrupted before its test fit
                continue
            t, best = r["test"], max(r["trials"], key=lambda trial: trial["ndcg@10"])
            ndcg = f"{t['ndcg@10']:.4f}" + (f" ± {t['ndcg@10_se']:.4f}" if t.get("ndcg@10_se") else "")
            lines.append(f"| {row} | {t['hr@10']:.4f} | {ndcg} | {t['recall@20']:.4f} | "
                         f"{_cell(t.get('coverage@10'), '.3f')} | {t['fit_s']:.0f} | {_cell(t.get('steps_to_best'))} | "
                         f"{best['ndcg@10']:.4f} | `{json.dumps(r['best_setting'])}` |")
        for row, r in result.get("rows", {}).items():
            first = r.get("test", {}).get("first_stage")
            if first:
                lines.append(f"| {row}: its first stage alone | {first['hr@10']:.4f} | {first['ndcg@10']:.4f} ± "
                             f"{first['ndcg@10_se']:.4f} | {first['recall@20']:.4f} | {first['coverage@10']:.3f} "
                             f"| | | | lift {first['lift']:+.4f} ± {first['lift_se']:.4f} (paired s.e.), "
                             f"95% bootstrap [{first['lift_ci95'][0]:+.4f}, {first['lift_ci95'][1]:+.4f}] |")
        for row, r in result.get("cold", {}).items():
            lines.append(f"| {row}, held-out cold users | {r['hr@10']:.4f} | {r['ndcg@10']:.4f} ± "
                         f"{r['ndcg@10_se']:.4f} | {r['recall@20']:.4f} | {r['coverage@10']:.3f} | | | | "
                         f"{r['users']} users, no train rows" + "".join(
                             f"; {key[3:]} {v['lift']:+.4f} ± {v['lift_se']:.4f}" for key, v in r.items()
                             if key.startswith("vs_")) + " |")
        for row, by_ranks in result.get("ranks", {}).items():
            for label, t in by_ranks.items():
                lines.append(f"| {row}, {label} | {t['hr@10']:.4f} | {t['ndcg@10']:.4f} | {t['recall@20']:.4f} | "
                             f"{t['coverage@10']:.3f} | {t['fit_s']:.0f} | {_cell(t.get('steps_to_best'))} | | |")
    return "\n".join(lines)


def _cell(value, spec: str = "") -> str:
    return "" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--models", default=",".join(dict.fromkeys(RANKING_ROWS + SESSION_ROWS)),
                        help="rows to run (default: all)")
    parser.add_argument("--trials", type=int, default=4, help="settings tried per row, the same for every row")
    parser.add_argument("--out", default=".bench/quality.json")
    parser.add_argument("--show", action="store_true", help="print the tables of --out and stop (no fitting)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the trials already in --out (same --trials) and fit only the missing ones")
    parser.add_argument("--ranks", default="", help="rows also trained on 1 and on 2 Horovod ranks (best setting)")
    parser.add_argument("--cold", default="", help="rows also scored on held-out cold users (10%% of the users "
                        "lose their train rows), e.g. popularity,twostage: the first is the reference")
    parser.add_argument("--ranks-setting", type=json.loads, default=None,
                        help="with --ranks: the setting (JSON; default: the row's tuned best, else its first)")
    args = parser.parse_args(argv)
    if args.show:
        with open(args.out) as fh:
            print(table(json.load(fh)["results"]))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("py4j", "recsys_spark"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.trials > min(len(t) for t in TRIALS.values()):
        raise SystemExit(f"--trials {args.trials}: some rows list fewer settings")
    spark = get_spark("bench-quality")
    rows = args.models.split(",")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report: dict[str, Any] = {"trials": args.trials, "results": {}, "runs": []}
    if args.resume and os.path.exists(args.out):
        with open(args.out) as fh:
            report = json.load(fh)
        if report["trials"] != args.trials:
            raise SystemExit(f"--resume: {args.out} was run with --trials {report['trials']}, not {args.trials}")
    # Every invocation that wrote to this file, with its machine and load (a resumed file has several).
    report["runs"].append({"commit": commit, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": argv or
                           sys.argv[1:], "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                        "load_before": os.getloadavg()}})
    root = tempfile.mkdtemp(prefix="bench-quality-")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

    def save() -> None:  # after every fit: a long run keeps what it has, and --resume goes on from there
        with open(args.out + ".tmp", "w") as fh:
            json.dump(report, fh, indent=2, default=str)
        os.replace(args.out + ".tmp", args.out)

    ranks = [r for r in args.ranks.split(",") if r]
    for name in args.datasets.split(","):
        cold = [r for r in args.cold.split(",") if r] if DATASETS[name].protocol == "leave_last_out" else []
        run_dataset(spark, Path(args.data), name, rows, args.trials, root,
                    report["results"].setdefault(name, {}), save, ranks, args.ranks_setting, cold)
    print(table(report["results"]))


if __name__ == "__main__":
    main()
