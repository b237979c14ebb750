"""spark-submit entry point for `recsys-spark interactions`: spark-submit ... jobs/interactions.py [args]."""

import sys

from recsys_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["interactions", *sys.argv[1:]]))
