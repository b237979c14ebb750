"""spark-submit entry point for `recsys-spark generate`: spark-submit ... jobs/generate.py [args]."""

import sys

from recsys_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
