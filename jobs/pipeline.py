"""spark-submit entry point for `recsys-spark pipeline`: spark-submit ... jobs/pipeline.py [args]."""

import sys

from recsys_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
