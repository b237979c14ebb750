"""Checks that the installed stack works together: Petastorm imports, Horovod has PyTorch + Gloo,
and Spark writes and reads a Delta table. ``python -m recsys_spark.doctor``; scripts/setup.sh runs it."""

from __future__ import annotations

import sys
import tempfile
import warnings


def main() -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    import horovod.torch as hvd
    import petastorm
    import torch

    from recsys_spark.session import get_spark

    print(f"torch {torch.__version__} (cuda available: {torch.cuda.is_available()})")
    print(f"petastorm {petastorm.__version__}")
    print(f"horovod gloo built: {hvd.gloo_built()}, nccl built: {hvd.nccl_built()}")
    spark = get_spark("recsys-spark-doctor")
    with tempfile.TemporaryDirectory() as tmp:
        spark.range(10).write.format("delta").save(f"{tmp}/t")
        n = spark.read.format("delta").load(f"{tmp}/t").count()
    print(f"spark {spark.version}: delta write/read ok ({n} rows)")
    spark.stop()
    return 0 if n == 10 else 1


if __name__ == "__main__":
    sys.exit(main())
