"""spark-submit entry point for `recsys-spark maintain`: spark-submit ... jobs/maintain.py [args]."""

import sys

from recsys_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["maintain", *sys.argv[1:]]))
