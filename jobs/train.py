"""spark-submit entry point for `recsys-spark train`: spark-submit ... jobs/train.py [args]."""

import sys

from recsys_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
