"""Training speed of the deep models, without Spark at run time: each model's own training job, exported
here, run on any machine torch runs on (this CPU, or a lent GPU with bf16 and NCCL).

Why two steps: a GPU machine lent for minutes has no Java, Spark or Petastorm. ``prepare`` does
everything the pipeline does before training (ingest, interactions, features, each model's training rows
and validation hold-out) and writes the job one rank would run (``TorchRecommender.export_training``:
the task, every training row, steps per epoch at the global batch, the configured ``train`` section);
``run`` loads each job and trains it to its end as rank 0 of a one-rank ``torch`` group
(``distributed.run_one_rank``: NCCL on a GPU, Gloo on a CPU; the trainer's bf16 autocast on CUDA), then
fits ``scripts/reference_sasrec.py`` on the same MovieLens split on the same device. Only what runs on a
Spark cluster around the job (Petastorm's read of the shard, the launcher's start-up) is left out; the
CPU launchers are measured by ``bench_deep.py`` and ``bench_loader.py``.

Jobs (``prepare``):

- ``ml-100k/<model>``: MovieLens 100K through the pipeline's steps with the default configuration and the
  side files (as ``bench_quality.py`` prepares it), the leave-last-out train split, every torch model of
  the registry at its configured default, validated on its own hold-out and stopped by its own patience:
  steps and seconds to the best validation.
- ``ml-1m-synthetic/<model>``: MovieLens 1M's sizes (6,040 users, 3,706 items, 1,000,209 interactions,
  at least 20 per user, log-normal activity, Zipf-like item popularity, one interaction per second per
  user), SASRec and GRU4Rec at their defaults for ``--epochs`` epochs without validation: the epoch time.

Reported per job: epochs run, the median epoch's seconds after the first (the first pays for CUDA's
start-up), training rows per second, the best validation metric, optimizer steps and wall seconds to it
(validation included), and the whole fit's seconds.

    .venv/bin/python scripts/bench_training.py prepare [--data ../shared/data] [--jobs .bench/training-jobs]
    .venv/bin/python scripts/bench_training.py run [--jobs .bench/training-jobs] [--only ml-100k/sasrec,...]
        [--backend torch|local] [--out .bench/training.json]
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

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_sasrec  # noqa: E402  (scripts/, next to this file)

from recsys_spark import tables as tb  # noqa: E402
from recsys_spark.train import distributed  # noqa: E402

ML1M = {"users": 6040, "items": 3706, "interactions": 1_000_209, "min_per_user": 20}
SYNTHETIC_MODELS = ("sasrec", "gru4rec")
REFERENCE_TRAIN = "ml-100k.train.parquet"  # the split the reference SASRec fits on
FIRST = ["ml-1m-synthetic/sasrec", "ml-100k/sasrec", "reference-sasrec", "ml-1m-synthetic/gru4rec"]


# -- prepare (here, with Spark) ---------------------------------------------------------------------------

def ml1m_like(seed: int = 0) -> pd.DataFrame:
    """Interactions with MovieLens 1M's sizes: (user_idx, item_idx, weight, first_ts, last_ts).

    Activity per user is log-normal (ML-1M: median 96, mean 166) above a floor of 20, scaled so the total is
    exact; each user's items are drawn without replacement with probability ∝ 1 / (rank + 10), and follow
    one another a second apart from a random start."""
    rng = np.random.default_rng(seed)
    n_users, n_items, total, floor = ML1M["users"], ML1M["items"], ML1M["interactions"], ML1M["min_per_user"]
    raw = rng.lognormal(mean=4.6, sigma=1.0, size=n_users)
    sizes = floor + np.floor(raw / raw.sum() * (total - floor * n_users)).astype(np.int64)
    sizes[rng.permutation(n_users)[: total - sizes.sum()]] += 1  # the rounding's remainder, one each
    sizes = np.minimum(sizes, n_items)
    popularity = 1.0 / (np.arange(n_items) + 10.0)
    popularity /= popularity.sum()
    users, items, ts = [], [], []
    for user, size in enumerate(sizes):
        users.append(np.full(size, user, np.int32))
        items.append(rng.choice(n_items, size=size, replace=False, p=popularity).astype(np.int32))
        ts.append(rng.integers(0, 10**8) + np.arange(size))
    seconds = pd.to_datetime(np.concatenate(ts), unit="s")
    return pd.DataFrame({tb.USER_IDX: np.concatenate(users), tb.ITEM_IDX: np.concatenate(items),
                         tb.WEIGHT: 1.0, tb.FIRST_TS: seconds, tb.LAST_TS: seconds})


def prepare(args: argparse.Namespace) -> None:
    import bench_quality

    from recsys_spark.session import get_spark

    spark = get_spark("bench-training")
    jobs = Path(args.jobs)
    jobs.mkdir(parents=True, exist_ok=True)
    root = tempfile.mkdtemp(prefix="bench-training-")

    def export(dataset: str, name: str, train, config, setting: dict) -> None:
        model = bench_quality.build_ours(name, setting, config, os.path.join(root, dataset, name))
        path = jobs / dataset / f"{name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        model.export_training(train, str(path))
        print(f"{dataset}/{name}: exported in {time.perf_counter() - started:.1f} s "
              f"({path.stat().st_size / 2**20:.1f} MiB)", flush=True)

    config, _ = bench_quality.prepare(spark, Path(args.data), "ml-100k", root)
    train = bench_quality.leave_last_out(spark, config)
    train.toPandas().to_parquet(jobs / REFERENCE_TRAIN)
    for name in bench_quality.torch_models():
        export("ml-100k", name, train, config, {})
    train.unpersist()

    synthetic = spark.createDataFrame(ml1m_like()).persist()
    for name in SYNTHETIC_MODELS:
        export("ml-1m-synthetic", name, synthetic, config,
               {"validation_users": 0, "train": {"epochs": args.epochs, "early_stopping_metric": None}})
    synthetic.unpersist()


# -- run (anywhere torch runs) ----------------------------------------------------------------------------

def run_job(path: Path, backend: str) -> dict:
    """Train one exported job to its end on one rank; its figures."""
    job = torch.load(path, weights_only=False)
    with tempfile.TemporaryDirectory() as checkpoints:  # the job's own directory is on the machine that made it
        job.config = job.config.model_copy(update={"checkpoint_dir": checkpoints, "resume": False, "progress": False})
        started = time.perf_counter()
        result = distributed.run_one_rank(job, backend, seed=job.config.seed)
        wall = time.perf_counter() - started
    rows = job.steps_per_epoch * job.config.batch_size
    epochs = [row["seconds"] for row in result.history]
    epoch_s = statistics.median(epochs[1:] or epochs)
    metric = job.config.early_stopping_metric
    best = next((row for row in result.history if row["epoch"] == result.best_epoch), None) if metric else None
    return {"epochs": len(epochs), "steps_per_epoch": job.steps_per_epoch, "batch_size": job.config.batch_size,
            "epoch_s": round(epoch_s, 3), "first_epoch_s": round(epochs[0], 3),
            "rows_per_s": round(rows / epoch_s, 1), "metric": metric,
            "best": None if best is None else round(best[metric], 5),
            "steps_to_best": result.best_step if metric else None,
            "seconds_to_best": None if best is None else round(best["elapsed_s"], 1),
            "fit_s": round(wall, 1)}


def run(args: argparse.Namespace) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    jobs = Path(args.jobs)
    names = sorted(str(p.relative_to(jobs))[:-3] for p in jobs.glob("*/*.pt"))
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(names) - {"reference-sasrec"})
        if unknown:
            raise SystemExit(f"--only: no exported job {unknown}; exported: {names}")
        names = [n for n in wanted if n in names or n == "reference-sasrec"]
    else:
        first = [n for n in FIRST if n in names or n == "reference-sasrec"]  # what a short lease must not miss
        names = first + [n for n in names if n not in first]
    report = {"machine": {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
                          "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "python": platform.python_version(), "backend": args.backend,
                          "nccl": device == "cuda" and args.backend == "torch"},
              "jobs": {}}
    print(json.dumps(report["machine"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            if name == "reference-sasrec":
                figures = run_reference(jobs / REFERENCE_TRAIN, device)
            else:
                figures = run_job(jobs / f"{name}.pt", args.backend)
        except Exception as exc:  # one failure should not cost the other figures of a lent machine
            figures = {"error": f"{type(exc).__name__}: {exc}"}
        report["jobs"][name] = figures
        print(f"{name:<28} {json.dumps(figures)}", flush=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


def run_reference(train_file: Path, device: str) -> dict:
    """The reference SASRec on the same train split, its defaults (= sasrec-ce's), on ``device``."""
    train = pd.read_parquet(train_file)
    n_items = int(train[tb.ITEM_IDX].max()) + 1
    started = time.perf_counter()
    _, _, summary = reference_sasrec.fit(train, n_items, {}, device=device)
    return {"metric": "ndcg@10", "best": summary["validation_ndcg@10"], "steps_to_best": summary["steps_to_best"],
            "steps_per_epoch": summary["steps_per_epoch"], "seconds_to_best": summary["seconds_to_best"],
            "fit_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build the data and export every job (needs Spark)")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    p.add_argument("--jobs", default=".bench/training-jobs")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the ml-1m-synthetic jobs")
    r = sub.add_parser("run", help="train every exported job (no Spark needed)")
    r.add_argument("--jobs", default=".bench/training-jobs")
    r.add_argument("--only", help="comma-separated jobs, e.g. ml-1m-synthetic/sasrec,reference-sasrec")
    r.add_argument("--backend", choices=["torch", "local"], default="torch")
    r.add_argument("--out", default=".bench/training.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    main()
