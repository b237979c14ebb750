"""Top-N and vectors computed on the executors: the one scoring path of every model.

Every top-N function here keeps the contract of ``recsys_spark.models.base.Recommender.recommend``: at
most ``k`` rows (user_idx, item_idx, score, rank) per user, rank 1 the best, no seen or excluded item,
and score ties broken by the smaller item_idx. Scores come from factors (a dot product with the item
matrix broadcast: :func:`top_k_from_factors`) or from any function of a block of users
(:func:`top_k_from_scores`, e.g. a network); the seen filter and the top-k selection are shared.

A torch network reaches the executors as a :class:`ModuleSnapshot` (class, constructor arguments and
numpy weights) in a broadcast variable; each Python worker rebuilds the module once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_spark import tables as tb
from recsys_spark.errors import RecsysError
from recsys_spark.tables import EMBEDDING, SIMILAR_ITEM_IDX, require_columns

log = logging.getLogger(__name__)

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
# Columns per run whose maximum bounds a row's k-th best score (``_candidates``).
BOUND_RUN = 64

_SEEN_ITEM = "_seen_item"


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


def _candidates(scores: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the entries that may be among their row's ``kk`` best: those at least a lower
    bound of the row's ``kk``-th best score, found cheaply.

    The bound is the ``kk``-th best of the maxima of disjoint runs of ``BOUND_RUN`` columns (``kk`` runs
    hold an item at least that high). Only runs whose maximum reaches the bound can hold a candidate, so
    only those runs (about ``kk`` per row) and the columns after the last whole run are compared with it:
    a full ``np.partition`` of the (users, items) block, and later an ``np.nonzero`` over all of it, were
    each the most expensive step of top-N. A catalogue with fewer than ``kk`` runs gets the exact
    ``kk``-th best as its bound."""
    n_rows, n_cols = scores.shape
    runs = n_cols // BOUND_RUN
    if runs < kk:
        bound = np.partition(scores, n_cols - kk, axis=1)[:, n_cols - kk]
        return np.nonzero(scores >= bound[:, None])
    whole = runs * BOUND_RUN
    maxima = np.maximum.reduceat(scores[:, :whole], np.arange(0, whole, BOUND_RUN), axis=1)  # (rows, runs)
    bound = np.partition(maxima, runs - kk, axis=1)[:, runs - kk]  # (rows,)
    run_rows, run_ids = np.nonzero(maxima >= bound[:, None])
    s_row, s_col = scores.strides
    # A (rows, runs, BOUND_RUN) view of the whole runs: no copy; the reached runs are gathered from it.
    grouped = np.lib.stride_tricks.as_strided(scores, (n_rows, runs, BOUND_RUN), (s_row, BOUND_RUN * s_col, s_col),
                                              writeable=False)
    hit, offset = np.nonzero(grouped[run_rows, run_ids] >= bound[run_rows, None])
    tail_rows, tail_cols = np.nonzero(scores[:, whole:] >= bound[:, None])
    rows = np.concatenate([run_rows[hit], tail_rows])
    cols = np.concatenate([run_ids[hit] * BOUND_RUN + offset, tail_cols + whole])
    return rows, cols


def top_k_of_scores(user_ids: np.ndarray, scores: np.ndarray, seen: Sequence | None, item_ids: np.ndarray,
                    k: int, excluded: np.ndarray | None = None) -> pd.DataFrame:
    """Top-``k`` items of one block of users from their (users, items) score matrix.

    ``seen[r]`` (an array of item ids, or None) and the ``excluded`` item positions score -inf and are
    never returned. Only the items scoring at least a lower bound of the k-th best score are sorted,
    on (-score, item_idx), so ties go to the smaller item_idx; a user with fewer than ``k`` candidates gets fewer rows.
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
    # Only the items scoring at least a lower bound of each row's k-th best score are sorted.
    rows, cols = _candidates(scores, min(k, n_items))
    values = scores[rows, cols]
    finite = np.isfinite(values)
    rows, cols, values = rows[finite], cols[finite], values[finite]
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
    with_seen = seen is not None  # the closure below must not hold the DataFrame
    if not with_seen:
        rows = users
    else:
        # The seen pairs travel beside their users in one shuffle, and each task groups them with numpy:
        # no per-user list is built in the JVM (a collect_list by user and a join cost two more shuffles).
        require_columns(seen, [tb.USER_IDX, tb.ITEM_IDX], "seen items")
        pairs = seen.select(tb.USER_IDX, F.col(tb.ITEM_IDX).cast("int").alias(_SEEN_ITEM))
        rows = (users.withColumn(_SEEN_ITEM, F.lit(None).cast("int"))
                .unionByName(pairs, allowMissingColumns=True).repartition(tb.USER_IDX))

    def score_blocks(queries: pd.DataFrame, seen_users: np.ndarray, seen_items: np.ndarray):
        """Top-k of ``queries`` block by block; ``seen_items`` sorted by ``seen_users``."""
        for start in range(0, len(queries), block):
            part = queries.iloc[start:start + block]
            user_ids = part[tb.USER_IDX].to_numpy()
            first = np.searchsorted(seen_users, user_ids, "left")
            last = np.searchsorted(seen_users, user_ids, "right")
            seen_of = [seen_items[a:b] for a, b in zip(first, last, strict=True)]
            out = top_k_of_scores(user_ids, score_block(part), seen_of, item_ids, k, excluded)
            if len(out):
                yield pa.RecordBatch.from_pandas(out, preserve_index=False)

    def score_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        none = np.zeros(0, dtype=np.int32)
        if not with_seen:  # users only: stream the batches
            for batch in batches:
                yield from score_blocks(batch.to_pandas(), none, none)
            return
        # A user's seen pairs may arrive in any batch of the partition: the partition is read whole
        # (its users' factors and seen pairs, about what Spark holds for the task anyway).
        table = pa.Table.from_batches(list(batches))
        if table.num_rows == 0:
            return
        is_pair = pc.is_valid(table[_SEEN_ITEM])
        pairs = table.filter(is_pair)
        seen_users = pairs[tb.USER_IDX].to_numpy()
        order = np.argsort(seen_users, kind="stable")
        queries = table.filter(pc.invert(is_pair)).drop_columns([_SEEN_ITEM]).to_pandas()
        yield from score_blocks(queries, seen_users[order], pairs[_SEEN_ITEM].to_numpy()[order])

    return rows.mapInArrow(score_partition, RECS_SCHEMA)


def matrix_frame(spark: SparkSession, matrix: np.ndarray, idx_col: str, ids: np.ndarray | None = None) -> DataFrame:
    """(idx_col, embedding array<float>) with row r of a driver-side ``matrix`` as index ``ids[r]`` (default
    r). Built from pandas, so Arrow carries it: 2.3-2.8x faster than Python rows at 200k x 64."""
    ids = np.arange(len(matrix)) if ids is None else ids
    frame = pd.DataFrame({idx_col: np.asarray(ids, dtype=np.int32), EMBEDDING: list(matrix.astype(np.float32))})
    return spark.createDataFrame(frame, f"{idx_col} int, {EMBEDDING} array<float>")


class ModuleSnapshot:
    """A trained torch module as plain data: its class, constructor arguments (``init_kwargs``, which
    every network of ``recsys_spark.nn`` keeps) and weights as numpy arrays.

    It pickles without torch tensors, so it goes into a Spark broadcast, and :meth:`module` rebuilds the
    network once per process (in eval mode, on ``device``) and keeps it: a broadcast's value is
    deserialised once per Python worker, so every task of that worker reuses the same module.
    """

    def __init__(self, module_class: type, init_kwargs: dict[str, Any], weights: dict[str, np.ndarray],
                 device: str = "cpu") -> None:
        self.module_class, self.init_kwargs, self.weights = module_class, dict(init_kwargs), weights
        self.device = device
        self._module = None

    @classmethod
    def of(cls, module, device: str = "cpu") -> ModuleSnapshot:
        """A snapshot of ``module``'s current weights (copied to numpy)."""
        weights = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
        return cls(type(module), module.init_kwargs, weights, device)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_module"] = None  # rebuilt where it is unpickled
        return state

    def module(self):
        if self._module is None:
            self._module = build_module(self.module_class, self.init_kwargs, self.weights).to(self.device)
        return self._module


def build_module(module_class: type, init_kwargs: dict[str, Any], weights: dict[str, Any] | None = None):
    """``module_class(**init_kwargs)`` with ``weights`` (numpy arrays or tensors) loaded, in eval mode."""
    import torch

    module = module_class(**init_kwargs)
    if weights is not None:
        module.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()})
    return module.eval()


def executor_module(snapshot) -> Any:
    """The module of a broadcast :class:`ModuleSnapshot` inside a Spark task: one torch thread, since
    Spark already runs a task per core."""
    import torch

    torch.set_num_threads(1)
    return snapshot.value.module()


def sequence_vectors(sequences: DataFrame, users: DataFrame, snapshot, block: int,
                     append_one: bool = False) -> DataFrame:
    """(user_idx, embedding): a sequence network's ``user_embedding`` over each user's left-padded
    ``items`` (``sequences``: user_idx, items), for the users of ``users``, on the executors by blocks.
    ``snapshot`` is a broadcast :class:`ModuleSnapshot`. ``append_one`` adds a constant 1, for item
    factors that carry a bias as their last column."""

    def encode(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import torch

        module = executor_module(snapshot)
        for batch in batches:
            for start in range(0, len(batch), block):
                part = batch.iloc[start:start + block]
                seq = torch.as_tensor(np.stack(part[tb.ITEMS].to_numpy()).astype(np.int64))  # [B, L]
                with torch.no_grad():
                    vectors = module.user_embedding(seq).float().numpy()  # [B, d]
                if append_one:
                    vectors = np.concatenate([vectors, np.ones((len(vectors), 1), np.float32)], axis=1)
                yield pd.DataFrame({tb.USER_IDX: part[tb.USER_IDX].to_numpy(), EMBEDDING: list(vectors)})

    schema = T.StructType([T.StructField(tb.USER_IDX, T.IntegerType()),
                           T.StructField(EMBEDDING, T.ArrayType(T.FloatType()))])
    return sequences.join(users, tb.USER_IDX, "left_semi").mapInPandas(encode, schema)


def with_popularity_prior(scores: np.ndarray, cold: np.ndarray, item_counts: np.ndarray,
                          weight: float | None) -> np.ndarray:
    """scores [U, n] with each cold user's row (``cold`` [U] bool) re-scored as
    ``log(1 + train rows of the item) + weight * z``, z the row's scores standardised over its n items (the
    catalogue, or a user's candidates; ``item_counts`` [n], missing = 0); warm rows, and every row when
    ``weight`` is None, as given.

    Why: a cold user is known by a few side fields (ML-100K: age, gender, occupation, zip region), which
    a model trained mostly on ids and histories turns into a ranking as sharp as a long history gives. The
    popularity prior is what such a user most likely wants; the model's standardised scores move it by as
    much as ``weight`` says, chosen on held-out cold users (``scripts/bench_cold.py``, its validation seed).
    Popularity within the user's side-field group is the most this can reach (docs/BENCHMARKS.md)."""
    if weight is None or not cold.any():
        return scores
    prior = np.zeros(scores.shape[1])  # items indexed after the fit: no train rows
    known = min(len(item_counts), len(prior))
    prior[:known] = np.log1p(item_counts[:known])
    rows = scores[cold].astype(np.float64)  # [C, n]
    z = (rows - rows.mean(axis=1, keepdims=True)) / np.maximum(rows.std(axis=1, keepdims=True), 1e-12)
    out = scores.copy()
    out[cold] = (prior + weight * z).astype(scores.dtype)
    return out
