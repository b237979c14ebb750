"""spark-submit entry point for `recsys-spark evaluate`: spark-submit ... jobs/evaluate.py [args]."""

import sys

from recsys_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
