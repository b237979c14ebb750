"""Top-N on Spark: scoring from factors by blocks of users, the seen-item filter, the cold-user fallback
and the way back to the original ids (DESIGN sections 2 and 5).

Every function here keeps the contract of ``recsys_spark.models.base.Recommender.recommend``: at most
``k`` rows (user_idx, item_idx, score, rank) per user, rank 1 the best, no seen or excluded item, and
score ties broken by the smaller item_idx.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_spark import tables as tb
from recsys_spark.errors import RecsysError
from recsys_spark.models.base import SIMILAR_COLUMNS, Recommender, require_columns

log = logging.getLogger(__name__)

# Column names of the factor and similar-item frames (see models.base).
EMBEDDING = "embedding"
SIMILAR_ITEM_IDX = SIMILAR_COLUMNS[1]

RECS_SCHEMA = T.StructType(
    [
        T.StructField(tb.USER_IDX, T.IntegerType(), False),
        T.StructField(tb.ITEM_IDX, T.IntegerType(), False),
        T.StructField(tb.SCORE, T.DoubleType(), False),
        T.StructField(tb.RANK, T.IntegerType(), False),
    ]
)

# The item matrix is collected to the driver and broadcast: refuse catalogues that would not fit.
MAX_BROADCAST_BYTES = 2 << 30
# One block's score matrix (users x items, float32) stays under this many cells (128 MB).
MAX_BLOCK_CELLS = 32 << 20

_SEEN = "_seen"


def collect_factors(factors: DataFrame, id_col: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids sorted ascending, float32 matrix whose row r belongs to ids[r]) collected to the driver.

    This is an explicit collect, refused above ``MAX_BROADCAST_BYTES``: the item side of a
    factorisation is small next to the user side, which stays distributed.
    """
    require_columns(factors, [id_col, EMBEDDING], "factors")
    n_rows, dim = factors.agg(F.count(F.lit(1)), F.coalesce(F.max(F.size(EMBEDDING)), F.lit(0))).first()
    size = n_rows * dim * 4
    if size > MAX_BROADCAST_BYTES:
        raise RecsysError(
            f"{n_rows} x {dim} factors ({size / 2**20:.0f} MB) are too large to broadcast "
            f"(limit {MAX_BROADCAST_BYTES / 2**20:.0f} MB)"
        )
    log.info("collecting %d x %d factors (%.1f MB) to the driver for broadcast", n_rows, dim, size / 2**20)
    pdf = factors.select(id_col, EMBEDDING).toPandas().sort_values(id_col, kind="stable")
    ids = pdf[id_col].to_numpy(dtype=np.int32)
    matrix = np.stack(pdf[EMBEDDING].to_numpy()).astype(np.float32) if n_rows else np.zeros((0, dim), np.float32)
    return ids, np.ascontiguousarray(matrix)


def positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Positions in the sorted ``ids`` of the ``wanted`` ids that occur there (others are ignored)."""
    wanted = np.asarray(wanted, dtype=np.int64)
    if ids.size == 0 or wanted.size == 0:
        return np.zeros(0, dtype=np.int64)
    pos = np.minimum(np.searchsorted(ids, wanted), ids.size - 1)
    return pos[ids[pos] == wanted]


def top_k_of_scores(user_ids: np.ndarray, scores: np.ndarray, seen: Sequence | None, item_ids: np.ndarray,
                    k: int, excluded: np.ndarray | None = None) -> pd.DataFrame:
    """Top-``k`` items of one block of users from their (users, items) score matrix.

    ``seen[r]`` (an array of item ids, or None) and the ``excluded`` item positions score -inf and are
    never returned. Only the items scoring at least the k-th best score are sorted, on (-score,
    item_idx), so ties go to the smaller item_idx; a user with fewer than ``k`` candidates gets fewer rows.
    Shared by the factor models and by models that score with a network (NeuMF). ``scores`` is
    modified in place.
    """
    n_users, n_items = len(user_ids), len(item_ids)
    if n_users == 0 or n_items == 0:
        return pd.DataFrame({c: [] for c in RECS_SCHEMA.fieldNames()})
    if excluded is not None and excluded.size:
        scores[:, excluded] = -np.inf
    if seen is not None:
        lengths = np.array([0 if s is None else len(s) for s in seen], dtype=np.int64)
        if lengths.sum():
            flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in seen if s is not None and len(s)])
            rows = np.repeat(np.arange(n_users), lengths)
            pos = np.minimum(np.searchsorted(item_ids, flat), n_items - 1)
            known = item_ids[pos] == flat
            scores[rows[known], pos[known]] = -np.inf
    kk = min(k, n_items)
    threshold = np.partition(scores, n_items - kk, axis=1)[:, n_items - kk]  # each row's k-th best score
    rows, cols = np.nonzero((scores >= threshold[:, None]) & np.isfinite(scores))
    values = scores[rows, cols]
    order = np.lexsort((cols, -values, rows))  # by user, then score descending, then item ascending
    rows, cols, values = rows[order], cols[order], values[order]
    rank = np.arange(rows.size) - np.searchsorted(rows, rows, side="left")
    keep = rank < k
    return pd.DataFrame(
        {
            tb.USER_IDX: user_ids[rows[keep]].astype(np.int32),
            tb.ITEM_IDX: item_ids[cols[keep]].astype(np.int32),
            tb.SCORE: values[keep].astype(np.float64),
            tb.RANK: (rank[keep] + 1).astype(np.int32),
        }
    )


def top_k_from_factors(user_factors: DataFrame, item_factors: DataFrame, k: int, seen: DataFrame | None = None,
                       exclude_items: Sequence[int] = (), users_per_block: int = 2048) -> DataFrame:
    """Top-``k`` items by dot product for every user of ``user_factors``, computed on the executors.

    Parameters
    ----------
    user_factors : (user_idx, embedding array<float>), the users to score.
    item_factors : (item_idx, embedding array<float>), the catalogue; collected once to the driver and
        broadcast (see ``collect_factors``).
    k : recommendations per user.
    seen : optional (user_idx, item_idx) rows never to recommend to that user.
    exclude_items : item indices never to recommend to anyone.
    users_per_block : users scored by one matrix product; lowered so that a block's score matrix
        stays under ``MAX_BLOCK_CELLS``.

    Returns
    -------
    DataFrame (user_idx int, item_idx int, score double, rank int): ``min(k, candidates)`` rows per user.
    """
    if k <= 0:
        raise RecsysError(f"k must be positive, got {k}")
    require_columns(user_factors, [tb.USER_IDX, EMBEDDING], "user factors")
    item_ids, item_matrix = collect_factors(item_factors, tb.ITEM_IDX)
    items = user_factors.sparkSession.sparkContext.broadcast(item_matrix)

    def dot(part: pd.DataFrame) -> np.ndarray:
        return np.stack(part[EMBEDDING].to_numpy()).astype(np.float32) @ items.value.T  # (users, items)

    return top_k_from_scores(user_factors.select(tb.USER_IDX, EMBEDDING), dot, item_ids, k, seen, exclude_items,
                             users_per_block)


def normalized(factors: DataFrame) -> DataFrame:
    """Factors scaled to unit length (zero vectors stay zero), so dot products are cosines."""
    norm = F.sqrt(F.aggregate(EMBEDDING, F.lit(0.0), lambda acc, x: acc + x * x))
    scaled = F.transform(EMBEDDING, lambda x: (x / F.greatest(norm, F.lit(1e-12))).cast("float"))
    return factors.withColumn(EMBEDDING, scaled)


def similar_from_factors(item_factors: DataFrame, k: int, users_per_block: int = 2048) -> DataFrame:
    """Top-``k`` other items by cosine of their factors: (item_idx, similar_item_idx, score, rank).

    The same blocked top-k as for users, with the items themselves as queries and each item's own
    row as its only "seen" item.
    """
    unit = normalized(item_factors.select(tb.ITEM_IDX, EMBEDDING))
    queries = unit.withColumnRenamed(tb.ITEM_IDX, tb.USER_IDX)
    itself = unit.select(F.col(tb.ITEM_IDX).alias(tb.USER_IDX), tb.ITEM_IDX)
    top = top_k_from_factors(queries, unit, k, seen=itself, users_per_block=users_per_block)
    return top.select(
        F.col(tb.USER_IDX).alias(tb.ITEM_IDX), F.col(tb.ITEM_IDX).alias(SIMILAR_ITEM_IDX), tb.SCORE, tb.RANK
    )


def popularity_fallback(popularity_model: Recommender, users: DataFrame, known: DataFrame | None, k: int,
                        seen: DataFrame | None = None, exclude_items: Sequence[int] = ()) -> DataFrame | None:
    """The popularity model's top-``k`` for the ``users`` that are not in ``known`` (None: no such user)."""
    if known is None:
        return None
    cold = users.select(tb.USER_IDX).distinct().join(known.select(tb.USER_IDX), tb.USER_IDX, "left_anti")
    return popularity_model.recommend(cold, k, seen, list(exclude_items))


def recommend_with_fallback(model: Recommender, users: DataFrame, k: int, seen: DataFrame | None = None,
                            exclude_items: Sequence[int] = (),
                            popularity_model: Recommender | None = None) -> DataFrame:
    """``model``'s recommendations for the users it knows, ``popularity_model``'s for the others.

    Without a popularity model, or for a model that scores every user (``known_users()`` is None), this
    is ``model.recommend``: unknown users then simply get no rows.
    """
    known = model.known_users()
    if popularity_model is None or known is None:
        return model.recommend(users, k, seen, list(exclude_items))
    require_columns(users, [tb.USER_IDX], "users")
    warm = users.select(tb.USER_IDX).distinct().join(known.select(tb.USER_IDX), tb.USER_IDX, "left_semi")
    recs = model.recommend(warm, k, seen, list(exclude_items))
    cold = popularity_fallback(popularity_model, users, known, k, seen, exclude_items)
    return recs.unionByName(cold)


def to_original_ids(recs: DataFrame, user_index: DataFrame, item_index: DataFrame) -> DataFrame:
    """(user_idx, item_idx, score, rank) -> (user_id, item_id, score, rank) through the index tables."""
    require_columns(recs, [tb.USER_IDX, tb.ITEM_IDX, tb.SCORE, tb.RANK], "recommendations")
    require_columns(user_index, [tb.USER_ID, tb.USER_IDX], "user index")
    require_columns(item_index, [tb.ITEM_ID, tb.ITEM_IDX], "item index")
    return (
        recs.join(user_index.select(tb.USER_ID, tb.USER_IDX), tb.USER_IDX)
        .join(item_index.select(tb.ITEM_ID, tb.ITEM_IDX), tb.ITEM_IDX)
        .select(tb.USER_ID, tb.ITEM_ID, tb.SCORE, tb.RANK)
    )


def top_k_from_scores(users: DataFrame, score_block, item_ids: np.ndarray, k: int, seen: DataFrame | None = None,
                      exclude_items: Sequence[int] = (), users_per_block: int = 1024) -> DataFrame:
    """Top-``k`` for every row of ``users`` when scores come from a function, not a dot product.

    ``score_block(part)`` receives a pandas block of ``users`` rows and returns a float32 (rows, items)
    matrix whose columns follow ``item_ids``; it runs on the executors, so it must be picklable (close
    over broadcast variables, not over the SparkSession).
    """
    if k <= 0:
        raise RecsysError(f"k must be positive, got {k}")
    require_columns(users, [tb.USER_IDX], "users")
    excluded = positions(item_ids, np.asarray(list(exclude_items), dtype=np.int64))
    block = max(1, min(users_per_block, MAX_BLOCK_CELLS // max(1, item_ids.size)))
    if seen is not None:
        require_columns(seen, [tb.USER_IDX, tb.ITEM_IDX], "seen items")
        seen_lists = seen.groupBy(tb.USER_IDX).agg(F.collect_list(tb.ITEM_IDX).alias(_SEEN))
        users = users.join(seen_lists, tb.USER_IDX, "left")
    else:
        users = users.withColumn(_SEEN, F.lit(None).cast(T.ArrayType(T.IntegerType())))

    def score_blocks(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            for start in range(0, len(batch), block):
                part = batch.iloc[start:start + block]
                out = top_k_of_scores(part[tb.USER_IDX].to_numpy(), score_block(part), part[_SEEN].to_numpy(),
                                      item_ids, k, excluded)
                if len(out):
                    yield out

    return users.mapInPandas(score_blocks, RECS_SCHEMA)
