"""One SparkSession factory: Delta configured, local defaults, and spark-submit's settings kept.

Under ``spark-submit`` the JVM already exists with the user's configuration; only settings it left
unset are filled in. Run from plain Python it starts ``local[*]`` with small-machine defaults.
"""

from __future__ import annotations

import glob
import logging
import os
import sys

from pyspark import SparkConf
from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

DELTA_VERSION = "3.3.2"
DELTA_PACKAGES = f"io.delta:delta-spark_2.12:{DELTA_VERSION},io.delta:delta-storage:{DELTA_VERSION}"
LOG4J = "file://" + os.path.join(os.path.dirname(os.path.abspath(__file__)), "log4j2.properties")
DEFAULT_JARS_DIR = os.path.expanduser(f"~/.cache/recsys-spark/jars/delta-{DELTA_VERSION}")
CLASS_ARCHIVE_ENV = "RECSYS_SPARK_CLASS_ARCHIVE"
# JVM unified-logging tags of class-data sharing: off, so that an archive the JVM cannot use (another JDK,
# another class path) is skipped without a warning on the job's standard output.
_QUIET_CDS = "-Xlog:cds=off,cds+dynamic=off"


def delta_jars(jars_dir: str | None = None) -> list[str]:
    """The locally cached Delta jars (scripts/setup.sh fetches them), or [] when there are none."""
    folder = jars_dir or os.environ.get("RECSYS_SPARK_JARS") or DEFAULT_JARS_DIR
    return sorted(glob.glob(os.path.join(folder, "delta-*.jar")))


def class_archive() -> str:
    """Where the driver JVM's class-data archive (JDK class-data sharing) is: ``$RECSYS_SPARK_CLASS_ARCHIVE``,
    else inside this venv, where scripts/setup.sh builds it once (scripts/build_class_archive.py).

    Why: a fresh driver JVM loads and verifies tens of thousands of Spark, Delta and Scala classes; mapped
    from the archive instead, a small local pipeline run took 62.9 s instead of 72.8 s (mean of 3 each, 2
    cores). A spark-submit driver uses it too when given ``driver_java_options()`` in
    ``spark.driver.extraJavaOptions`` (same venv, same class path)."""
    return os.environ.get(CLASS_ARCHIVE_ENV, os.path.join(sys.prefix, "share", "recsys-spark", "classes.jsa"))


def driver_java_options(archive_at_exit: str | None = None) -> str:
    """The local driver's JVM options: Derby's home and our log4j settings, and the class-data archive
    when there is one (``archive_at_exit``: write one there when the JVM exits, what setup does)."""
    options = ["-Dderby.system.home=/tmp/derby", f"-Dlog4j.configurationFile={LOG4J}"]
    if archive_at_exit:
        options.append(f"-XX:ArchiveClassesAtExit={archive_at_exit}")
    elif os.path.isfile(class_archive()):
        options += [f"-XX:SharedArchiveFile={class_archive()}", _QUIET_CDS]
    return " ".join(options)


def defaults(local: bool) -> dict[str, str]:
    """The settings ``get_spark`` gives a session where nothing else set them (``local``: no spark-submit and
    no master given, so also the embedded master, memory and partition counts)."""
    cores = os.cpu_count() or 2
    conf = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.legacy.timeParserPolicy": "CORRECTED",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
        "spark.sql.adaptive.enabled": "true",
    }
    if local:
        # Under spark-submit the jars come from --packages/--jars: the JVM is already up.
        jars = delta_jars()
        if jars:
            conf["spark.jars"] = ",".join(jars)
        else:
            conf["spark.jars.packages"] = DELTA_PACKAGES
        conf.update(
            {
                "spark.master": f"local[{cores}]",
                # 200 shuffle partitions on a laptop is mostly scheduling overhead.
                "spark.sql.shuffle.partitions": str(max(4, 2 * cores)),
                "spark.default.parallelism": str(max(2, cores)),
                # Delta replays a table's log in this many tasks on every read and write (default 50);
                # on 2 cores, 12 small merges and reads took 44 s with 50 and 22 s with 4.
                "spark.databricks.delta.snapshotPartitions": str(max(4, 2 * cores)),
                "spark.driver.memory": os.environ.get("RECSYS_SPARK_DRIVER_MEMORY", "6g"),
                "spark.ui.enabled": "false",
                "spark.ui.showConsoleProgress": "false",
                "spark.sql.warehouse.dir": os.path.abspath("spark-warehouse"),
                "spark.driver.extraJavaOptions": driver_java_options(),
            }
        )
    return conf


def under_spark_submit() -> bool:
    """True when a JVM launched by spark-submit (or another driver) is already waiting for us."""
    return "PYSPARK_GATEWAY_PORT" in os.environ or SparkSession.getActiveSession() is not None


def get_spark(app_name: str = "recsys-spark", extra_conf: dict[str, str] | None = None) -> SparkSession:
    """Return the SparkSession, creating it with Delta and local defaults where nothing is set.

    Settings already present (from ``spark-submit --conf``, ``spark-defaults.conf`` or a running
    session) always win over our defaults; ``extra_conf`` wins over both.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    existing = SparkConf()  # reads spark.* already given to this JVM or process
    local = not under_spark_submit() and not existing.contains("spark.master")
    if local:
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # no interface guessing on a laptop
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers use this venv, not PATH's python
    builder = SparkSession.builder.appName(app_name)
    for key, value in defaults(local).items():
        if not existing.contains(key):
            builder = builder.config(key, value)
    for key, value in (extra_conf or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("RECSYS_SPARK_LOG_LEVEL", "ERROR"))
    log.info("spark %s master=%s", spark.version, spark.sparkContext.master)
    return spark
