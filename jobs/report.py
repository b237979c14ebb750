"""spark-submit entry point for `recsys-spark report`: spark-submit ... jobs/report.py [args]."""

import sys

from recsys_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
