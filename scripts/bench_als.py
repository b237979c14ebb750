"""ALS side by side: this project's (MLlib fit + blocked top-N) against ``implicit``'s CPU ALS.

One run, the same leave-last-out split of each data set (built by the project's own ingest and
interactions steps), the same metrics (``recsys_spark.evaluate``), the same hyper-parameters:

- confidence: MLlib uses ``c = 1 + alpha * weight``. ``implicit`` (0.7, read in its
  ``user_linear_equation``) takes the matrix value itself as the confidence ``c`` (after multiplying
  by its own ``alpha``): it builds ``YtY + sum (c - 1) y y^T`` and ``sum c y``, so it adds no 1. We
  therefore pass ``1 + alpha * weight`` with implicit's ``alpha=1``: the same ``c`` on both sides.
- regularisation: MLlib multiplies ``reg_param`` by each user's (item's) number of interactions
  (ALS-WR); implicit's is absolute. ``implicit`` runs with the same value, and ``implicit-scaled``
  with ``reg_param * mean interactions per user``, the constant closest to MLlib's.
- solver: MLlib solves each least squares exactly (Cholesky); implicit uses 3 conjugate-gradient steps
  per iteration (its default). Initialisations differ.

Timings: fit (once); top-N for all users, best of 3 after a warm-up, seen items removed (ours:
``top_k_from_factors``; implicit's ``recommend(filter_already_liked_items=True)``; MLlib's
``recommendForAllUsers``, which cannot filter seen items and so returns a different list); and our
fit with MLlib's default 10 blocks against our ``defaultParallelism`` blocks. BLAS threads: one per
Spark task (OPENBLAS_NUM_THREADS=1, set below before numpy loads; implicit asks for it too), and
implicit with one thread per core (``--threads``).

The quality columns are a sanity check of this split only; tuning and the project's quality figures
come from ``scripts/bench_quality.py``.

Usage: ``python scripts/bench_als.py [--out .bench/als.json] [--data ../shared/data]``
"""

from __future__ import annotations

import os

# Before numpy loads OpenBLAS, here and (inherited) in Spark's Python workers: one BLAS thread per task.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from pyspark.sql import DataFrame, SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from recsys_spark import tables as tb  # noqa: E402
from recsys_spark.config import PipelineConfig, load_config, model_config  # noqa: E402
from recsys_spark.data.splits import LEAVE_LAST_OUT  # noqa: E402
from recsys_spark.evaluate.ranking import evaluate  # noqa: E402
from recsys_spark.models.als import ALSParams, ALSRecommender  # noqa: E402
from recsys_spark.models.popularity import PopularityRecommender  # noqa: E402
from recsys_spark.pipeline import run_ingest, run_interactions  # noqa: E402
from recsys_spark.session import get_spark  # noqa: E402

log = logging.getLogger("bench_als")

DATASETS = {"ml-100k": ("ml-100k/u.data", "movielens-100k"),
            "taobao": ("taobao/UserBehavior_head84475.csv", "taobao")}
KS = [10, 20]
MLLIB_DEFAULT_BLOCKS = 10


REPEATS = 3  # top-N timings: the best of this many runs, after one untimed warm-up


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def best_time(fn, repeats: int = REPEATS) -> float:
    """Best wall time of ``repeats`` runs after a warm-up (Python workers started, caches filled)."""
    fn()
    return min(timed(fn)[1] for _ in range(repeats))


def materialise(df: DataFrame) -> None:
    """Run a frame's whole plan without collecting it."""
    df.write.format("noop").mode("overwrite").save()


def split(spark: SparkSession, base: PipelineConfig, data_dir: Path, name: str, root: str) -> dict:
    """Ingest one data set into a fresh warehouse; return its leave-last-out train/test and sizes."""
    path, preset = DATASETS[name]
    config = base.model_copy(update={"warehouse": os.path.join(root, name)})
    run_ingest(spark, config, str(data_dir / path), preset)
    run_interactions(spark, config)
    pick = F.col(tb.SPLIT) == LEAVE_LAST_OUT
    train = tb.read(spark, config.warehouse, tb.TRAIN).filter(pick).drop(tb.SPLIT).persist()
    test = tb.read(spark, config.warehouse, tb.TEST).filter(pick).drop(tb.SPLIT).persist()
    n_items = tb.read(spark, config.warehouse, tb.ITEM_INDEX).count()
    n_users = tb.read(spark, config.warehouse, tb.USER_INDEX).count()
    return {"train": train, "test": test, "n_items": n_items, "n_users": n_users,
            "train_rows": train.count(), "test_rows": test.count()}


def scores(recs: DataFrame, test: DataFrame, train: DataFrame, n_items: int) -> dict[str, float]:
    metrics = evaluate(recs, test, train, KS, n_items).toPandas()
    value = {(m, int(k)): v for m, k, v in zip(metrics[tb.METRIC], metrics[tb.K], metrics[tb.VALUE], strict=True)}
    return {"ndcg@10": value[("ndcg", 10)], "recall@20": value[("recall", 20)], "hr@10": value[("hr", 10)]}


def run_ours(data: dict, params: ALSParams, k: int) -> dict:
    train, users = data["train"], data["train"].select(tb.USER_IDX).distinct()
    model, fit_s = timed(lambda: ALSRecommender(params).fit(train))
    topn_s = best_time(lambda: materialise(model.recommend(users, k, seen=train)))
    mllib_s = best_time(lambda: materialise(model.model.recommendForAllUsers(k)))
    recs = model.recommend(users, k, seen=train)
    return {"fit_s": fit_s, "topn_s": topn_s, "mllib_recommend_for_all_users_s": mllib_s,
            **scores(recs, data["test"], train, data["n_items"])}


def run_implicit(spark: SparkSession, data: dict, params: ALSParams, k: int, regularization: float,
                 threads: int) -> dict:
    from implicit.cpu.als import AlternatingLeastSquares
    from scipy.sparse import csr_matrix
    from threadpoolctl import threadpool_limits

    log.info("collecting the train interactions to the driver for implicit")
    pdf = data["train"].select(tb.USER_IDX, tb.ITEM_IDX, tb.WEIGHT).toPandas()
    shape = (data["n_users"], data["n_items"])
    confidence = 1.0 + params.alpha * pdf[tb.WEIGHT].to_numpy(np.float32)  # c = 1 + alpha * w, see above
    user_items = csr_matrix((confidence, (pdf[tb.USER_IDX], pdf[tb.ITEM_IDX])), shape=shape, dtype=np.float32)
    model = AlternatingLeastSquares(factors=params.rank, regularization=regularization, alpha=1.0,
                                    iterations=params.max_iter, random_state=params.seed, num_threads=threads)
    users = np.unique(pdf[tb.USER_IDX].to_numpy())
    with threadpool_limits(1, "blas"):
        _, fit_s = timed(lambda: model.fit(user_items, show_progress=False))
        topn_s = best_time(lambda: model.recommend(users, user_items[users], N=k, filter_already_liked_items=True))
        ids, vals = model.recommend(users, user_items[users], N=k, filter_already_liked_items=True)
    recs = pd.DataFrame({
        tb.USER_IDX: np.repeat(users, ids.shape[1]).astype(np.int32),
        tb.ITEM_IDX: ids.ravel().astype(np.int32),
        tb.SCORE: vals.ravel().astype(np.float64),
        tb.RANK: np.tile(np.arange(1, ids.shape[1] + 1, dtype=np.int32), len(users)),
    })
    recs = recs[(recs[tb.ITEM_IDX] >= 0) & np.isfinite(recs[tb.SCORE])]
    frame = spark.createDataFrame(recs)
    return {"fit_s": fit_s, "topn_s": topn_s, "regularization": regularization,
            **scores(frame, data["test"], data["train"], data["n_items"])}


def run_popularity(data: dict, k: int) -> dict:
    train = data["train"]
    model, fit_s = timed(lambda: PopularityRecommender().fit(train))
    recs = model.recommend(train.select(tb.USER_IDX).distinct(), k, seen=train)
    return {"fit_s": fit_s, **scores(recs, data["test"], train, data["n_items"])}


def block_effect(data: dict, params: ALSParams, spark: SparkSession) -> dict:
    ours = ALSRecommender(params)
    _, ours_s = timed(lambda: ours.fit(data["train"]))
    mllib = ALSRecommender(params.model_copy(update={"num_blocks": MLLIB_DEFAULT_BLOCKS}))
    _, mllib_s = timed(lambda: mllib.fit(data["train"]))
    return {"blocks_ours": ours.num_blocks(spark), "fit_s_ours": ours_s,
            "blocks_mllib_default": MLLIB_DEFAULT_BLOCKS, "fit_s_mllib_default": mllib_s}


def table(results: dict) -> str:
    lines = [f"{'data':8} {'model':16} {'NDCG@10':>8} {'Recall@20':>9} {'fit s':>7} {'top-N s':>8}"]
    for name, runs in results.items():
        for model, r in runs["models"].items():
            topn = r.get("topn_s")
            lines.append(f"{name:8} {model:16} {r['ndcg@10']:8.4f} {r['recall@20']:9.4f} {r['fit_s']:7.2f} "
                         f"{'' if topn is None else f'{topn:8.2f}'}")
        ours = runs["models"]["ours"]
        ratios = runs["ratios"]
        lines.append(f"{name:8} MLlib recommendForAllUsers (no seen filter): "
                     f"{ours['mllib_recommend_for_all_users_s']:.2f} s")
        lines.append(f"{name:8} ratios ours/implicit: fit {ratios['fit']:.2f}, top-N {ratios['topn']:.2f}; "
                     f"top-N ours/MLlib recommendForAllUsers {ratios['topn_vs_mllib']:.2f}")
        b = runs["blocks"]
        lines.append(f"{name:8} ALS fit with {b['blocks_ours']} blocks (ours) {b['fit_s_ours']:.2f} s, "
                     f"with {b['blocks_mllib_default']} (MLlib default) {b['fit_s_mllib_default']:.2f} s")
    return "\n".join(lines)


def provenance(spark: SparkSession, threads: int) -> dict:
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        commit = git.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    import implicit

    return {"git_commit": commit, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "implicit_threads": threads, "spark": spark.version,
            "spark_master": spark.sparkContext.master, "default_parallelism": spark.sparkContext.defaultParallelism,
            "implicit": implicit.__version__, "numpy": np.__version__,
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".bench/als.json")
    parser.add_argument("--config", default=None, help="pipeline YAML (default: conf/pipeline.yaml if present)")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="implicit's threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    config = load_config(args.config)
    spark = get_spark("bench-als")
    params = model_config(config, "als", ALSParams)
    k = max(KS)
    report: dict = {"provenance": provenance(spark, args.threads), "params": params.model_dump(), "k": k,
                    "interactions": config.interactions.model_dump(), "datasets": {}}
    with tempfile.TemporaryDirectory(prefix="bench-als-") as root:
        for name in args.datasets:
            data = split(spark, config, Path(args.data), name, root)
            log.info("%s: %d users, %d items, %d train / %d test rows", name, data["n_users"], data["n_items"],
                     data["train_rows"], data["test_rows"])
            mean_items = data["train_rows"] / max(1, data["train"].select(tb.USER_IDX).distinct().count())
            models = {
                "ours": run_ours(data, params, k),
                "implicit": run_implicit(spark, data, params, k, params.reg_param, args.threads),
                "implicit-scaled": run_implicit(spark, data, params, k, params.reg_param * mean_items, args.threads),
                "popularity": run_popularity(data, k),
            }
            ours, other = models["ours"], models["implicit"]
            report["datasets"][name] = {
                "sizes": {key: data[key] for key in ("n_users", "n_items", "train_rows", "test_rows")},
                "models": models,
                "ratios": {"fit": ours["fit_s"] / other["fit_s"], "topn": ours["topn_s"] / other["topn_s"],
                           "topn_vs_mllib": ours["topn_s"] / ours["mllib_recommend_for_all_users_s"]},
                "blocks": block_effect(data, params, spark),
            }
            data["train"].unpersist()
            data["test"].unpersist()
    print(table(report["datasets"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    log.info("raw numbers written to %s", out)


if __name__ == "__main__":
    main()
