"""spark-submit entry point for `recsys-spark features`: spark-submit ... jobs/features.py [args]."""

import sys

from recsys_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["features", *sys.argv[1:]]))
