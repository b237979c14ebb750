"""Training throughput of the deep models per launcher (speed only; quality figures: scripts/bench_quality.py).

Every torch model of the registry (its configured defaults, no validation, no early stopping) trains for a
few epochs on the leave-last-out train split of MovieLens 100K with its side files (prepared by the
pipeline's own ingest, interactions and features steps, as ``bench_quality.py`` prepares it) with the local
launcher (1 process), Horovod with 1 and 2 ranks, and TorchDistributor with 2 ranks. rows/s is the
median over the epochs after the first (the first pays for start-up); the fit wall time is reported too.
A row is what the model's loader delivers: an (user, item) pair with its sampled negatives (NCF, the
field models, LightFM, two-tower), a window of a user's sequence (SASRec, GRU4Rec), a user (Mult-VAE).

``train.batch_size`` is the global batch (all ranks together; each rank takes ``batch_size // ranks``
rows per step), so every launcher runs the same optimizer steps on the same rows per epoch and the
rows/s figures compare like with like. The same jobs on one GPU: ``scripts/bench_training.py``.

    .venv/bin/python scripts/bench_deep.py [--data ../shared/data] [--models ncf,sasrec] [--out .bench/deep.json]
        [--throughput-epochs 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality  # noqa: E402  (scripts/, next to this file: the same data preparation)

from recsys_spark.session import get_spark  # noqa: E402

LAUNCHERS = [("local, 1 process", "local", 1), ("horovod, 1 rank", "horovod", 1),
             ("horovod, 2 ranks", "horovod", 2), ("torch DDP, 2 ranks", "torch", 2)]
MODELS = bench_quality.torch_models()


def throughput(spark, data_dir: Path, models: list[str], epochs: int) -> dict:
    root = tempfile.mkdtemp(prefix="bench-deep-tp-")
    config, _ = bench_quality.prepare(spark, data_dir, "ml-100k", root)
    train = bench_quality.leave_last_out(spark, config)
    out = {}
    for name in models:
        for label, backend, ranks in LAUNCHERS:
            setting = {"backend": backend, "num_proc": ranks, "validation_users": 0,
                       "train": {"epochs": epochs, "early_stopping_metric": None}}
            workdir = os.path.join(root, "models", f"{name}-{backend}-{ranks}")
            model = bench_quality.build_ours(name, setting, config, workdir, launcher_given=True)
            started = time.perf_counter()
            model.fit(train)
            wall = time.perf_counter() - started
            rates = [h["samples_per_s"] for h in model.history[1:]] or [model.history[0]["samples_per_s"]]
            out[f"{name}: {label}"] = {"rows_per_s": statistics.median(rates), "fit_wall_s": wall,
                                       "steps_per_epoch": model.training["steps_per_epoch"]}
            print(f"{name:<10} {label:<20} {statistics.median(rates):>12,.0f} rows/s  (fit {wall:.1f} s)", flush=True)
    train.unpersist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torch models")
    parser.add_argument("--out", default=".bench/deep.json")
    parser.add_argument("--throughput-epochs", type=int, default=4, help="epochs per fit (the first is not counted)")
    args = parser.parse_args()
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"--models: {unknown} are not torch models; choose from {MODELS}")
    logging.basicConfig(level=logging.WARNING)
    spark = get_spark("bench-deep")
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "master": spark.sparkContext.master}}
    report["throughput"] = throughput(spark, Path(args.data), args.models.split(","), args.throughput_epochs)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
