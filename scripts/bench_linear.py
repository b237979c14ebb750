"""Speed, memory and tuning of the linear models (PureSVD ``svd``, EASE ``ease``); prints, writes JSON.

Three parts (``--parts``, default all):

- ``svd``: PureSVD's two solvers, MLlib's ``RowMatrix.computeSVD`` (ARPACK) and the randomized subspace
  iteration on the executors, at the same rank on MovieLens 100K and on a synthetic 20k users: fit
  seconds and how far the randomized singular values are from ARPACK's (the default: svd.py says why).
- ``ease``: EASE's Gram ``X^T X`` on Spark and its inversion on the driver at 2k, 5k, 10k and 20k items
  (synthetic, 10 users per item, 20 items per user, popularity skewed): seconds of each, and the peak of
  the driver's numpy memory during the inversion (tracemalloc sees numpy's buffers). This is what
  ``max_items`` (20000) rests on.
- ``tune``: a grid of ``ease.reg`` and of ``svd`` rank / weighting on MovieLens 100K *validation*
  (the pipeline's data preparation and the validation carve of scripts/bench_quality.py, its
  evaluator), to choose the defaults; the test split is not touched.

Usage::

    PYTHONPATH=. .venv/bin/python scripts/bench_linear.py [--parts svd,ease,tune] [--out .bench/linear_speed.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import functions as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recsys_spark import tables as tb  # noqa: E402
from recsys_spark.data.matrix import catalogue, gram, sparse_blocks, user_rows  # noqa: E402
from recsys_spark.models.ease import ease_weights  # noqa: E402
from recsys_spark.models.svd import mllib_svd, randomized_svd  # noqa: E402
from recsys_spark.session import get_spark  # noqa: E402

log = logging.getLogger("bench_linear")

RANK = 64
EASE_SIZES = [2000, 5000, 10000, 20000]
EASE_GRID = [20.0, 100.0, 200.0, 300.0]
SVD_GRID = [{"rank": r} for r in (16, 24, 32, 48)] + [{"rank": 32, "weighting": w} for w in ("bm25", "tfidf")]


def synthetic(spark, n_users: int, n_items: int, per_user: int, seed: int = 0):
    """(user_idx, item_idx, weight 1.0): ``per_user`` distinct items per user, item popularity ~ 1/rank^0.8."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity /= popularity.sum()
    draws = rng.choice(n_items, size=(n_users, per_user * 2), p=popularity)
    users, items = [], []
    for u in range(n_users):
        forced = u % n_items  # every item has a user: the catalogue is n_items
        chosen = np.append(np.setdiff1d(draws[u], [forced])[:per_user - 1], forced)
        users.append(np.full(chosen.size, u, np.int32))
        items.append(chosen.astype(np.int32))
    frame = pd.DataFrame({tb.USER_IDX: np.concatenate(users), tb.ITEM_IDX: np.concatenate(items), tb.WEIGHT: 1.0})
    return spark.createDataFrame(frame).repartition(spark.sparkContext.defaultParallelism).persist()


def movielens(spark, data: Path):
    ratings = pd.read_csv(data / "ml-100k" / "u.data", sep="\t", names=["u", "i", "r", "t"])
    return spark.createDataFrame(pd.DataFrame({tb.USER_IDX: (ratings["u"] - 1).astype("int32"),
                                               tb.ITEM_IDX: (ratings["i"] - 1).astype("int32"),
                                               tb.WEIGHT: 1.0})).persist()


def bench_svd(spark, data: Path) -> list[dict]:
    out = []
    for label, rows in (("ml-100k", movielens(spark, data)), ("synthetic 20k x 5k", synthetic(spark, 20000, 5000, 40))):
        item_ids = catalogue(rows)
        users = user_rows(rows, item_ids).persist()
        n_users = users.count()
        result = {"data": label, "users": n_users, "items": int(item_ids.size), "nnz": rows.count(), "rank": RANK}
        started = time.perf_counter()
        exact, _ = mllib_svd(users, item_ids.size, RANK)
        result["mllib_s"] = round(time.perf_counter() - started, 2)
        for iters in (4, 6, 10):
            started = time.perf_counter()
            sigma, _ = randomized_svd(users, item_ids.size, RANK, 10, iters, 42)
            seconds = time.perf_counter() - started
            k = min(sigma.size, exact.size)
            result[f"randomized_{iters}_s"] = round(seconds, 2)
            result[f"randomized_{iters}_max_rel_sigma_err"] = float(np.max(np.abs(sigma[:k] - exact[:k]) / exact[:k]))
        log.info("svd: %s", result)
        out.append(result)
        users.unpersist()
        rows.unpersist()
    return out


def bench_ease(spark) -> list[dict]:
    out = []
    tracemalloc.start()
    for n_items in EASE_SIZES:
        rows = synthetic(spark, n_users=n_items * 10 // 2, n_items=n_items, per_user=20, seed=n_items)
        item_ids = catalogue(rows)
        n = int(item_ids.size)
        started = time.perf_counter()
        g = gram(sparse_blocks(user_rows(rows, item_ids), n), n)
        gram_s = time.perf_counter() - started
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        started = time.perf_counter()
        b = ease_weights(g, 100.0)
        invert_s = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        result = {"items": n, "users": n_items * 10 // 2, "nnz": rows.count(), "gram_s": round(gram_s, 2),
                  "inversion_s": round(invert_s, 2), "driver_gib_with_gram": round(peak / 2**30, 2),
                  "inversion_extra_gib": round((peak - base) / 2**30, 2), "b_gib": round(b.nbytes / 2**30, 2)}
        log.info("ease: %s", result)
        out.append(result)
        del g, b
        rows.unpersist()
    tracemalloc.stop()
    return out


def tune(spark, data: Path) -> dict:
    """Every setting of EASE_GRID and SVD_GRID on ML-100K validation, by bench_quality's own code."""
    import bench_quality as bq

    from recsys_spark.data import splits

    root = tempfile.mkdtemp(prefix="bench-linear-")
    config, _ = bq.prepare(spark, data, "ml-100k", root)
    wh = config.warehouse
    n_items = tb.read(spark, wh, tb.ITEM_INDEX).agg(F.max(tb.ITEM_IDX)).first()[0] + 1
    n_users = tb.read(spark, wh, tb.USER_INDEX).agg(F.max(tb.USER_IDX)).first()[0] + 1
    train = bq.leave_last_out(spark, config)
    fit_part, valid = (df.persist() for df in splits.leave_last_out(train))
    out: dict[str, list] = {"ease": [], "svd": []}
    for row, grid in (("ease", [{"reg": r} for r in EASE_GRID]), ("svd", SVD_GRID)):
        for setting in grid:
            scores = bq.ranking_row(spark, row, setting, config, fit_part, valid, n_users, n_items,
                                    tempfile.mkdtemp(prefix=f"bl-{row}-"))
            log.info("tune %s %s: validation %s", row, setting, scores)
            out[row].append({"setting": setting, **scores})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--parts", default="svd,ease,tune")
    parser.add_argument("--out", default=".bench/linear_speed.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("py4j", "recsys_spark"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    spark = get_spark("bench-linear")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"commit": commit, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": argv or sys.argv[1:],
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": os.getloadavg()}}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    parts = args.parts.split(",")
    for part, run in (("svd", lambda: bench_svd(spark, Path(args.data))), ("ease", lambda: bench_ease(spark)),
                      ("tune", lambda: tune(spark, Path(args.data)))):
        if part in parts:
            report[part] = run()
            report["machine"]["load_after_" + part] = os.getloadavg()
            with open(args.out, "w") as fh:
                json.dump(report, fh, indent=2, default=str)
    print(json.dumps({k: report[k] for k in parts if k in report}, indent=1, default=str))


if __name__ == "__main__":
    main()
