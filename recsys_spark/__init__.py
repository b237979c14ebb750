"""recsys-spark: a batch recommender pipeline on Apache Spark with Delta Lake tables."""

__version__ = "0.1.0"
