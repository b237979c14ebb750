"""Stable id <-> index tables: new ids are appended after the largest index; existing ones never move.

Models and embeddings use dense indices; a model trained yesterday still maps to the same ids today.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_spark import tables as tb


def update_index(spark: SparkSession, ids: DataFrame, warehouse: str, table: str, id_col: str,
                 idx_col: str) -> DataFrame:
    """Append the ids of ``ids[id_col]`` that ``table`` lacks, numbered in id order; return the index."""
    wanted = ids.select(id_col).distinct()
    if tb.exists(spark, warehouse, table):
        current = tb.read(spark, warehouse, table)
        offset = current.agg(F.max(idx_col)).first()[0]
        offset = -1 if offset is None else offset
        new = wanted.join(current.select(id_col), id_col, "left_anti")
    else:
        offset = -1
        new = wanted
    numbered = new.orderBy(id_col).rdd.map(lambda r: r[0]).zipWithIndex()
    schema = T.StructType([T.StructField(id_col, T.StringType(), False),
                           T.StructField(idx_col, T.IntegerType(), False)])
    rows = numbered.map(lambda pair: (pair[0], int(pair[1] + offset + 1)))
    tb.insert_new(spark.createDataFrame(rows, schema), warehouse, table, key=id_col)
    return tb.read(spark, warehouse, table)


def id_order(index: DataFrame, id_col: str, idx_col: str, order_col: str) -> DataFrame:
    """(idx_col, order_col): each id's place in id order, integer ids by numeric value first (so "9"
    before "10", "007" beside "7"), then the other ids as strings. Recomputed from the whole index, so
    two ids keep their relative order however the index grows."""
    numbered = (index.select(idx_col, id_col)
                .orderBy(F.col(id_col).cast("long").asc_nulls_last(), F.col(id_col))
                .rdd.map(lambda r: r[0]).zipWithIndex())
    schema = T.StructType([T.StructField(idx_col, T.IntegerType(), False),
                           T.StructField(order_col, T.IntegerType(), False)])
    return index.sparkSession.createDataFrame(numbered.map(lambda pair: (int(pair[0]), int(pair[1]))), schema)
