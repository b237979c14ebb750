"""spark-submit entry point for `recsys-spark ingest`: spark-submit ... jobs/ingest.py [args]."""

import sys

from recsys_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
