"""ALS fold-in against a refit: what a new user loses by being folded in instead of fitted.

Protocol (MovieLens 100K through the pipeline's own steps, ``bench_quality.prepare``: default
configuration, leave-last-out): per seed, 10% of the train users are held out of an ALS fit with the
configured parameters (``conf/models/als.yaml``, the seed set); they are folded in from their train rows
(``ALSRecommender.fold_in_users``, the item factors fixed) and recommended from those factors. A refit on
the whole train part (same parameters and seed) recommends for the same users. ``--folds 10`` holds out
ten disjoint 10% sets per seed, each in its own fit, so every user is scored once (less noise: 94 users
hit about 10 times in the top 10). Both lists are scored by
the project's evaluator (full catalogue, seen items filtered, the test split) over the held-out users
only: NDCG@10, HR@10, Recall@20. Times: the fold-in (factors of the held-out users, materialised) against
the refit's fit. Target: fold-in NDCG@10 within 5% of the refit's.

Usage::

    .venv/bin/python scripts/bench_fold_in.py [--data ../shared/data] [--seeds 1,2,3] [--out .bench/fold_in.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one BLAS thread per Spark task

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import prepare, ranking_scores  # noqa: E402

from recsys_spark import tables as tb  # noqa: E402
from recsys_spark.models.als import ALSParams, ALSRecommender  # noqa: E402
from recsys_spark.pipeline import read_split  # noqa: E402
from recsys_spark.session import get_spark  # noqa: E402

log = logging.getLogger("bench_fold_in")
REPO = Path(__file__).resolve().parents[1]
HELD_OUT = 0.10
K = 20  # enough for Recall@20


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def one_seed(spark, config, train, test, n_items: int, seed: int, folds: int) -> dict:
    """``folds`` disjoint 10% sets of users (a permutation by ``seed``), each held out of its own fit and
    folded in; one refit on all users, with the same seed, recommends for all of them. Both sides are
    scored over the union of the held-out users (``folds`` = 10 holds every user out once)."""
    users = np.array(sorted(r[0] for r in train.select(tb.USER_IDX).distinct().collect()))
    size = round(HELD_OUT * len(users))
    if folds * size > len(users):
        raise SystemExit(f"{folds} folds of {size} users need more than the {len(users)} users")
    order = np.random.default_rng(seed).permutation(users)
    groups = [sorted(order[f * size:(f + 1) * size].tolist()) for f in range(folds)]
    params = ALSParams.model_validate({**config.model_params.get("als", {}), "seed": seed})
    block = config.recommend.users_per_block

    def frame(ids):
        return spark.createDataFrame([(int(u),) for u in ids], f"{tb.USER_IDX} int")

    everyone = frame([u for g in groups for u in g])
    held_test = test.join(everyone, tb.USER_IDX, "left_semi")
    fold_recs, fold_in_s, partial_fit_s = None, [], []
    for held in groups:
        held_users = frame(held)
        partial = ALSRecommender(params)
        partial.users_per_block = block
        _, fit_s = timed(lambda: partial.fit(train.join(held_users, tb.USER_IDX, "left_anti")))  # noqa: B023
        rows = train.join(held_users, tb.USER_IDX, "left_semi").select(tb.USER_IDX, tb.ITEM_IDX, tb.WEIGHT)
        folded, seconds = timed(lambda: partial.fold_in_users(rows).count())  # noqa: B023
        if folded != len(held):
            raise RuntimeError(f"folded in {folded} users, expected {len(held)}")
        recs = partial.recommend(held_users, K, seen=train).localCheckpoint()
        fold_recs = recs if fold_recs is None else fold_recs.unionByName(recs)
        fold_in_s.append(seconds)
        partial_fit_s.append(fit_s)
    fold_scores = ranking_scores(fold_recs, held_test, train, n_items)

    refit = ALSRecommender(params)
    refit.users_per_block = block
    _, refit_s = timed(lambda: refit.fit(train))
    refit_scores = ranking_scores(refit.recommend(everyone, K, seen=train), held_test, train, n_items)

    out = {"seed": seed, "folds": folds, "held_out_users": folds * size, "fold_in": fold_scores,
           "refit": refit_scores, "ndcg@10_ratio": fold_scores["ndcg@10"] / refit_scores["ndcg@10"],
           "fold_in_seconds": float(np.mean(fold_in_s)), "refit_seconds": refit_s,
           "partial_fit_seconds": float(np.mean(partial_fit_s))}
    log.info("seed %d: NDCG@10 fold-in %.4f refit %.4f (ratio %.3f) over %d users; fold-in %.1f s, refit %.1f s",
             seed, fold_scores["ndcg@10"], refit_scores["ndcg@10"], out["ndcg@10_ratio"], out["held_out_users"],
             out["fold_in_seconds"], refit_s)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--folds", type=int, default=1,
                        help="disjoint 10%% sets of users held out per seed, each in its own fit (10: every user once)")
    parser.add_argument("--out", default=".bench/fold_in.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spark = get_spark("bench-fold-in")
    with tempfile.TemporaryDirectory(prefix="bench-fold-in-") as root:
        config, counts = prepare(spark, Path(args.data), "ml-100k", root)
        train, test = (read_split(spark, config, name, config.split).persist() for name in (tb.TRAIN, tb.TEST))
        n_items = tb.read(spark, config.warehouse, tb.ITEM_INDEX).count()
        seeds = [one_seed(spark, config, train, test, n_items, int(s), args.folds) for s in args.seeds.split(",")]
    mean = {key: float(np.mean([s[key] for s in seeds]))
            for key in ("ndcg@10_ratio", "fold_in_seconds", "refit_seconds")}
    for side in ("fold_in", "refit"):
        mean[f"{side}_ndcg@10"] = float(np.mean([s[side]["ndcg@10"] for s in seeds]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    report = {"dataset": "ml-100k", "split": config.split, "held_out_fraction": HELD_OUT, "folds": args.folds,
              "als": config.model_params.get("als", {}), "rows": counts, "seeds": seeds, "mean": mean,
              "commit": commit, "machine": platform.platform(), "cpus": os.cpu_count(),
              "load_avg": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"{'seed':>4} {'users':>5} {'ndcg fold-in':>12} {'ndcg refit':>10} {'ratio':>6} {'fold-in s':>9} "
          f"{'refit s':>8}")
    for s in seeds:
        print(f"{s['seed']:>4} {s['held_out_users']:>5} {s['fold_in']['ndcg@10']:>12.4f} "
              f"{s['refit']['ndcg@10']:>10.4f} {s['ndcg@10_ratio']:>6.3f} {s['fold_in_seconds']:>9.1f} "
              f"{s['refit_seconds']:>8.1f}")
    print(f"mean ratio {mean['ndcg@10_ratio']:.3f}; fold-in {mean['fold_in_seconds']:.1f} s vs refit "
          f"{mean['refit_seconds']:.1f} s; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
