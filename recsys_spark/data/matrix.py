"""The user x item matrix of the train rows, for the models that weight, factorise or invert it.

Two forms, both built on the executors:

- **weightings** (``bm25_weight``, ``tfidf_weight``): ``DataFrame -> DataFrame`` transforms of
  (user_idx, item_idx, weight) rows, items as documents and users as terms, as ``implicit`` weights its
  item-user matrix;
- **user rows** (``user_rows``): one row per user with the *positions* of their items in the sorted
  catalogue ``item_ids`` and their values, and ``sparse_blocks`` turning each partition of those into
  one ``scipy.sparse`` CSR block ``X_p`` (users of the partition x items). ``gram`` sums ``X_p^T X_p``
  over the blocks with a tree reduction, so the full matrix ``X`` never reaches the driver, only the
  (items x items) product.

Preconditions: ``item_idx`` values are the dense index of ``silver/item_index``; ``item_ids`` is sorted
ascending and holds every item of the rows it is used with.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pyspark import RDD
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_spark import tables as tb

log = logging.getLogger(__name__)

POSITIONS = "_positions"  # array<int>: positions of the user's items in item_ids, ascending
VALUES = "_values"  # array<double>: the matrix entries at those positions

_POS = "_pos"
_IDF = "_idf"
_LENGTH = "_length"


def bm25_weight(interactions: DataFrame, k1: float, b: float) -> DataFrame:
    """(user_idx, item_idx, weight) with ``weight`` BM25-weighted, items as documents and users as terms.

    The same as ``implicit``'s ``bm25_weight`` applied to the item-user matrix:
    ``w * (k1 + 1) / (k1 * length_norm(item) + w) * idf(user)`` with ``idf(user) = log(N) - log1p(items
    of user)``, ``N`` the number of items in ``interactions``, and ``length_norm(item) = 1 - b + b *
    item weight sum / mean item weight sum``: frequent users and long item columns count less.
    """
    n_items = interactions.select(tb.ITEM_IDX).distinct().count()
    idf = interactions.groupBy(tb.USER_IDX).agg(
        (F.log(F.lit(float(max(n_items, 1)))) - F.log1p(F.count(F.lit(1)))).alias(_IDF)
    )
    lengths = interactions.groupBy(tb.ITEM_IDX).agg(F.sum(tb.WEIGHT).alias(_LENGTH))
    mean_length = lengths.agg(F.avg(_LENGTH)).first()[0] or 1.0
    length_norm = (1.0 - b) + b * F.col(_LENGTH) / F.lit(mean_length)
    weight = F.col(tb.WEIGHT)
    weighted = weight * (k1 + 1.0) / (k1 * length_norm + weight) * F.col(_IDF)
    return (
        interactions.join(idf, tb.USER_IDX)
        .join(lengths, tb.ITEM_IDX)
        .select(tb.USER_IDX, tb.ITEM_IDX, weighted.alias(tb.WEIGHT))
    )


def tfidf_weight(interactions: DataFrame) -> DataFrame:
    """(user_idx, item_idx, weight) with ``weight`` TF-IDF-weighted, items as documents and users as terms.

    The same as ``implicit``'s ``tfidf_weight`` on the item-user matrix: ``sqrt(w) * idf(user)``, with
    ``idf(user) = log(N) - log1p(items of user)`` as in ``bm25_weight`` (``N`` the number of items).
    """
    n_items = interactions.select(tb.ITEM_IDX).distinct().count()
    idf = interactions.groupBy(tb.USER_IDX).agg(
        (F.log(F.lit(float(max(n_items, 1)))) - F.log1p(F.count(F.lit(1)))).alias(_IDF)
    )
    return interactions.join(idf, tb.USER_IDX).select(
        tb.USER_IDX, tb.ITEM_IDX, (F.sqrt(F.col(tb.WEIGHT)) * F.col(_IDF)).alias(tb.WEIGHT)
    )


def catalogue(rows: DataFrame) -> np.ndarray:
    """The sorted distinct ``item_idx`` of ``rows`` (int32), collected to the driver: one id per item."""
    ids = np.array(sorted(r[0] for r in rows.select(tb.ITEM_IDX).distinct().collect()), dtype=np.int32)
    log.info("collected the catalogue of %d train items to the driver", ids.size)
    return ids


def user_rows(rows: DataFrame, item_ids: np.ndarray) -> DataFrame:
    """(user_idx, _positions array<int>, _values array<double>): each user's row of the matrix, its items
    as positions in ``item_ids`` (ascending) and ``weight`` as values; items outside ``item_ids`` dropped."""
    spark = rows.sparkSession
    index = spark.createDataFrame(pd.DataFrame({tb.ITEM_IDX: item_ids.astype(np.int32),
                                                _POS: np.arange(item_ids.size, dtype=np.int32)}))
    entries = F.sort_array(F.collect_list(F.struct(F.col(_POS), F.col(tb.WEIGHT).cast("double").alias(VALUES))))
    grouped = (rows.select(F.col(tb.USER_IDX).cast("int"), F.col(tb.ITEM_IDX).cast("int"), tb.WEIGHT)
               .join(F.broadcast(index), tb.ITEM_IDX)
               .groupBy(tb.USER_IDX).agg(entries.alias("_entries")))
    return grouped.select(tb.USER_IDX, F.col("_entries")[_POS].alias(POSITIONS),
                          F.col("_entries")[VALUES].alias(VALUES))


USER_ROWS_SCHEMA = T.StructType([
    T.StructField(tb.USER_IDX, T.IntegerType()),
    T.StructField(POSITIONS, T.ArrayType(T.IntegerType())),
    T.StructField(VALUES, T.ArrayType(T.DoubleType())),
])


def csr_block(positions: Iterable, values: Iterable, n_items: int, dtype=np.float64) -> sp.csr_matrix:
    """The CSR matrix (one row per entry of ``positions``, ``n_items`` columns) of users' rows."""
    positions = [np.asarray(p, dtype=np.int32) for p in positions]
    values = [np.asarray(v, dtype=dtype) for v in values]
    indptr = np.zeros(len(positions) + 1, dtype=np.int64)
    np.cumsum([p.size for p in positions], out=indptr[1:])
    indices = np.concatenate(positions) if positions else np.zeros(0, np.int32)
    data = np.concatenate(values) if values else np.zeros(0, dtype)
    return sp.csr_matrix((data, indices, indptr), shape=(len(positions), n_items))


def part_block(part: pd.DataFrame, n_items: int, dtype=np.float32) -> sp.csr_matrix:
    """``csr_block`` of a pandas block of ``user_rows`` (scoring on the executors)."""
    return csr_block(part[POSITIONS].to_numpy(), part[VALUES].to_numpy(), n_items, dtype)


def sparse_blocks(users: DataFrame, n_items: int) -> RDD:
    """An RDD of one CSR block ``X_p`` (float64, users of partition p x ``n_items``) per partition of
    ``users`` (``user_rows``). Persist it when it is used more than once."""

    def block(rows: Iterator) -> Iterator[sp.csr_matrix]:
        rows = list(rows)
        yield csr_block([r[POSITIONS] for r in rows], [r[VALUES] for r in rows], n_items)

    return users.select(POSITIONS, VALUES).rdd.mapPartitions(block)


def gram(blocks: RDD, n_items: int, depth: int = 2) -> np.ndarray:
    """``X^T X`` (n_items x n_items, float64, dense on the driver) summed over the blocks: each partition
    forms its sparse ``X_p^T X_p``, a tree reduction adds them (``depth`` levels), and only the sum is
    made dense."""
    total = blocks.map(lambda x: (x.T @ x).tocsr()).treeReduce(operator.add, depth)
    log.info("Gram matrix of %d items: %d non-zeros (%.1f%%)", n_items, total.nnz,
             100.0 * total.nnz / max(1, n_items * n_items))
    return total.toarray()
