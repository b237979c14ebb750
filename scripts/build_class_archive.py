"""Build the driver JVM's class-data archive (``recsys_spark.session.class_archive``); scripts/setup.sh
runs it once per venv and JDK.

The archive holds the classes a driver JVM loaded while it ran a small pipeline (ingest, interactions,
popularity and ALS, evaluation), written by the JVM as it exits
(``-XX:ArchiveClassesAtExit``); later JVMs map them instead of loading and verifying each.

    python scripts/build_class_archive.py OUT.jsa
"""

from __future__ import annotations

import os
import sys
import tempfile

from pyspark import SparkContext

from recsys_spark import pipeline
from recsys_spark.config import load_config
from recsys_spark.session import driver_java_options, get_spark


def main(out: str) -> None:
    partial = f"{out}.{os.getpid()}.tmp"
    spark = get_spark("class-archive", extra_conf={
        "spark.driver.extraJavaOptions": driver_java_options(archive_at_exit=partial)})
    with tempfile.TemporaryDirectory(prefix="recsys-class-archive-") as warehouse:
        config = load_config(overrides=[
            f"warehouse={warehouse}", "generate.events=3000", "models=[popularity,als]",
            "model_params.als.rank=8", "model_params.als.max_iter=2", "tracking.enabled=false"])
        pipeline.run_pipeline(spark, config, None, "canonical", echo=lambda _: None)
    spark.stop()
    # The JVM writes the archive as it exits: end it (its gateway exits when its stdin closes) and wait.
    gateway = SparkContext._gateway
    gateway.shutdown()
    gateway.proc.stdin.close()
    gateway.proc.wait(timeout=600)
    if not os.path.isfile(partial):
        raise SystemExit(f"the JVM wrote no class archive at {partial}")
    os.replace(partial, out)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1])
