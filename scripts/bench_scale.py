"""ALS and top-N at the scale users run: ours against MLlib's own top-N and ``implicit``, at three sizes.

For each size a fresh process (one local SparkSession, started before any clock) generates a synthetic
implicit-feedback table with power-law items and users (``interactions``), writes it to Parquet, and
times on exactly that table:

- **ALS fit**: this project's ``als`` (MLlib, ``defaultParallelism`` blocks) and ``als_cg`` (the same
  model solved by conjugate gradients on the executors, with implicit's kernel) against ``implicit``'s
  CPU ALS with the same factors, iterations, regularisation and threads (its default conjugate-gradient
  solver, and ``use_cg=False``: the exact Cholesky solve that MLlib does, i.e. the same algorithm);
- **top-N for all users with the seen filter**: ours (``recsys_spark.scoring.top_k_from_factors``),
  MLlib's ``recommendForAllUsers`` (no seen filter, so k + the most seen items are asked for; tuned:
  each ``blockSize`` of ``--mllib-block-sizes``, the best is quoted) and ``implicit``'s in-process
  ``recommend(filter_already_liked_items=True)`` over its own factors (the practical limit here).

Every Spark result is materialised with the ``noop`` sink (the whole plan runs, nothing is collected).
Our fit is timed once (a minute and more at the larger sizes); implicit's fits and each top-N are run
twice and the second run is quoted (the first, which also
starts Python workers and compiles the plan, is kept as ``first_seconds``), so that no method gains
from running after another.
Peak resident memory is sampled every 0.1 s per step, separately for the JVM (driver and executor in
local mode), Spark's Python workers and the benchmark's own Python process (which holds implicit).

    .venv/bin/python scripts/bench_scale.py --sizes s m l --out .bench/scale.json

writes the JSON after every size and, with ``--plot``, a PNG of time against size for each step.
"""

from __future__ import annotations

import os

# One BLAS thread per Spark task and for implicit (it asks for that too), set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402

SIZES = {  # name: (users, items, interactions drawn; duplicates of a (user, item) pair are merged)
    "xs": (1_000, 500, 20_000),
    "s": (5_000, 2_000, 200_000),
    "m": (50_000, 10_000, 2_500_000),
    "l": (200_000, 20_000, 10_000_000),
}


# MLlib asked for k + the most seen items returns that many rows for every user: at 50k users x 279 items
# it peaked at 6.6 GiB in the JVM; past this many rows the step is skipped (and says so in the JSON).
MAX_K_PLUS_SEEN_ROWS = 50_000_000


class PeakMemory:
    """Samples the peak resident set of this process, its JVM child and the JVM's Python workers."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.me = interval, psutil.Process()
        self.peaks = {"jvm": 0, "python_workers": 0, "bench_python": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        sizes = {"jvm": 0, "python_workers": 0, "bench_python": self.me.memory_info().rss}
        for child in self.me.children(recursive=True):
            try:
                name = "jvm" if child.name() == "java" else "python_workers"
                sizes[name] += child.memory_info().rss
            except psutil.Error:
                pass
        for key, value in sizes.items():
            self.peaks[key] = max(self.peaks[key], value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def gib(self) -> dict[str, float]:
        return {f"peak_{k}_gib": round(v / 2**30, 3) for k, v in self.peaks.items()}


def timed_step(results: dict, name: str, fn, warm: bool = False):
    """Runs ``fn``, recording its wall time and peak memory under ``results[name]``. ``warm``: run it
    twice and time the second run (``first_seconds`` keeps the first, which pays for starting Python
    workers and compiling the plan), so that no method gains from running after another."""
    first = None
    if warm:
        start = time.perf_counter()
        fn()
        first = round(time.perf_counter() - start, 3)
    with PeakMemory() as memory:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    results[name] = {"seconds": round(seconds, 3), **({"first_seconds": first} if warm else {}), **memory.gib()}
    cold = f" (first run {first:.2f} s)" if warm else ""
    print(f"  {name:42} {seconds:8.2f} s{cold}   JVM {memory.gib()['peak_jvm_gib']:.2f} GiB", flush=True)
    return out


def generate(spark, n_users: int, n_items: int, n_rows: int, seed: int, path: str) -> int:
    """(user_idx, item_idx, weight) with power-law users and items, written to ``path``; returns its rows.

    Item i is drawn with probability proportional to (i + 10)^-1 and user u to (u + 10)^-0.5; a pair drawn
    more than once becomes one row whose weight is the number of draws (like the pipeline's event
    counts). Generated on the executors, one numpy stream per partition.
    """
    import numpy as np
    import pandas as pd
    from pyspark.sql import functions as F

    parts = max(2, n_rows // 250_000)

    def draw(batches):
        item_p = 1.0 / (np.arange(n_items) + 10.0)
        user_p = 1.0 / np.sqrt(np.arange(n_users) + 10.0)
        item_p, user_p = item_p / item_p.sum(), user_p / user_p.sum()
        for batch in batches:
            for part in batch["id"]:
                rng = np.random.default_rng([seed, int(part)])
                n = n_rows // parts + (1 if part < n_rows % parts else 0)
                # Shuffled ids, so that popularity is not the id order.
                users = rng.permutation(n_users)[rng.choice(n_users, n, p=user_p)]
                items = rng.permutation(n_items)[rng.choice(n_items, n, p=item_p)]
                yield pd.DataFrame({"user_idx": users.astype(np.int32), "item_idx": items.astype(np.int32)})

    drawn = spark.range(parts, numPartitions=parts).mapInPandas(draw, "user_idx int, item_idx int")
    table = drawn.groupBy("user_idx", "item_idx").agg(F.count(F.lit(1)).cast("float").alias("weight"))
    table.repartition(parts).write.mode("overwrite").parquet(path)
    return spark.read.parquet(path).count()


STEP = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import bench_scale
print("RESULT " + json.dumps(bench_scale.run_size(*json.loads(sys.argv[2]))))
"""


def run_size(name: str, rank: int, iterations: int, k: int, threads: int, block_sizes: list[int],
             root: str, seed: int) -> dict:
    """Every step of one size, in this (fresh) process."""
    import numpy as np
    from pyspark.sql import functions as F

    from recsys_spark.models.als import ALSCGParams, ALSCGRecommender, ALSParams, ALSRecommender
    from recsys_spark.session import get_spark

    n_users, n_items, n_drawn = SIZES[name]
    spark = get_spark("bench-scale")
    steps: dict = {}
    print(f"size {name}: {n_users:,} users x {n_items:,} items, {n_drawn:,} interactions drawn", flush=True)
    path = os.path.join(root, "interactions.parquet")
    rows = timed_step(steps, "generate", lambda: generate(spark, n_users, n_items, n_drawn, seed, path))
    train = spark.read.parquet(path)

    def materialise(df) -> None:
        df.write.format("noop").mode("overwrite").save()

    params = ALSParams(rank=rank, max_iter=iterations, reg_param=0.05, alpha=1.0, seed=seed)
    model = timed_step(steps, "ours_als_fit", lambda: ALSRecommender(params).fit(train))
    # reg_param 0.05 is implicit's lambda here (als_cg does not scale it by the row's interactions).
    cg_params = ALSCGParams(rank=rank, max_iter=iterations, reg_param=0.05, alpha=1.0, seed=seed)
    timed_step(steps, "ours_als_cg_fit", lambda: ALSCGRecommender(cg_params).fit(train).learnt_user_factors())
    users = model.known_users()
    timed_step(steps, "ours_topn_seen_filtered", lambda: materialise(model.recommend(users, k, seen=train)), warm=True)
    # MLlib cannot filter seen items: asking for k + the largest number of seen items a user has is the
    # list a user would need to filter it afterwards; k alone is its bare cost. Both are timed.
    most_seen = train.groupBy("user_idx").count().agg(F.max("count")).first()[0]
    for size in block_sizes:
        model.model.setBlockSize(size)
        timed_step(steps, f"mllib_recommend_for_all_users_b{size}",
                   lambda: materialise(model.model.recommendForAllUsers(k)), warm=True)
    best = min(block_sizes, key=lambda s: steps[f"mllib_recommend_for_all_users_b{s}"]["seconds"])
    model.model.setBlockSize(best)
    asked = n_users * (k + most_seen)
    if asked <= MAX_K_PLUS_SEEN_ROWS:
        timed_step(steps, "mllib_recommend_for_all_users_k_plus_seen",
                   lambda: materialise(model.model.recommendForAllUsers(k + most_seen)), warm=True)
    else:
        steps["mllib_recommend_for_all_users_k_plus_seen"] = {
            "skipped": f"{n_users:,} users x {k + most_seen:,} items = {asked:,} rows, over {MAX_K_PLUS_SEEN_ROWS:,}"}
        print(f"  {'mllib_recommend_for_all_users_k_plus_seen':42} skipped: {asked:,} rows", flush=True)

    # implicit, in this process, on the same table.
    from implicit.cpu.als import AlternatingLeastSquares
    from scipy.sparse import csr_matrix
    from threadpoolctl import threadpool_limits

    pdf = train.toPandas()
    user_items = csr_matrix((1.0 + pdf["weight"].to_numpy(np.float32),  # c = 1 + alpha * w with alpha = 1
                             (pdf["user_idx"].to_numpy(), pdf["item_idx"].to_numpy())),
                            shape=(n_users, n_items), dtype=np.float32)
    del pdf
    active = np.unique(user_items.nonzero()[0])
    with threadpool_limits(1, "blas"):
        for solver, use_cg in (("cg", True), ("cholesky", False)):
            peer = AlternatingLeastSquares(factors=rank, regularization=0.05, alpha=1.0, iterations=iterations,
                                           random_state=seed, num_threads=threads, use_cg=use_cg)
            timed_step(steps, f"implicit_als_fit_{solver}", lambda peer=peer: peer.fit(user_items, show_progress=False),
                       warm=True)
        timed_step(steps, "implicit_topn_seen_filtered", lambda: peer.recommend(
            active, user_items[active], N=k, filter_already_liked_items=True), warm=True)
    spark.stop()
    seconds = {key: value["seconds"] for key, value in steps.items() if "seconds" in value}
    mllib_best = seconds[f"mllib_recommend_for_all_users_b{best}"]
    return {
        "size": name, "users": n_users, "items": n_items, "interactions": rows, "rank": rank,
        "iterations": iterations, "k": k, "threads": threads, "most_seen_per_user": most_seen,
        "mllib_best_block_size": best, "steps": steps,
        "ratios": {
            "als_fit_ours_over_implicit_cg": seconds["ours_als_fit"] / seconds["implicit_als_fit_cg"],
            "als_fit_ours_over_implicit_cholesky": seconds["ours_als_fit"] / seconds["implicit_als_fit_cholesky"],
            "als_cg_fit_ours_over_implicit_cg": seconds["ours_als_cg_fit"] / seconds["implicit_als_fit_cg"],
            "topn_mllib_best_over_ours": mllib_best / seconds["ours_topn_seen_filtered"],
            "topn_ours_over_implicit": seconds["ours_topn_seen_filtered"] / seconds["implicit_topn_seen_filtered"],
        },
    }


def machine() -> dict:
    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "driver_memory": os.environ.get("RECSYS_SPARK_DRIVER_MEMORY", "6g (default)")}


MLLIB_BEST = "mllib_recommend_for_all_users (k, best blockSize)"


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def seconds(result: dict, key: str) -> float | None:
        if key == MLLIB_BEST:
            key = f"mllib_recommend_for_all_users_b{result['mllib_best_block_size']}"
        return result["steps"].get(key, {}).get("seconds")  # None: skipped at that size

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, title, keys in (
        (axes[0], "ALS fit", ["ours_als_fit", "ours_als_cg_fit", "implicit_als_fit_cg", "implicit_als_fit_cholesky"]),
        (axes[1], "top-N, all users", ["ours_topn_seen_filtered", MLLIB_BEST,
                                       "mllib_recommend_for_all_users_k_plus_seen", "implicit_topn_seen_filtered"]),
    ):
        for key in keys:
            points = [(r["interactions"], seconds(r, key)) for r in results]
            points = [(x, y) for x, y in points if y is not None]
            ax.plot(*zip(*points, strict=True), marker="o", label=key)
        ax.set(xscale="log", yscale="log", xlabel="interactions", ylabel="seconds", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["s", "m", "l"], choices=list(SIZES))
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="implicit's threads")
    parser.add_argument("--mllib-block-sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=".bench/scale.json")
    parser.add_argument("--plot", default=None, help="PNG of time against size")
    args = parser.parse_args()
    results = []
    for name in args.sizes:
        root = tempfile.mkdtemp(prefix=f"bench-scale-{name}-")
        try:
            argv = [name, args.rank, args.iterations, args.k, args.threads, args.mllib_block_sizes, root, args.seed]
            proc = subprocess.run([sys.executable, "-c", STEP, str(Path(__file__).parent), json.dumps(argv)],
                                  stdout=subprocess.PIPE, text=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print("\n".join(line for line in proc.stdout.splitlines() if not line.startswith("RESULT ")), flush=True)
        if proc.returncode:
            raise SystemExit(f"size {name} failed (exit {proc.returncode})")
        results.append(json.loads(next(x[7:] for x in proc.stdout.splitlines() if x.startswith("RESULT "))))
        print(f"  ratios: {json.dumps({k: round(v, 2) for k, v in results[-1]['ratios'].items()})}", flush=True)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:  # after every size, so a long run keeps what it measured
            json.dump({"machine": machine(), "load_average": os.getloadavg(), "results": results}, fh, indent=2)
    if args.plot and results:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
