"""Cold start, measured: how well models serve users and items that training never saw, beside popularity.

Generic over the registry's models (``--models two_tower,lightfm,...``; popularity is always fitted, as
the fallback and the bar to clear). Protocol, on one data set prepared by the pipeline's own steps
(``bench_quality.prepare``: default configuration, side files, leave-last-out):

- **Cold users**: a fraction ``--cold-users`` of the users (by a hash of user_idx and ``--seed``) is taken
  out of train entirely. Each model is fitted on the rest, then asked for the top-K of the cold users,
  who exist in ``silver/user_features`` (their side features) but in no train row; a model that cannot
  score a user gives way to popularity (``recommend_with_fallback``, as the pipeline serves), and the share
  it served itself is recorded. Scored twice: against each cold user's test item (leave-last-out), and
  against all of the cold user's items (train and test: what a new user goes on to interact with).
  No seen filter: the system has seen nothing of these users. Each model's per-user NDCG@10 is compared
  with popularity's on the same users (``vs_popularity``: the mean paired difference, its standard
  error and a bootstrap interval): "better than popularity" is a claim about that difference.
- **Cold items**: a fraction ``--cold-items`` of the items is taken out of train as well (every row of
  theirs). Scored on the warm users whose test item is a cold item: the full catalogue ranked, the
  user's train items filtered. Popularity cannot recommend an item nobody interacted with, so it scores
  0 here; a model that places new items from their features alone can do better.
- **Cold items among the new items**: the same cold items, ranked only against each other (every warm
  item excluded) for the warm users who used any of them, against all their rows on cold items: which of
  this week's new items to show a user, LightFM's own cold-start protocol (Kula 2015 ranks the held-out
  items). Popularity has no order for items nobody used; a seeded random order of them is the reference.
- **No leak through the features**: the feature tables were built from the training events, the
  held-out users' and items' included, so the fields that grow with use (a user's activity counts,
  recency and favourite category; an item's popularity bucket, ``features.USER_EVENT_FIELDS`` and
  ``POPULARITY_BUCKET``) are set to 0, unknown, for the cold users and items before any model is
  fitted: a new user or item has no activity yet. Side features (u.user, u.item) stay.

Each row is fitted once with its configured default (``conf/models/<name>.yaml``) plus ``--settings``
(JSON: model -> overrides, e.g. the best setting ``bench_quality.py`` found). Torch models train on the
one-process launcher, as in ``bench_quality.py``. The JSON keeps every figure, the commit, the machine
and its load. The held-out users are the test set of a cold-start design: choose settings with one
``--seed`` and report with another, never the same.

Usage::

    PYTHONPATH=. .venv/bin/python scripts/bench_cold.py --models two_tower [--datasets ml-100k]
        [--cold-users 0.1] [--cold-items 0.1] [--settings '{"two_tower": {...}}'] [--out .bench/cold.json]
        [--warehouse /tmp/bench-quality-xyz/ml-100k]   # reuse a prepared warehouse (a throw-away copy)
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
from pathlib import Path
from typing import Any

import bench_quality as bq  # scripts/, next to this file
import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from recsys_spark import metrics as M
from recsys_spark import tables as tb
from recsys_spark.config import load_config
from recsys_spark.data.features import UNKNOWN, USER_EVENT_FIELDS
from recsys_spark.recommend import recommend_with_fallback
from recsys_spark.session import get_spark

log = logging.getLogger("bench_cold")

BUCKETS = 1000  # hash buckets: a fraction is resolved to 0.1%


def held_out(frame: DataFrame, key: str, fraction: float, seed: int) -> DataFrame:
    """The distinct ``key`` values of ``frame`` whose hash with ``seed`` falls in the first ``fraction``
    of the buckets: a deterministic sample, the same whatever the cluster."""
    bucket = F.pmod(F.xxhash64(key, F.lit(seed)), F.lit(BUCKETS))
    return frame.select(key).distinct().filter(bucket < F.lit(int(round(fraction * BUCKETS))))


def blank_growing_fields(spark, warehouse: str, name: str, key: str, cold: DataFrame, fields: list[str]) -> None:
    """Set ``fields`` (those the table has) to ``UNKNOWN`` on the rows of ``cold`` keys of table ``name``."""
    table = tb.read(spark, warehouse, name)
    flag = "_cold"
    marked = table.join(cold.select(key).withColumn(flag, F.lit(True)), key, "left")
    present = [f for f in fields if f in table.columns]
    blanked = marked.select(*[F.when(F.col(flag), F.lit(UNKNOWN)).otherwise(F.col(c)).cast(table.schema[c].dataType)
                              .alias(c) if c in present else F.col(c) for c in table.columns]).localCheckpoint()
    tb.overwrite(blanked, warehouse, name)


def scores(recs: DataFrame, truth: DataFrame, train: DataFrame, n_items: int) -> dict[str, Any]:
    out = bq.ranking_scores(recs, truth, train, n_items)
    out["users"] = truth.select(tb.USER_IDX).distinct().count()
    return out


def random_order_ndcg(truth: DataFrame, items: list[int], seed: int) -> float:
    """Mean NDCG@10 of each ``truth`` user's ``items`` in a seeded random order: what an order that knows
    nothing scores (popularity's, for items nobody used yet)."""
    rng = np.random.default_rng(seed)
    relevant = truth.toPandas().groupby(tb.USER_IDX)[tb.ITEM_IDX].agg(list)
    return float(np.mean([M.ndcg(list(rng.permutation(items)[:10]), rel, 10) for rel in relevant]))


def run_dataset(spark, data_dir: Path, name: str, models: list[str], settings: dict, args, root: str) -> dict:
    if args.warehouse:  # prepared before (e.g. by bench_quality.py): reused, and its feature tables changed
        config = load_config(Path(__file__).resolve().parents[1] / "conf" / "pipeline.yaml",
                             [f"warehouse={args.warehouse}"])
        counts = {"reused_warehouse": args.warehouse}
    else:
        config, counts = bq.prepare(spark, data_dir, name, root)
    wh = config.warehouse
    n_items = tb.read(spark, wh, tb.ITEM_INDEX).agg(F.max(tb.ITEM_IDX)).first()[0] + 1
    train, test = bq.leave_last_out(spark, config), bq.leave_last_out(spark, config, tb.TEST)
    cold_users = held_out(train.unionByName(test, allowMissingColumns=True), tb.USER_IDX, args.cold_users,
                          args.seed).persist()
    cold_items = held_out(train.unionByName(test, allowMissingColumns=True), tb.ITEM_IDX, args.cold_items,
                          args.seed).persist()
    blank_growing_fields(spark, wh, tb.USER_FEATURES, tb.USER_IDX, cold_users, USER_EVENT_FIELDS)
    blank_growing_fields(spark, wh, tb.ITEM_FEATURES, tb.ITEM_IDX, cold_items, [tb.POPULARITY_BUCKET])
    warm_train = (train.join(cold_users, tb.USER_IDX, "left_anti").join(cold_items, tb.ITEM_IDX, "left_anti")
                  .persist())
    # Truths: the cold users' test items and all their items; warm users' test items that are cold items.
    cold_user_test = test.join(cold_users, tb.USER_IDX, "left_semi").persist()
    cold_user_all = (train.select(tb.USER_IDX, tb.ITEM_IDX).unionByName(test.select(tb.USER_IDX, tb.ITEM_IDX))
                     .join(cold_users, tb.USER_IDX, "left_semi").persist())
    cold_item_test = (test.join(cold_users, tb.USER_IDX, "left_anti").join(cold_items, tb.ITEM_IDX, "left_semi")
                      .join(warm_train.select(tb.USER_IDX).distinct(), tb.USER_IDX, "left_semi").persist())
    cold_item_all = (train.select(tb.USER_IDX, tb.ITEM_IDX).unionByName(test.select(tb.USER_IDX, tb.ITEM_IDX))
                     .join(cold_items, tb.ITEM_IDX, "left_semi")
                     .join(warm_train.select(tb.USER_IDX).distinct(), tb.USER_IDX, "left_semi").persist())
    new_items = sorted(r[tb.ITEM_IDX] for r in cold_items.collect())
    old_items = sorted(set(range(n_items)) - set(new_items))  # excluded: the new items ranked among themselves
    result: dict[str, Any] = {"tables": counts, "cold_users": cold_users.count(), "cold_items": cold_items.count(),
                              "warm_train_rows": warm_train.count(),
                              "cold_item_test_users": cold_item_test.count(),
                              "new_item_users": cold_item_all.select(tb.USER_IDX).distinct().count(),
                              "new_items_random_order": random_order_ndcg(cold_item_all, new_items, args.seed),
                              "rows": {}}
    log.info("%s: %s", name, {k: v for k, v in result.items() if k != "rows"})

    popularity, reference = None, {}  # popularity's per-user NDCG@10 on each cold-user truth
    for row in ["popularity", *[m for m in models if m != "popularity"]]:
        setting = settings.get(row, {})
        model, seconds = bq.fit_ours(row, setting, config, warm_train, tempfile.mkdtemp(prefix=f"bc-{row}-"))
        popularity = popularity or model
        cold = recommend_with_fallback(model, cold_users, bq.K, None, (), popularity).persist()
        known = model.known_users()
        served = (cold_users.count() if known is None
                  else cold_users.join(known.select(tb.USER_IDX), tb.USER_IDX, "left_semi").count())
        warm_users = cold_item_test.select(tb.USER_IDX).distinct()
        item_recs = model.recommend(warm_users, bq.K, seen=warm_train)
        new_recs = model.recommend(cold_item_all.select(tb.USER_IDX).distinct(), bq.K, exclude_items=old_items)
        new_scores = scores(new_recs, cold_item_all, warm_train, n_items)
        result["rows"][row] = {
            "setting": setting, "fit_s": round(seconds, 2), **bq.training_of(model),
            "cold_users_served_by_model": served / max(1, result["cold_users"]),
            "cold_items": scores(item_recs, cold_item_test, warm_train, n_items),
            "new_items": {**new_scores,
                          "vs_random_order": new_scores["ndcg@10"] - result["new_items_random_order"]},
        }
        for key, truth in (("cold_users_test_item", cold_user_test), ("cold_users_all_items", cold_user_all)):
            per_user = bq.user_ndcg(cold, truth)
            reference.setdefault(key, per_user)  # popularity's, fitted first
            result["rows"][row][key] = {**scores(cold, truth, warm_train, n_items),
                                        "vs_popularity": bq.paired_lift(per_user, reference[key])}
        cold.unpersist()
        log.info("%s: %s", row, result["rows"][row])
    return result


def table(results: dict) -> str:
    lines = []
    for data, result in results.items():
        lines += [f"\n{data}: {result['cold_users']} cold users, {result['cold_items']} cold items "
                  f"({result['cold_item_test_users']} warm users whose test item is one; "
                  f"{result.get('new_item_users', 0)} who used one)\n",
                  "| model | served by model | NDCG@10 cold users, test item | NDCG@10 cold users, all items | "
                  "HR@10 cold items | NDCG@10 cold items | NDCG@10 among new items |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row, r in result["rows"].items():
            cells = []
            for key in ("cold_users_test_item", "cold_users_all_items"):
                lift = r[key].get("vs_popularity")
                versus = f" ({lift['lift']:+.4f} ± {lift['lift_se']:.4f})" if lift and row != "popularity" else ""
                cells.append(f"{r[key]['ndcg@10']:.4f}{versus}")
            new = f"{r['new_items']['ndcg@10']:.4f}" if "new_items" in r else ""
            lines.append(f"| {row} | {r['cold_users_served_by_model']:.2f} | {cells[0]} | {cells[1]} | "
                         f"{r['cold_items']['hr@10']:.4f} | {r['cold_items']['ndcg@10']:.4f} | {new} |")
        lines.append("\n(in brackets: the paired difference from popularity on the same users, and its standard "
                     "error)")
        if "new_items_random_order" in result:
            lines.append(f"(among new items, a random order scores {result['new_items_random_order']:.4f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--datasets", default="ml-100k", help="data sets with side features (bench_quality's)")
    parser.add_argument("--models", required=True, help="registry models, comma-separated (popularity is added)")
    parser.add_argument("--cold-users", type=float, default=0.1, help="share of users held out of train")
    parser.add_argument("--cold-items", type=float, default=0.1, help="share of items held out of train")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--settings", type=json.loads, default={}, help="JSON: model -> parameter overrides")
    parser.add_argument("--warehouse", default=None,
                        help="a warehouse the pipeline's steps already prepared for the one data set (its feature "
                             "tables are rewritten: the cold rows' growing fields blanked); default: prepare anew")
    parser.add_argument("--out", default=".bench/cold.json")
    parser.add_argument("--show", action="store_true", help="print the table of --out and stop")
    args = parser.parse_args(argv)
    if args.show:
        with open(args.out) as fh:
            print(table(json.load(fh)["results"]))
        return
    for fraction in (args.cold_users, args.cold_items):
        if not 0 <= fraction < 1:
            raise SystemExit(f"a cold fraction must be in [0, 1), got {fraction}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("py4j", "recsys_spark"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report: dict[str, Any] = {
        "commit": commit, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": argv or sys.argv[1:],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": os.getloadavg()},
        "protocol": {"cold_users": args.cold_users, "cold_items": args.cold_items, "seed": args.seed, "k": bq.K},
        "results": {}}
    spark = get_spark("bench-cold")
    root = tempfile.mkdtemp(prefix="bench-cold-")
    models = [m for m in args.models.split(",") if m]
    for name in args.datasets.split(","):
        report["results"][name] = run_dataset(spark, Path(args.data), name, models, args.settings, args, root)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2, default=str)
    print(table(report["results"]))


if __name__ == "__main__":
    main()
