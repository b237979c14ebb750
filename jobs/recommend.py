"""spark-submit entry point for `recsys-spark recommend`: spark-submit ... jobs/recommend.py [args]."""

import sys

from recsys_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["recommend", *sys.argv[1:]]))
