"""Recommenders: the interface (``base``), what the torch models share (``torch_base``), the one list of
models (``registry``) and one module per model. Their torch networks live in ``recsys_spark.nn``."""
