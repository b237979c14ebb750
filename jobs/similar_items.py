"""spark-submit entry point for `recsys-spark similar-items`: spark-submit ... jobs/similar_items.py [args]."""

import sys

from recsys_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["similar-items", *sys.argv[1:]]))
