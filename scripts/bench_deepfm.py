"""DeepFM on MovieLens 100K: as a re-ranker of ALS's candidates, and for cold users, against the baselines.

One warehouse, built by the pipeline's own steps: ``u.data`` without the **cold users** (a fixed 10% of
the users, picked by a hash of their id) is ingested; interactions and the leave-last-out split follow;
features come from ``u.user`` / ``u.item`` plus the training period's events (``run_features``), which
also indexes the cold users, who exist only in ``u.user``. Popularity, ALS and DeepFM train on the split's
train part and write top-100 lists to gold/recommendations, the popularity fallback included.

Warm users (the split's test users): NDCG@10 / HR@10 / Recall@20 of popularity, ALS, DeepFM over the
whole catalogue, and DeepFM re-ranking ALS's top ``--candidates`` (the two-stage set-up of
``DeepFMParams.candidates``). Cold users: every item they rated is relevant; DeepFM (their side
features, id unknown) against popularity (what every other model falls back to). One evaluator
(``recsys_spark.evaluate``), train items filtered, the same split for every row.

    .venv/bin/python scripts/bench_deepfm.py [--data ../shared/data] [--out .bench/deepfm.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from pyspark.sql import functions as F

from recsys_spark import tables as tb
from recsys_spark.config import load_config
from recsys_spark.evaluate.ranking import evaluate
from recsys_spark.models import registry
from recsys_spark.pipeline import Run, run_features, run_ingest, run_interactions, run_recommend, run_train
from recsys_spark.session import get_spark

KS = [10, 20]
COLD_SHARE = 10  # percent of users held out entirely: they exist only in u.user


def split_cold_users(data_dir: Path, out_dir: str) -> tuple[str, set[str]]:
    """Write u.data without the cold users; return its path and the cold user ids (a stable 10%)."""
    rows = (data_dir / "ml-100k" / "u.data").read_text().splitlines()
    users = sorted({r.split("\t")[0] for r in rows}, key=int)
    cold = {u for u in users if (int(u) * 2654435761) % 100 < COLD_SHARE}
    path = os.path.join(out_dir, "u.data")
    with open(path, "w") as fh:
        fh.write("\n".join(r for r in rows if r.split("\t")[0] not in cold) + "\n")
    return path, cold


def metrics(recs, test, train, n_items) -> dict[str, float]:
    values = {(r.metric, r.k): r.value for r in evaluate(recs, test, train, KS, n_items).collect()}
    return {"ndcg@10": values[("ndcg", 10)], "hr@10": values[("hr", 10)], "recall@20": values[("recall", 20)],
            "users": values[("n_users", 0)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--out", default=".bench/deepfm.json")
    parser.add_argument("--candidates", type=int, default=100, help="ALS candidates DeepFM re-ranks")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides (KEY=VALUE)")
    args = parser.parse_args()
    data = Path(args.data)
    spark = get_spark("bench-deepfm")
    root = tempfile.mkdtemp(prefix="bench-deepfm-")
    events_path, cold = split_cold_users(data, root)
    ml = data / "ml-100k"
    config = load_config(overrides=[
        f"warehouse={root}/warehouse", "interactions.min_item_interactions=1",
        f"features.users_file={ml / 'u.user'}", f"features.items_file={ml / 'u.item'}",
        "models=[popularity,als,deepfm]", "tracking.enabled=false",
        f"model_params.deepfm.candidates_k={args.candidates}", *args.set,
    ])
    wh = config.warehouse
    run = Run.of(config, run_date=dt.date(2026, 1, 1))
    timings = {}
    started = time.perf_counter()
    run_ingest(spark, config, events_path, "movielens-100k")
    run_interactions(spark, config)
    timings["ingest+interactions_s"] = time.perf_counter() - started
    started = time.perf_counter()
    counts = run_features(spark, config)
    timings["features_s"] = time.perf_counter() - started
    for name in config.models:
        started = time.perf_counter()
        run_train(spark, config, name, run)
        timings[f"{name}_fit_s"] = time.perf_counter() - started
        started = time.perf_counter()
        run_recommend(spark, config, name, run)
        timings[f"{name}_recommend_s"] = time.perf_counter() - started
        print(f"{name}: fit {timings[f'{name}_fit_s']:.1f} s, recommend {timings[f'{name}_recommend_s']:.1f} s",
              flush=True)

    users, items = tb.read(spark, wh, tb.USER_INDEX), tb.read(spark, wh, tb.ITEM_INDEX)
    n_items = items.count()
    split = F.col(tb.SPLIT) == run.split
    train = tb.read(spark, wh, tb.TRAIN).filter(split).drop(tb.SPLIT).persist()
    test = tb.read(spark, wh, tb.TEST).filter(split).drop(tb.SPLIT)
    gold = tb.read(spark, wh, tb.RECOMMENDATIONS).filter(F.col(tb.RUN_DATE) == F.lit(run.run_date))

    def gold_recs(model: str):
        return (gold.filter(F.col(tb.MODEL) == model).join(users, tb.USER_ID).join(items, tb.ITEM_ID)
                .select(tb.USER_IDX, tb.ITEM_IDX, tb.SCORE, tb.RANK))

    warm = {name: metrics(gold_recs(name), test, train, n_items) for name in config.models}
    # The same trained DeepFM, now ranking only ALS's top candidates (read back from gold).
    deepfm = registry.load("deepfm", spark, tb.model_dir(config.warehouse, "deepfm", run.run_date))
    deepfm.warehouse, deepfm.run_date = wh, run.run_date
    params = deepfm.params
    for fusion in ("none", "rrf"):
        deepfm.params = params.model_copy(update={"candidates": "als", "fusion": fusion})
        started = time.perf_counter()
        reranked = deepfm.recommend(test.select(tb.USER_IDX).distinct(), 100,
                                    train.select(tb.USER_IDX, tb.ITEM_IDX))
        label = f"deepfm re-ranking als top-{args.candidates}" + (", rrf" if fusion == "rrf" else "")
        warm[label] = metrics(reranked, test, train, n_items)
        timings[f"rerank_{fusion}_s"] = time.perf_counter() - started

    cold_ids = spark.createDataFrame([(u,) for u in sorted(cold)], f"{tb.USER_ID} string")
    raw = spark.read.csv(str(ml / "u.data"), sep="\t", schema="user_id string, item_id string, rating int, ts long")
    cold_test = (raw.join(cold_ids, tb.USER_ID, "left_semi").join(users, tb.USER_ID).join(items, tb.ITEM_ID)
                 .select(tb.USER_IDX, tb.ITEM_IDX).distinct())
    cold_rows = {name: metrics(gold_recs(name).join(cold_test.select(tb.USER_IDX).distinct(), tb.USER_IDX,
                                                    "left_semi"), cold_test, train, n_items)
                 for name in ("popularity", "deepfm")}

    print(f"\nMovieLens 100K, leave-last-out, {len(cold)} cold users held out; features {counts}")
    print(f"{'warm users':<34}{'NDCG@10':>9}{'HR@10':>9}{'Recall@20':>11}{'users':>7}")
    for name, row in warm.items():
        print(f"{name:<34}{row['ndcg@10']:>9.4f}{row['hr@10']:>9.4f}{row['recall@20']:>11.4f}{row['users']:>7.0f}")
    print(f"{'cold users (all their items)':<34}{'NDCG@10':>9}{'HR@10':>9}{'Recall@20':>11}{'users':>7}")
    for name, row in cold_rows.items():
        print(f"{name:<34}{row['ndcg@10']:>9.4f}{row['hr@10']:>9.4f}{row['recall@20']:>11.4f}{row['users']:>7.0f}")
    print("timings: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "overrides": args.set,
                   "warm": warm, "cold": cold_rows, "timings": timings, "features": counts}, fh, indent=2)


if __name__ == "__main__":
    main()
