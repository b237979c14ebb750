"""Training throughput of the deep models per launcher (speed only; quality figures: scripts/bench_quality.py).

NCF and SASRec (their configured defaults, no validation, no early stopping) train for a few epochs on
the leave-last-out train split of MovieLens 100K (built by the project's ingest + interactions) with the
local launcher (1 process), Horovod with 1 and 2 ranks, and TorchDistributor with 2 ranks. samples/s is
the median over the epochs after the first (the first pays for start-up); the fit wall time is reported too.

``train.batch_size`` is the global batch (all ranks together; each rank takes ``batch_size // ranks``
rows per step), so every launcher runs the same optimizer steps on the same samples per epoch and the
samples/s figures compare like with like.

    .venv/bin/python scripts/bench_deep.py [--data ../shared/data] [--out .bench/deep.json] [--throughput-epochs 4]
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
from recsys_spark.models import registry
from recsys_spark.pipeline import run_ingest, run_interactions
from recsys_spark.session import get_spark

DATA_PATH, PRESET = "ml-100k/u.data", "movielens-100k"
OVERRIDES: list[str] = []  # the default configuration, the data scripts/bench_quality.py scores
LAUNCHERS = [("local, 1 process", "local", 1), ("horovod, 1 rank", "horovod", 1),
             ("horovod, 2 ranks", "horovod", 2), ("torch DDP, 2 ranks", "torch", 2)]
MODELS = ("ncf", "sasrec")


def build(name: str, overrides: list[str], params: dict, seq_len: int):
    config = load_config(overrides=overrides)
    base = dict(config.model_params.get(name, {}))
    for key, value in params.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    if name == "sasrec":
        base["net"] = {**base.get("net", {}), "max_len": seq_len}
    config = config.model_copy(update={"model_params": {**config.model_params, name: base}})
    return registry.build(name, config)


def throughput(spark, data_dir: Path, epochs: int) -> dict:
    root = tempfile.mkdtemp(prefix="bench-deep-tp-")
    overrides = [f"warehouse={root}", *OVERRIDES]
    config = load_config(overrides=overrides)
    run_ingest(spark, config, str(data_dir / DATA_PATH), PRESET)
    run_interactions(spark, config)
    train = tb.read(spark, root, tb.TRAIN).filter("split = 'leave_last_out'").drop("split").persist()
    out = {}
    for label, backend, ranks in LAUNCHERS:
        for name in MODELS:
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
    train.unpersist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--out", default=".bench/deep.json")
    parser.add_argument("--throughput-epochs", type=int, default=4, help="epochs per fit (the first is not counted)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    spark = get_spark("bench-deep")
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "master": spark.sparkContext.master}}
    report["throughput"] = throughput(spark, Path(args.data), args.throughput_epochs)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
