"""Spark -> PyTorch: materialise a DataFrame once with Petastorm, read one shard per rank into memory.

The driver calls :func:`materialize` (Parquet files under a cache dir, a few per rank) and ships the
converter, a small picklable object, to the ranks. Each rank streams its own shard once with
:func:`load_shard` into in-memory tensors and then serves every epoch from memory with :func:`batches`.
Petastorm's per-row path is far slower than a GPU consumes rows (docs/BENCHMARKS.md, "Petastorm loader":
scripts/bench_loader.py measures both paths).

Every rank must run the same number of steps or collectives hang, so ``steps`` is computed on the driver
(:func:`steps_per_epoch`) and :func:`batches` yields exactly that many batches whatever the shard size.

torch is imported inside the functions: the driver side (:func:`materialize`) is Spark code.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pyspark.sql import DataFrame, SparkSession

from recsys_spark.errors import RecsysError

if TYPE_CHECKING:
    import torch
    from petastorm.spark import SparkDatasetConverter

log = logging.getLogger(__name__)

# A rank's shard: column name -> tensor of shape (rows,) or, for fixed-length array columns, (rows, length).
ShardData = dict[str, "torch.Tensor"]

DEFAULT_FILES_PER_RANK = 4

# Petastorm also deletes its caches in an atexit hook, outside any ``quiet_petastorm`` block.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm(\.|$)")
# A column named ``fields`` (the feature models' input) clashes with a Unischema property: Petastorm says so on
# every read, on every rank, and reads the column all the same.
warnings.filterwarnings("ignore", message="Can not create dynamic property", category=UserWarning)
# Its converter logs a WARNING for every small Parquet file and for the float64 -> float32 cast; both are
# expected here (shards are small by design, weights are float32).
logging.getLogger("petastorm.spark.spark_dataset_converter").setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet_petastorm() -> Iterator[None]:
    """Petastorm 0.12 on pyarrow 12 emits FutureWarnings on every read; they say nothing actionable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def cache_dir_url(cache_dir: str) -> str:
    """A URL for Petastorm: paths become ``file://`` URLs, URLs (hdfs://, s3://, file://) are kept."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", cache_dir):
        return cache_dir
    return Path(cache_dir).absolute().as_uri()


def materialize(
    spark: SparkSession, df: DataFrame, cache_dir: str, ranks: int, files_per_rank: int = DEFAULT_FILES_PER_RANK
) -> SparkDatasetConverter:
    """Write ``df`` once as Parquet under ``cache_dir`` and return Petastorm's converter for it.

    Petastorm shards by row group, so the frame is repartitioned to ``ranks * files_per_rank`` files: every
    rank gets whole files and shard sizes stay close. ``cache_dir`` must be readable by every rank (a local
    path on one machine, shared storage on a cluster). Call ``converter.delete()`` when training ends.
    """
    if ranks < 1 or files_per_rank < 1:
        raise RecsysError(f"ranks and files_per_rank must be >= 1, got {ranks} and {files_per_rank}")
    with quiet_petastorm():
        from petastorm.spark import SparkDatasetConverter, make_spark_converter

        spark.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF, cache_dir_url(cache_dir))
        converter = make_spark_converter(df.repartition(ranks * files_per_rank))
    log.info("petastorm: %d rows materialised at %s", len(converter), converter.cache_dir_url)
    return converter


def delete(converter: SparkDatasetConverter) -> None:
    """Remove the converter's Parquet cache (and Petastorm's record of it)."""
    with quiet_petastorm():
        converter.delete()


def rank_batch_size(batch_size: int, ranks: int) -> int:
    """Rows per step on each rank when ``batch_size`` is the global batch: ``batch_size // ranks``, at least 1."""
    return max(1, batch_size // ranks)


def steps_per_epoch(total_rows: int, batch_size: int, ranks: int) -> int:
    """The number of optimizer steps every rank runs per epoch, ``batch_size`` being the global batch
    (``total_rows // batch_size``, with the batch rounded down to a multiple of ``ranks``), at least 1."""
    if total_rows <= 0:
        raise RecsysError("the training DataFrame is empty")
    return max(1, total_rows // (rank_batch_size(batch_size, ranks) * ranks))


def load_shard(converter: SparkDatasetConverter, rank: int, size: int, columns: list[str]) -> ShardData:
    """Read shard ``rank`` of ``size`` once into CPU tensors, one per column.

    Uses Petastorm's batch reader (whole row groups as numpy columns): several times faster than the
    per-row ``make_torch_dataloader`` path (scripts/bench_loader.py). The result is the same on every
    call, so a run resumed from a checkpoint (or repeated) trains on the same batches: the files are
    taken in name order (the converter lists them in directory order) and read by one worker (with two,
    row groups arrive in whichever order the threads finish them; seen changing from read to read).
    Fixed-length array columns arrive as 2-D tensors.
    """
    import numpy as np
    import torch

    if not 0 <= rank < size:
        raise RecsysError(f"rank {rank} is outside 0..{size - 1}")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in columns}
    with quiet_petastorm():
        from petastorm import make_batch_reader

        reader = make_batch_reader(
            sorted(converter.file_urls),
            schema_fields=[re.escape(name) for name in columns],
            cur_shard=rank,
            shard_count=size,
            num_epochs=1,
            shuffle_row_groups=False,
            workers_count=1,
        )
        with reader:
            for group in reader:
                for name in columns:
                    parts[name].append(getattr(group, name))
    shard = {}
    for name, chunks in parts.items():
        if not chunks:
            raise RecsysError(
                f"rank {rank} of {size} got no rows; materialise with more files per rank than ranks"
            )
        shard[name] = torch.from_numpy(np.ascontiguousarray(np.concatenate(chunks)))
    return shard


def load_shard_torch_dataloader(
    converter: SparkDatasetConverter, rank: int, size: int, columns: list[str], batch_size: int = 8192
) -> ShardData:
    """The same shard through ``converter.make_torch_dataloader`` (Petastorm's per-row path).

    Kept for comparison in scripts/bench_loader.py; :func:`load_shard` is the one to use.
    """
    import torch

    parts: dict[str, list[torch.Tensor]] = {name: [] for name in columns}
    with quiet_petastorm():
        loader_cm = converter.make_torch_dataloader(
            batch_size=batch_size,
            num_epochs=1,
            cur_shard=rank,
            shard_count=size,
            schema_fields=[re.escape(name) for name in columns],
            shuffle_row_groups=False,
            workers_count=2,
        )
        with loader_cm as loader:
            for batch in loader:
                for name in columns:
                    parts[name].append(batch[name])
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def shard_rows(shard: ShardData) -> int:
    """Rows in a shard (all columns have the same first dimension)."""
    sizes = {len(tensor) for tensor in shard.values()}
    if len(sizes) != 1:
        raise RecsysError(f"shard columns have different lengths: {sorted(sizes)}")
    return sizes.pop()


def shard_to(shard: ShardData, device: torch.device | str) -> ShardData:
    """The shard on ``device``: moved once, so later epochs read from (GPU) memory."""
    return {name: tensor.to(device) for name, tensor in shard.items()}


def batches(
    shard: ShardData, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield exactly ``steps`` batches of ``batch_size`` rows, shuffled with ``generator``.

    A fresh permutation starts each call (one call per epoch); when the shard holds fewer than
    ``steps * batch_size`` rows, further permutations are appended, so every rank yields the same number
    of batches even when its shard is a little smaller than the others.
    """
    import torch

    n = shard_rows(shard)
    if n == 0:
        raise RecsysError("cannot draw batches from an empty shard")
    needed = steps * batch_size
    perms = [torch.randperm(n, generator=generator, device=generator.device)]
    while len(perms) * n < needed:
        perms.append(torch.randperm(n, generator=generator, device=generator.device))
    order = torch.cat(perms)[:needed]
    device = next(iter(shard.values())).device
    order = order.to(device)
    for step in range(steps):
        index = order[step * batch_size:(step + 1) * batch_size]
        yield {name: tensor[index] for name, tensor in shard.items()}
