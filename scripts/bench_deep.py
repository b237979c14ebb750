"""Deep models against the baselines, and training throughput per launcher.

Quality: on MovieLens 100K and the Yoochoose sample (sessions as users), the same leave-last-out split
(built by the project's ingest + interactions), full-catalogue ranking with train items filtered, the
project's evaluator: HR@10 / NDCG@10 of popularity, ALS, NCF, SASRec-BCE and SASRec-CE. Every deep model
picks its epoch on a validation hold-out taken from train (never from test).

Throughput: SASRec-CE on MovieLens for a few epochs with the local launcher (1 process), Horovod with 1
and 2 ranks, and TorchDistributor with 2 ranks; samples/s is the median over epochs after the first.

    .venv/bin/python scripts/bench_deep.py [--data ../shared/data] [--out .bench/deep.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from recsys_spark import tables as tb
from recsys_spark.config import load_config
from recsys_spark.evaluate.ranking import evaluate
from recsys_spark.models import registry
from recsys_spark.pipeline import run_ingest, run_interactions
from recsys_spark.session import get_spark

DATASETS = {
    "ml-100k": ("ml-100k/u.data", "movielens-100k", ["interactions.min_item_interactions=1"]),
    "yoochoose": ("yoochoose/yoochoose-clicks-100k_train_full.txt", "yoochoose",
                  ["interactions.min_item_interactions=2", "interactions.max_sequence_length=20",
                   # 17.8k sessions: an epoch costs 20x MovieLens's, so fewer epochs
                   "model_params.sasrec.train.epochs=30", "model_params.ncf.train.epochs=8"]),
}

MODELS = {
    "popularity": ("popularity", {}),
    "als": ("als", {}),
    "ncf": ("ncf", {}),
    "sasrec-bce": ("sasrec", {"net": {"loss": "bce"}}),
    "sasrec-ce": ("sasrec", {"net": {"loss": "ce"}}),
}


def build(name: str, overrides: list[str], params: dict, seq_len: int):
    config = load_config(overrides=overrides)
    base = dict(config.model_params.get(name, {}))
    for key, value in params.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    if name == "sasrec":
        base["net"] = {**base.get("net", {}), "max_len": seq_len}
    config = config.model_copy(update={"model_params": {**config.model_params, name: base}})
    return registry.build(name, config)


def quality(spark, data_dir: Path, quick: bool, datasets: list[str], models: list[str]) -> dict:
    results = {}
    for dataset in datasets:
        path, preset, extra = DATASETS[dataset]
        root = tempfile.mkdtemp(prefix=f"bench-deep-{dataset}-")
        overrides = [f"warehouse={root}", *extra]
        config = load_config(overrides=overrides)
        run_ingest(spark, config, str(data_dir / path), preset)
        run_interactions(spark, config)
        train = tb.read(spark, root, tb.TRAIN).filter("split = 'leave_last_out'").drop("split").persist()
        test = tb.read(spark, root, tb.TEST).filter("split = 'leave_last_out'").drop("split")
        n_items = tb.read(spark, root, tb.ITEM_INDEX).count()
        users = test.select(tb.USER_IDX).distinct()
        seen = train.select(tb.USER_IDX, tb.ITEM_IDX)
        rows = {}
        for label in models:
            name, params = MODELS[label]
            if quick and name in ("ncf", "sasrec"):
                params = {**params, "train": {"epochs": 3}}
            model = build(name, overrides, params, config.interactions.max_sequence_length)
            model.workdir = os.path.join(root, "models", label)
            started = time.perf_counter()
            model.fit(train)
            fit_s = time.perf_counter() - started
            recs = model.recommend(users, 20, seen)
            values = {(r.metric, r.k): r.value for r in evaluate(recs, test, train, [10, 20], n_items).collect()}
            history = getattr(model, "history", [])
            rows[label] = {
                "hr@10": values[("hr", 10)], "ndcg@10": values[("ndcg", 10)], "recall@20": values[("recall", 20)],
                "fit_s": fit_s, "epochs": len(history),
                "best_epoch": max(history, key=lambda h: h.get("ndcg@10", 0))["epoch"] if history else None,
            }
            print(f"{dataset:<10} {label:<11} HR@10 {rows[label]['hr@10']:.4f}  NDCG@10 {rows[label]['ndcg@10']:.4f}"
                  f"  fit {fit_s:6.1f} s  epochs {len(history)}", flush=True)
        results[dataset] = rows
        train.unpersist()
    return results


def throughput(spark, data_dir: Path, epochs: int) -> dict:
    root = tempfile.mkdtemp(prefix="bench-deep-tp-")
    overrides = [f"warehouse={root}", *DATASETS["ml-100k"][2]]
    config = load_config(overrides=overrides)
    run_ingest(spark, config, str(data_dir / DATASETS["ml-100k"][0]), DATASETS["ml-100k"][1])
    run_interactions(spark, config)
    train = tb.read(spark, root, tb.TRAIN).filter("split = 'leave_last_out'").drop("split").persist()
    out = {}
    for label, backend, ranks in [("local, 1 process", "local", 1), ("horovod, 1 rank", "horovod", 1),
                                  ("horovod, 2 ranks", "horovod", 2), ("torch DDP, 2 ranks", "torch", 2)]:
        for name in ("ncf", "sasrec"):
            params = {"backend": backend, "num_proc": ranks, "validation_users": 0,
                      "train": {"epochs": epochs, "early_stopping_metric": None}}
            model = build(name, overrides, params, config.interactions.max_sequence_length)
            model.workdir = os.path.join(root, "models", f"{name}-{backend}-{ranks}")
            started = time.perf_counter()
            model.fit(train)
            wall = time.perf_counter() - started
            rates = [h["samples_per_s"] for h in model.history[1:]] or [model.history[0]["samples_per_s"]]
            out[f"{name}: {label}"] = {"samples_per_s": statistics.median(rates), "fit_wall_s": wall}
            print(f"{name:<7} {label:<20} {statistics.median(rates):>12,.0f} samples/s  (fit {wall:.1f} s)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--out", default=".bench/deep.json")
    parser.add_argument("--quick", action="store_true", help="3 epochs per deep model (a smoke run)")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--throughput-epochs", type=int, default=4)
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    spark = get_spark("bench-deep")
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "master": spark.sparkContext.master}}
    if not args.skip_quality:
        report["quality"] = quality(spark, Path(args.data), args.quick, args.datasets.split(","),
                                    args.models.split(","))
    if not args.skip_throughput:
        report["throughput"] = throughput(spark, Path(args.data), args.throughput_epochs)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
