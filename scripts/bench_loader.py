"""Rows per second of the Spark -> PyTorch loaders (recsys_spark.train.loaders).

For an interactions-like frame (user int, item int, weight float) and a sequences-like frame (user int,
items array<int> of fixed length), materialised once through Petastorm, it times:

- ``petastorm_rows``: one pass through ``converter.make_torch_dataloader`` (Petastorm's per-row path);
- ``petastorm_batches``: one pass through ``loaders.load_shard`` (Petastorm's batch reader);
- ``pyarrow``: ``pyarrow.parquet.read_table`` of the same files (the ceiling for reading);
- ``in_memory``: one epoch of ``loaders.batches`` over the loaded shard, per batch size, with
  ``--threads`` torch threads (a rank's share of the cores: on a busy 2-core machine two threads make
  the 8,192-row gathers 20x slower than one).

Each figure is the best of two passes.

Figures are logged and written as JSON (``--out``, default .bench/loader.json) with the machine and commit.

    .venv/bin/python scripts/bench_loader.py --rows 2000000 --seq-rows 200000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

log = logging.getLogger("bench_loader")


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


REPEAT = 2


def timed(fn, repeat: int = 1):
    """The value of ``fn()`` and its best time over ``repeat`` calls (the machine may be shared)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - started)
    return value, best


def interactions_frame(spark, rows: int):
    from pyspark.sql import functions as F

    return spark.range(rows).select(
        (F.col("id") % 100_003).cast("int").alias("user_idx"),
        ((F.col("id") * 7919) % 50_021).cast("int").alias("item_idx"),
        F.rand(seed=1).cast("float").alias("weight"),
    )


def sequences_frame(spark, rows: int, length: int):
    from pyspark.sql import functions as F

    items = F.transform(F.sequence(F.lit(0), F.lit(length - 1)), lambda i: ((F.col("id") * 31 + i * 7) % 50_021))
    return spark.range(rows).select(
        F.col("id").cast("int").alias("user_idx"), items.cast("array<int>").alias("items")
    )


def serve_epoch(shard, batch_size: int, generator) -> int:
    """One epoch of the in-memory iterator; returns the rows served."""
    from recsys_spark.train import loaders

    served = 0
    for batch in loaders.batches(shard, batch_size, loaders.shard_rows(shard) // batch_size, generator):
        served += len(next(iter(batch.values())))
    return served


def bench_frame(spark, name: str, df, cache_dir: str, batch_sizes: list[int]) -> dict:
    import pyarrow.parquet as pq
    import torch

    from recsys_spark.train import loaders

    columns = df.columns
    converter, seconds = timed(lambda: loaders.materialize(spark, df, cache_dir, ranks=1))
    rows = len(converter)
    result = {"rows": rows, "columns": columns, "materialize_s": seconds, "rows_per_s": {}}
    log.info("%s: %d rows %s, materialised in %.1f s", name, rows, columns, seconds)
    try:
        files = [url.removeprefix("file://") for url in converter.file_urls]
        table, seconds = timed(lambda: pq.read_table(files, columns=columns), REPEAT)
        result["rows_per_s"]["pyarrow"] = table.num_rows / seconds

        shard, seconds = timed(lambda: loaders.load_shard(converter, 0, 1, columns), REPEAT)
        assert loaders.shard_rows(shard) == rows
        result["rows_per_s"]["petastorm_batches"] = rows / seconds

        for batch_size in batch_sizes:
            streamed, seconds = timed(
                lambda bs=batch_size: loaders.load_shard_torch_dataloader(converter, 0, 1, columns, batch_size=bs),
                REPEAT,
            )
            assert loaders.shard_rows(streamed) == rows
            result["rows_per_s"][f"petastorm_rows_batch{batch_size}"] = rows / seconds

        for batch_size in batch_sizes:
            generator = torch.Generator().manual_seed(0)
            served, seconds = timed(lambda bs=batch_size, g=generator: serve_epoch(shard, bs, g), REPEAT)
            result["rows_per_s"][f"in_memory_batch{batch_size}"] = served / seconds
    finally:
        loaders.delete(converter)
    for path, value in result["rows_per_s"].items():
        log.info("  %-28s %12.0f rows/s", path, value)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows of the (int, int, float) frame")
    parser.add_argument("--seq-rows", type=int, default=200_000, help="rows of the sequences frame")
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the in-memory iterator: cores // ranks, as a rank would use")
    parser.add_argument("--cache-dir", default=".bench/petastorm")
    parser.add_argument("--out", default=".bench/loader.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("bench_loader", "recsys_spark"):
        logging.getLogger(name).setLevel(logging.INFO)

    import pyarrow
    import torch

    from recsys_spark.session import get_spark

    spark = get_spark("bench-loader")
    torch.set_num_threads(args.threads)
    report = {
        "commit": git_commit(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_start": os.getloadavg()},
        "versions": {"torch": torch.__version__, "pyarrow": pyarrow.__version__, "spark": spark.version},
        "args": vars(args),
        "frames": {},
    }
    try:
        report["frames"]["interactions"] = bench_frame(
            spark, "interactions", interactions_frame(spark, args.rows), args.cache_dir, args.batch_sizes
        )
        report["frames"]["sequences"] = bench_frame(
            spark, "sequences", sequences_frame(spark, args.seq_rows, args.seq_len), args.cache_dir, args.batch_sizes
        )
    finally:
        shutil.rmtree(args.cache_dir, ignore_errors=True)
    report["machine"]["loadavg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
