"""spark-submit entry point for `recsys-spark probe`: spark-submit ... jobs/probe.py [args]."""

import sys

from recsys_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["probe", *sys.argv[1:]]))
